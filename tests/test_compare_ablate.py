"""compare and ablate: configuration mistakes said once, grid values that win, report folders of their own, honest
inference throughput, and compare runs that `train.py fit` of their config.yaml reproduces."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from train import command_line, main

SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
WEIGHT = "model.init_args.loss.init_args.weight"


def said_once(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """train.py's stderr for `args`, which must fail with a one-line configuration error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command_line(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    return error


def test_ablate_says_a_missing_data_folder_once_and_leaves_no_folder(in_tmp_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A missing IMDB root: one line, exit 2, no point folder."""
    args = ["ablate", "--config", str(REPO / "configs/l2x/imdb.yaml"), "--name", "no_data",
            "--grid", "seed_everything=[0]", "--data.init_args.root=missing", "--trainer.fast_dev_run=true"]
    error = said_once(capsys, args)
    assert error.startswith("train.py: error: IMDB root 'missing' does not exist.") and error.count("exist") == 1
    assert not (in_tmp_dir / "checkpoints" / "no_data").exists()


def test_ablate_checks_every_points_arguments_before_the_first_trains(in_tmp_dir: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "bad_value",
                               "--grid", "seed_everything=[0,not_a_seed]", "--trainer.fast_dev_run=true"])
    assert "seed_everything" in error
    assert not (in_tmp_dir / "checkpoints").exists()  # the first point did not train


def test_ablate_refuses_an_override_of_a_grid_key_and_the_grid_wins(in_tmp_dir: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    args = ["ablate", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--name", "clash",
            "--grid", f"{WEIGHT}=[0,1]", f"--{WEIGHT}=5", "--trainer.fast_dev_run=true", *SMALL_WORLD]
    with pytest.raises(ValueError, match=f"'--{WEIGHT}=5' sets the grid key '{WEIGHT}'"):
        main(args)
    assert "sets the grid key" in said_once(capsys, args)
    assert not (in_tmp_dir / "checkpoints").exists()
    from zoo.cli.ablate import point_cli

    # callers of run_grid_point (benchmarks) are not checked: there the grid's value still wins over an override
    cli = point_cli(str(REPO / "configs/icnn/parts_world.yaml"), "direct", {WEIGHT: 0}, [f"--{WEIGHT}=5", *SMALL_WORLD])
    assert cli.model.loss.weight == 0


def test_compare_reports_every_family_config_in_a_folder_of_its_own(in_tmp_dir: Path) -> None:
    from zoo.cli.compare import default_name, read_compare_spec

    names = [read_compare_spec(REPO / f"configs/{family}/parts_world.yaml")["name"]
             for family in ("icnn", "cbm", "protopnet")]
    assert names == ["icnn_parts_world_compare", "cbm_parts_world_compare", "protopnet_parts_world_compare"]
    (in_tmp_dir / "mine.yaml").write_text("compare: {runs: {a: {config: x.yaml}}}\n")
    (in_tmp_dir / "my data").mkdir()
    assert default_name("mine.yaml") == "mine" and default_name(in_tmp_dir / "my data" / "x.yaml") == "my_data_x"


@pytest.mark.parametrize("train_batches, accumulate", [(2, 1), (4, 2)])
def test_compare_counts_the_samples_it_read(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch, train_batches: int,
                                            accumulate: int) -> None:
    """limit_val_batches=1 of batch size 8 reads 8 of the 32 validation samples: 8 samples per (fake) second; the
    training batches read are counted, not the optimiser steps (gradient accumulation: 4 batches, 2 steps). Only the
    batches are timed (one fake second each, from its start hook to its end hook), so the training throughput is 8
    samples per second whatever the number of batches (the whole fit's clock made it 8 * batches / 1 s)."""
    import importlib

    clock = iter(range(1000))  # every perf_counter call one second later
    module = importlib.import_module("zoo.cli.compare")  # zoo.cli.compare itself is the function
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    spec = {"compare": {"name": "speed", "args": [*SMALL_WORLD, "--data.init_args.batch_size=8",
                                                  "--trainer.max_epochs=1",
                                                  f"--trainer.limit_train_batches={train_batches}",
                                                  f"--trainer.accumulate_grad_batches={accumulate}",
                                                  "--trainer.limit_val_batches=1"],
                        "runs": {"only": {"config": BASELINE}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    (row,) = main(["compare", "--config", "spec.yaml", "--no_explain"])
    assert row["infer_samples_per_s"] == 8.0 and row["train_samples_per_s"] == 8.0
    assert row["weights"] == f"last (epoch 0, step {train_batches // accumulate})"


def test_compare_counts_the_samples_a_spawned_ddp_run_read(in_tmp_dir: Path) -> None:
    """ddp_spawn trains and validates in worker processes, on copies of the counting callbacks: their counts come
    back with rank zero's results (the throughput columns were empty and 0.0)."""
    spec = {"compare": {"name": "spawned", "args": [*SMALL_WORLD, "--data.init_args.batch_size=8",
                                                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                                    "--trainer.limit_val_batches=1", "--trainer.strategy=ddp_spawn",
                                                    "--trainer.devices=2", "--trainer.accelerator=cpu",
                                                    "--trainer.callbacks=[]"],
                        "runs": {"only": {"config": BASELINE}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    (row,) = main(["compare", "--config", "spec.yaml", "--no_explain"])
    assert row["train_samples_per_s"] != "" and row["train_samples_per_s"] > 0 and row["infer_samples_per_s"] > 0
    assert row["weights"] == "last (epoch 0, step 2)"  # from the worker, as the counts (limit_train_batches=2)
    assert (in_tmp_dir / "checkpoints" / "spawned" / "report.md").is_file()


def test_fit_of_a_compare_runs_config_reproduces_its_weights(in_tmp_dir: Path) -> None:
    """The second run (after another one trained) and `train.py fit` of its saved config.yaml: the same last.ckpt."""
    spec = {"compare": {"name": "again", "args": [*SMALL_WORLD, "--trainer.max_epochs=1",
                                                  "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                                                  "--data.init_args.batch_size=8"],
                        "runs": {"first": {"config": BASELINE}, "second": {"config": BASELINE}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    main(["compare", "--config", "spec.yaml", "--no_explain"])
    run = in_tmp_dir / "checkpoints" / "again" / "second"
    assert (run / "config.yaml").is_file(), "a compare run saves its resolved config.yaml"
    main(["fit", "--config", str(run / "config.yaml"), "--trainer.logger.init_args.name=refit"])
    compared, refit = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                       for folder in (run, in_tmp_dir / "checkpoints" / "refit"))
    assert compared.keys() == refit.keys() and all(torch.equal(compared[k], refit[k]) for k in compared)


def test_twins_take_the_backbone_after_the_family_prefix_and_ablate_folders_are_per_config(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`{backbone}` of aog_rcnn_tinycnn was "rcnn_tinycnn" (the part after the first "_"); an ablation of every
    family's parts_world.yaml shared checkpoints/parts_world_ablation/ and moved the other's points aside."""
    from zoo.cli.compare import backbone_part

    assert [backbone_part(n) for n in ("aog_rcnn_tinycnn", "icnn_resnet18", "cem_tinycnn")] == \
        ["tinycnn", "resnet18", "tinycnn"]
    main(["ablate", "--config", BASELINE, "--grid", "seed_everything=[0]", "--trainer.fast_dev_run=true",
          *SMALL_WORLD])
    assert (in_tmp_dir / "checkpoints" / "baselines_parts_world_ablation" / "ablation.md").is_file()


def test_a_twin_of_another_system_is_not_given_the_familys_options(capsys: pytest.CaptureFixture) -> None:
    """L2X's black box (a ClassifierSystem) has no black_box_epochs: compare's command-line options that its class
    does not take are said once and not passed to it; the family run, and any run of the same class, gets them all."""
    from zoo.cli.compare import for_the_runs_system

    extra = ["--model.init_args.black_box_epochs", "1", "--model.init_args.evaluator_epochs=1",
             "--model.init_args.model_kwargs.hidden=[8]", "--trainer.max_epochs=1"]
    twin = {"config": "x.yaml", "args": ["--model=zoo.baselines.system.ClassifierSystem", "--trainer.callbacks=null"]}
    assert for_the_runs_system("black_box", twin, extra) == ["--model.init_args.model_kwargs.hidden=[8]",
                                                            "--trainer.max_epochs=1"]
    said = capsys.readouterr().out
    assert "run 'black_box' (ClassifierSystem) does not take --model.init_args.black_box_epochs, " \
           "--model.init_args.evaluator_epochs; not passed to it" in said
    assert for_the_runs_system("l2x", {"config": "x.yaml"}, extra) == extra
    assert for_the_runs_system("twin", {"config": "x.yaml", "args": ["--model.init_args.loss.init_args.weight=0"]},
                               extra) == extra


@pytest.mark.parametrize("explain, said", [
    ({"methods": ["cam", "grad_cam"]}, ("explain.methods names 'grad_cam', which does not exist (did you mean "
                                        "'layer_gradcam'")),
    ({"num_images": 4, "num_image": 2}, "explain has no key 'num_image' (did you mean 'num_images'"),
    ({"metrics": ["deletion", "pointing"]}, "explain.metrics names 'pointing', which does not exist"),
    ({"num_images": 0}, "explain.num_images must be a whole number >= 1; got 0"),
])
def test_compare_checks_the_explain_block_before_the_first_run_trains(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture, explain: dict, said: str) -> None:
    """`methods: [cam, grad_cam]` trained run a, then failed with a traceback and run b never ran; a mistyped key
    (`num_image`) was ignored. Now said once, before anything trains."""
    spec = {"compare": {"name": "typo", "args": [*SMALL_WORLD, "--trainer.max_epochs=1"], "explain": explain,
                        "runs": {"a": {"config": BASELINE}, "b": {"config": BASELINE}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    error = said_once(capsys, ["compare", "--config", "spec.yaml"])
    assert error.startswith("train.py: error: compare spec: ") and said in error, error
    assert not (in_tmp_dir / "checkpoints").exists()  # no run trained


def test_compare_takes_every_explain_method_and_the_own_map_by_either_name() -> None:
    from zoo.explain.scores import DEFAULT_METHODS, KNOWN_METHODS, check_explain_settings

    check_explain_settings({"methods": [*DEFAULT_METHODS, "own", "random", "kernel_shap"], "num_images": 4,
                            "step": 64, "metrics": ["deletion", "road"], "num_perturbed": None})
    assert {"cam", "own", "random", "lime", "occlusion"} <= set(KNOWN_METHODS)
    check_explain_settings({"methods": ["own", "lime:5000", "kernel_shap:2128"]})  # perturbation sample counts
    for bad, said in (("saliency:10", "only .* take a sample count"), ("lime:0", "a positive integer"),
                      ("lime:many", "a positive integer"), ("limes:10", "only .* take a sample count")):
        with pytest.raises(ValueError, match=said):
            check_explain_settings({"methods": [bad]})


def test_compare_explains_on_global_rank_zero_only(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `ddp` every rank ran the explanation report in full (88 s a method instead of 34 s) though only rank
    zero writes it: now rank zero computes it, and every rank waits at the strategy's barrier (a no-op without a
    process group). A rank other than zero, as the trainer says, is played here; the report is a counter."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import SingleDeviceStrategy

    from zoo.engine.system import ZooSystem

    explained: list[str] = []
    barriers: list[str | None] = []
    monkeypatch.setattr(ZooSystem, "explanation_report", lambda self, datamodule, settings: explained.append("x"))
    monkeypatch.setattr(SingleDeviceStrategy, "barrier", lambda self, name=None: barriers.append(name))
    spec = {"compare": {"name": "ranks", "args": [*SMALL_WORLD, "--trainer.fast_dev_run=true"],
                        "runs": {"only": {"config": BASELINE}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    with monkeypatch.context() as rank_one:
        rank_one.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
        (row,) = main(["compare", "--config", "spec.yaml", "--name", "other_rank"])
    assert explained == [] and "compare_explanations" in barriers  # another rank: waits, computes nothing
    assert row["run"] == "only" and not (in_tmp_dir / "checkpoints" / "other_rank" / "report.md").exists()
    barriers.clear()
    main(["compare", "--config", "spec.yaml"])
    assert explained == ["x"] and "compare_explanations" in barriers  # rank zero: computed, then the barrier


def test_compare_keeps_metrics_in_full_precision(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compare rounded every metric to 4 decimals before writing report.csv / models.csv: a part_iou of 0.001116
    read 0.0011 and 3e-5 read 0.0. The rows and CSVs keep the numbers; the markdown shows >= 3 significant digits."""
    import csv

    import pytorch_lightning as pl

    monkeypatch.setattr(pl.Trainer, "validate", lambda self, *args, **kwargs: [
        {"val/acc": 0.123456789, "val/part_iou": 0.001116, "val/tiny": 3e-5, "val/loss": 1.0}])
    spec = {"compare": {"name": "precise", "args": [*SMALL_WORLD, "--trainer.fast_dev_run=true"],
                        "runs": {"only": {"config": BASELINE}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    (row,) = main(["compare", "--config", "spec.yaml", "--no_explain"])
    assert (row["acc"], row["part_iou"], row["tiny"]) == (0.123456789, 0.001116, 3e-5)
    folder = in_tmp_dir / "checkpoints" / "precise"
    for table in ("report.csv", "models.csv"):
        with open(folder / table) as f:
            written = next(csv.DictReader(f))
        assert (float(written["acc"]), float(written["part_iou"]), float(written["tiny"])) == (0.123456789, 0.001116,
                                                                                              3e-5)
    markdown = (folder / "report.md").read_text()
    assert "| 0.1235 | 0.00112 | 3e-05 |" in markdown
