"""The ablation journey (`train.py ablate`): a rerun never mixes runs of other settings or starting weights, every
point is built before the first trains, long values make short folder names, the table's legend and numbers say
what they mean, settings that cannot change a result do not rerun a point, runs live in the logger's folder, and
grid mistakes are said by name."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_compare_ablate import said_once
from train import main

SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
FAST = ["--trainer.fast_dev_run=true", *SMALL_WORLD]
BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
ICNN = str(REPO / "configs/icnn/parts_world.yaml")
CBM = str(REPO / "configs/cbm/parts_world.yaml")
RENN_STAGES = [{"name": "local", "epochs": 1, "train": ["detector"], "losses": ["loss_local"]},
               {"name": "global", "epochs": 1, "train": ["head"], "losses": ["loss_task"]},
               {"name": "joint", "epochs": 1, "train": ["detector", "head"], "losses": ["loss_task", "loss_local"],
                "lr_scale": 0.1}]


def save_start_weights(path: Path, seed: int) -> None:
    """A baseline_tinycnn backbone's weights (a `pretrained_path` file), drawn from `seed`."""
    import zoo

    torch.manual_seed(seed)
    torch.save(zoo.create_model("baseline_tinycnn", num_classes=6).backbone.body.state_dict(), path)


def test_a_rerun_after_the_starting_weights_changed_trains_the_point_again(in_tmp_dir: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """The settings hash covers the contents of the files the config names (here `pretrained_path`): a refitted
    start file runs the finished point again (the changed file said) instead of mixing it with new points."""
    save_start_weights(in_tmp_dir / "start.pth", seed=0)
    args = ["ablate", "--config", BASELINE, "--name", "start",
            "--model.init_args.model_kwargs.pretrained_path=start.pth", *FAST]
    main([*args, "--grid", "seed_everything=[0]"])
    capsys.readouterr()
    main([*args, "--grid", "seed_everything=[0]"])
    assert "point seed_everything=0: finished with the same settings, reused" in capsys.readouterr().out
    save_start_weights(in_tmp_dir / "start.pth", seed=1)  # the start checkpoint refitted
    main([*args, "--grid", "seed_everything=[0,1]"])
    printed = capsys.readouterr().out
    assert "point seed_everything=0: settings changed since its last run; run again" in printed
    assert "files.start.pth: \"sha256 " in printed  # what changed is said
    assert "finished with the same settings, reused" not in printed
    settings = json.loads((in_tmp_dir / "checkpoints/start/seed_everything=0/settings.json").read_text())
    assert list(settings["files"]) == ["start.pth"] and settings["files"]["start.pth"].startswith("sha256 ")


def test_every_points_model_is_built_before_the_first_point_trains(in_tmp_dir: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A model name or a mode the class refuses is said, with its point, before any point trains (the audit: point
    1 trained, then point 2 failed); building the points leaves the random streams as they were."""
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "typo",
                               "--grid", "model.init_args.model_name=[baseline_tinycnn,baseline_tinycnnn]", *FAST])
    assert "Unknown model 'baseline_tinycnnn'" in error and "ablate point 2/2: model_name=baseline_tinycnnn" in error
    assert not (in_tmp_dir / "checkpoints").exists()
    error = said_once(capsys, ["ablate", "--config", CBM, "--name", "modes",
                               "--grid", "model.init_args.mode=[joint,sequential]", *FAST])
    assert "mode='sequential'" in error and "ablate point 2/2: mode=sequential" in error
    assert not (in_tmp_dir / "checkpoints").exists()

    from zoo.cli.ablate import check_points

    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    check_points(BASELINE, "rng", [{"seed_everything": 1}, {"seed_everything": 2}], SMALL_WORLD)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_long_value_makes_a_short_unique_folder_name(in_tmp_dir: Path) -> None:
    """ReNN's stages as a grid value made a 284-character folder name (OSError: File name too long)."""
    from zoo.cli.ablate import grid_points, point_name

    other = [dict(RENN_STAGES[0]), dict(RENN_STAGES[1]), {**RENN_STAGES[2], "lr_scale": 0.2}]  # differs at the end
    points = grid_points({"model.init_args.stages": [RENN_STAGES, other], "seed_everything": [0, 1]})
    names = [point_name(point) for point in points]
    assert len(set(names)) == 4 and all(len(name.encode()) <= 80 for name in names), names
    assert all(name.startswith("stages=___name____local_") and name.endswith(f",seed_everything={seed}")
               for name, seed in zip(names, (0, 1, 0, 1)))
    assert point_name(points[0]) == names[0]  # the same in every run: a rerun finds its point
    for name in names:
        (in_tmp_dir / name / "stale").mkdir(parents=True)
    assert point_name({"model.init_args.model_kwargs": {"terminal_rank": 4}, "seed_everything": 0}) == \
        "model_kwargs=terminal_rank-4,seed_everything=0"  # short names as before


def test_the_legend_gives_directions_to_metric_means_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """AOG logs its detection metrics without a prefix ("*"): the legend named the ablated setting, `seeds` and
    every `_std` column as "higher is better"."""
    from zoo.cli.report import direction, write_report

    rows = [{"unfold_epoch": 1, "seeds": 2, "map_50_mean": 0.2916, "map_50_std": 0.01, "map_mean": 0.1,
             "map_std": 0.02}]
    write_report(tmp_path, {"ablation": rows}, {"*": True}, stem="ablation", settings=["unfold_epoch", "seeds"])
    assert "higher is better: map_50_mean, map_mean\n" in (tmp_path / "ablation.md").read_text()
    assert direction("acc_std", {"*": True}) is None and direction("acc_std", {"acc": True}) is None
    assert direction("acc_mean", {"acc": True}) is True and direction("sensitivity_std", {"sensitivity_std": False}) \
        is False  # a metric whose own name ends in _std keeps its direction


def test_a_small_spread_over_seeds_is_not_rounded_to_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """std of 0.028612 / 0.028649 / 0.028571 printed 0.0 (rounded to 4 decimals); the numbers are kept in full and
    the markdown shows at least 3 significant digits."""
    from zoo.cli.ablate import summarise
    from zoo.cli.report import write_report

    values = [0.028612, 0.028649, 0.028571]
    (row,) = summarise([({"a.weight": 1, "seed_everything": s}, {"acc": v}) for s, v in enumerate(values)])
    true_std = torch.tensor(values, dtype=torch.float64).std().item()
    assert row["acc_std"] == pytest.approx(true_std, rel=1e-12) and 3e-5 < true_std < 5e-5
    assert row["acc_mean"] == pytest.approx(sum(values) / 3, rel=1e-12)
    write_report(tmp_path, {"ablation": [row]}, {"acc": True}, stem="ablation", settings=["weight", "seeds"])
    markdown = (tmp_path / "ablation.md").read_text()
    assert f"| {round(true_std, 7)} |" in markdown and "| 0.0 |" not in markdown
    with open(tmp_path / "ablation.csv") as f:
        assert float(next(csv.DictReader(f))["acc_std"]) == row["acc_std"]  # full precision


def test_grid_keys_with_the_same_last_part_get_columns_of_their_own() -> None:
    from zoo.cli.ablate import summarise

    loss, optimizer = "model.init_args.loss.init_args", "model.init_args.optimizer.init_args"
    results = [({loss: {"weight": w}, optimizer: {"lr": lr}}, {"acc": 0.5}) for w in (0, 1) for lr in (0.1, 0.2)]
    rows = summarise(results)
    assert [(row["loss.init_args"], row["optimizer.init_args"]) for row in rows] == \
        [({"weight": 0}, {"lr": 0.1}), ({"weight": 0}, {"lr": 0.2}), ({"weight": 1}, {"lr": 0.1}),
         ({"weight": 1}, {"lr": 0.2})]
    (row,) = summarise([({"model.init_args.loss.init_args.weight": 1}, {"acc": 0.5})])
    assert "weight" in row  # a key without a namesake keeps its last part


def test_settings_that_cannot_change_a_result_keep_finished_points(in_tmp_dir: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """Logging frequency and the model summary moved finished points to stale/; a real change
    says what changed; the HPARAMS entries are those of the grid that ran last."""
    args = ["ablate", "--config", BASELINE, "--name", "quiet", *FAST]
    main([*args, "--grid", "seed_everything=[0,1]"])
    capsys.readouterr()
    main([*args, "--grid", "seed_everything=[0]", "--trainer.log_every_n_steps=1",
          "--trainer.enable_model_summary=false", "--progress_bar.refresh_rate=5"])
    printed = capsys.readouterr().out
    assert "point seed_everything=0: finished with the same settings, reused" in printed
    folder = in_tmp_dir / "checkpoints" / "quiet"
    assert not (folder / "stale").exists()
    assert sorted(p.name for p in (folder / "hparams").iterdir()) == ["seed_everything=0"]
    main([*args, "--grid", "seed_everything=[0]", "--model.init_args.optimizer.init_args.lr=0.01"])
    printed = capsys.readouterr().out
    assert "settings changed since its last run; run again" in printed
    assert "changed: config.model.init_args.optimizer.init_args.lr: 0.002 -> 0.01" in printed


def test_picture_callbacks_are_not_part_of_a_points_settings(in_tmp_dir: Path) -> None:
    from zoo.cli.ablate import point_cli, settings_hash

    point = {"seed_everything": 0}
    with_pictures = point_cli(ICNN, "pictures", point, SMALL_WORLD)
    without = point_cli(ICNN, "pictures", point, [*SMALL_WORLD, "--trainer.callbacks=[]"])
    assert settings_hash(with_pictures) == settings_hash(without)
    other = point_cli(ICNN, "pictures", point, [*SMALL_WORLD, "--trainer.max_epochs=2"])
    assert settings_hash(other) != settings_hash(with_pictures)


def test_runs_follow_the_loggers_save_dir_and_resume_there(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """With another save_dir, last.ckpt went to runs/ but result.json to checkpoints/: an interrupted point started
    again from scratch. A run without a logger is refused in words."""
    import importlib

    ablate_module = importlib.import_module("zoo.cli.ablate")  # zoo.cli.ablate itself is the function
    resumed: list[str | None] = []
    real_fit = ablate_module.fit
    monkeypatch.setattr(ablate_module, "fit", lambda cli, ckpt_path=None: (resumed.append(ckpt_path),
                                                                           real_fit(cli, ckpt_path=ckpt_path)))
    args = ["ablate", "--config", BASELINE, "--name", "elsewhere", "--grid", "seed_everything=[0]",
            "--trainer.logger.init_args.save_dir=runs", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", *SMALL_WORLD]
    main(args)
    point = in_tmp_dir / "runs" / "elsewhere" / "seed_everything=0"
    assert {"result.json", "settings.sha256", "settings.json", "checkpoints"} <= {p.name for p in point.iterdir()}
    assert (point / "checkpoints" / "last.ckpt").is_file() and (in_tmp_dir / "runs/elsewhere/ablation.md").is_file()
    assert not (in_tmp_dir / "checkpoints" / "elsewhere").exists()
    (point / "result.json").unlink()  # killed after its last checkpoint
    main(args)
    assert resumed == [None, "runs/elsewhere/seed_everything=0/checkpoints/last.ckpt"]
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--grid", "seed_everything=[0]",
                               "--trainer.logger=false", *FAST])
    assert "ablate needs a logger class: --trainer.logger=false gives none" in error and "Parser key" not in error


def test_a_grid_key_given_twice_or_seed_is_refused_by_name(capsys: pytest.CaptureFixture) -> None:
    from zoo.cli.ablate import parse_grid

    with pytest.raises(ValueError, match=r"--grid model.init_args.loss.init_args.weight is given twice \(\[0, 1\] "
                                         r"and \[10\]\)"):
        parse_grid(["model.init_args.loss.init_args.weight=[0,1]", "model.init_args.loss.init_args.weight=[10]"])
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--grid", "seed=[0,1]", *FAST])
    assert "--grid seed_everything=[0,1]" in error


def test_a_point_finished_by_an_earlier_ablate_is_kept(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A point finished before settings.json existed (its settings.sha256 the old hash of the config alone) is
    reused when that hash still matches and the config names no file: an upgrade does not rerun a finished grid."""
    from zoo.cli.ablate import legacy_settings_hash, point_cli

    args = ["ablate", "--config", BASELINE, "--name", "old", "--grid", "seed_everything=[0]", *FAST]
    main(args)
    point = in_tmp_dir / "checkpoints" / "old" / "seed_everything=0"
    cli = point_cli(BASELINE, "old", {"seed_everything": 0}, FAST)
    (point / "settings.sha256").write_text(legacy_settings_hash(cli) + "\n")
    (point / "settings.json").unlink()
    capsys.readouterr()
    main(args)
    assert "point seed_everything=0: finished with the same settings, reused" in capsys.readouterr().out
    assert (point / "settings.json").is_file()



def test_callbacks_that_only_report_say_so_themselves() -> None:
    """A point's hash leaves out the callbacks whose class declares `report_only` (the picture callbacks, CBM's
    intervention curve), not a callback that steers training."""
    from zoo.cli.ablate import report_only

    assert report_only({"class_path": "zoo.cbm.callback.InterventionCallback"})
    assert report_only({"class_path": "zoo.icnn.callback.FilterMapsCallback"})
    assert not report_only({"class_path": "pytorch_lightning.callbacks.EarlyStopping"})
    assert not report_only({"class_path": "no.such.Callback"})


MY_LOSS = '''import torch.nn as nn
import torch.nn.functional as F


class MyLoss(nn.Module):
    def forward(self, out, batch):
        return {{"loss_task": {scale} * F.cross_entropy(out["logits"], batch["label"])}}
'''


def test_a_point_runs_again_after_the_code_its_config_names_changed(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A user's loss (`class_path: mylosses.MyLoss`) edited between two runs of the same ablate: "finished with the
    same settings, reused", the old code's numbers. The settings now cover the source file of every module a
    class_path names (the changed file said); a point finished by the ablate before that (its settings.json without
    "code", the config and files the same) is kept, so the upgrade does not rerun a grid."""
    import importlib
    import sys

    from zoo.cli.ablate import settings_hash

    (in_tmp_dir / "mylosses.py").write_text(MY_LOSS.format(scale=1.0))
    monkeypatch.syspath_prepend(str(in_tmp_dir))
    importlib.invalidate_caches()
    args = ["ablate", "--config", BASELINE, "--name", "code", "--grid", "seed_everything=[0]",
            "--model.init_args.loss=mylosses.MyLoss", *FAST]
    point = in_tmp_dir / "checkpoints" / "code" / "seed_everything=0"
    try:
        main(args)
        (in_tmp_dir / "mylosses.py").write_text(MY_LOSS.format(scale=2.0))  # the loss edited
        capsys.readouterr()
        main(args)
        printed = capsys.readouterr().out
        assert "point seed_everything=0: settings changed since its last run; run again" in printed
        assert "changed: code.mylosses: \"sha256 " in printed and "reused" not in printed
        settings = json.loads((point / "settings.json").read_text())
        assert settings["code"]["mylosses"].startswith("sha256 ")
        assert "zoo.baselines.system" in settings["code"]  # the System's module, named wherever the repository is
        del settings["code"]  # as the ablate before code fingerprints stored the point
        (point / "settings.json").write_text(json.dumps(settings))
        (point / "settings.sha256").write_text(settings_hash(settings) + "\n")
        main(args)
        assert "point seed_everything=0: finished with the same settings, reused" in capsys.readouterr().out
        assert "mylosses" in json.loads((point / "settings.json").read_text())["code"]  # stored from now on
    finally:
        sys.modules.pop("mylosses", None)


def test_a_grid_number_in_exponent_form_is_a_number(tmp_path: Path) -> None:
    """`--grid key=[0,1e-3]`: YAML 1.1 reads 1e-3 as the string "1e-3" (result.json, the CSV column and HPARAMS got
    text, and 1e-3 and 0.001 trained the same setting in two folders). Strings written as numbers are floats now;
    the words nan and inf, and other text, stay strings."""
    from zoo.cli.ablate import grid_points, legacy_point_name, parse_grid, point_args, point_name, summarise

    grid = parse_grid(["model.init_args.optimizer.init_args.lr=[0,1e-3,-2.5E+4,.5]", "a.b=[nan,abc]",
                       "c.d=[{lr: 1e-3}]"])
    assert grid["model.init_args.optimizer.init_args.lr"] == [0, 0.001, -25000.0, 0.5]
    assert all(isinstance(value, (int, float)) for value in grid["model.init_args.optimizer.init_args.lr"])
    assert grid["a.b"] == ["nan", "abc"] and grid["c.d"] == [{"lr": 0.001}]
    (exponent,) = parse_grid(["x.lr=[1e-3]"])["x.lr"]
    assert point_name({"x.lr": exponent}) == point_name({"x.lr": 0.001}) == "lr=0.001"  # one folder for one setting
    with pytest.raises(ValueError, match="would share the folder 'lr=0.001'"):
        grid_points(parse_grid(["x.lr=[1e-3,0.001]"]))
    (row,) = summarise([({"x.lr": exponent}, {"acc": 0.5})])
    assert isinstance(row["lr"], float)
    quoted = parse_grid(['data.init_args.year=["2007","2012"]', 'k.feature_key=["0",pool]'])  # str options stay str
    assert quoted == {"data.init_args.year": ["2007", "2012"], "k.feature_key": ["0", "pool"]}
    assert point_args("c.yaml", "n", {"x.lr": exponent}, [])[2] == "--x.lr=0.001"
    nested = parse_grid(["o.init_args=[{lr: 1e-3}]", "a=[[1e-3,2]]"])
    assert legacy_point_name({"o.init_args": nested["o.init_args"][0], "a": nested["a"][0]}) == \
        point_name({"o.init_args": {"lr": "1e-3"}, "a": ["1e-3", 2]})  # the earlier ablate's folder, at any depth
    rows = summarise([({"x.lr": 0.1, "seed_everything": 0}, {"rule_precision": float("nan")}),
                      ({"x.lr": 0.1, "seed_everything": 1}, {"rule_precision": 0.8}),
                      ({"x.lr": 0.2, "seed_everything": 0}, {"rule_precision": float("nan")})])
    assert rows[0]["rule_precision_mean"] == 0.8 and math.isnan(rows[0]["rule_precision_std"])  # one of two scored
    assert math.isnan(rows[1]["rule_precision_mean"]) and math.isnan(rows[1]["rule_precision_std"])


def test_a_point_an_earlier_ablate_named_by_its_exponent_text_is_reused(in_tmp_dir: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """Before grid numbers in exponent form were numbers, the point of lr=1e-3 was the folder `lr=1e-3`: an upgrade
    trained it again in `lr=0.001` and left the old folder. The old folder is renamed and its point reused."""
    args = ["ablate", "--config", BASELINE, "--name", "exp", "--grid", "model.init_args.optimizer.init_args.lr=[1e-3]",
            *FAST]
    main(args)
    ablation = in_tmp_dir / "checkpoints" / "exp"
    (ablation / "lr=0.001").rename(ablation / "lr=1e-3")  # as the earlier ablate named it
    capsys.readouterr()
    main(args)
    printed = capsys.readouterr().out
    assert "its folder lr=1e-3 renamed lr=0.001" in printed and "finished with the same settings, reused" in printed
    assert not (ablation / "lr=1e-3").exists()
