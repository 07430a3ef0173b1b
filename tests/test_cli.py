"""The CLI: every config runs (fast_dev_run), --print_config round-trips, runs land in checkpoints/<run>/."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from tests.conftest import REPO
from tests.helpers import write_release_data
from train import main

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]


def is_compare_spec(config: str) -> bool:
    return "compare" in yaml.safe_load((REPO / config).read_text())


FIT_CONFIGS = [c for c in CONFIGS if not is_compare_spec(c)]


SMALL_SELECTOR = ["--model.init_args.black_box_epochs=1", "--model.init_args.evaluator_epochs=1"]
# chained textual stages start from scratch here (their source checkpoints exist only after a real run)
SMALL_EXPLANATION = ["--model.init_args.encoder_epochs=1", "--model.init_args.sentence_classifier_epochs=1",
                     "--model.init_args.init_checkpoint=null"]


def dataset_overrides(config: str, cub_root: Path, image_folder_root: Path, imdb_root: Path | None = None,
                      voc_root: Path | None = None) -> list[str]:
    """Arguments that point `config` at the small fixtures; a config reading what benchmarks/data/get_*.sh fetch
    (data/ under the working directory, a test's tmp dir) gets the same files, tiny, written there."""
    parsed = yaml.safe_load((REPO / config).read_text())
    if "compare" in parsed:  # runs share their data: the first run's config says which
        first_run = next(iter(parsed["compare"]["runs"].values()))["config"]
        return dataset_overrides(first_run, cub_root, image_folder_root, imdb_root, voc_root)
    if uses_release_data(config) and Path.cwd() != REPO and not (Path.cwd() / "data").exists():
        write_release_data(Path.cwd())
    cls = parsed["data"]["class_path"].rsplit(".", 1)[-1]
    system = parsed["model"]["class_path"].rsplit(".", 1)[-1]
    selector = {"L2XSystem": SMALL_SELECTOR, "TextualSystem": SMALL_EXPLANATION}.get(system, [])
    return selector + {
        "CUB200DataModule": [f"--data.init_args.root={cub_root}", "--data.init_args.image_size=64"],
        "ImageFolderDataModule": [f"--data.init_args.root={image_folder_root}"],
        "PartsWorldDataModule": SMALL_WORLD,
        "L2XSyntheticDataModule": ["--data.init_args.num_train=512", "--data.init_args.num_val=256"],
        "SyntheticSentimentDataModule": ["--data.init_args.num_train=256", "--data.init_args.num_val=128"],
        "RuleSeriesDataModule": ["--data.init_args.num_train=64", "--data.init_args.num_val=32"],
        "IMDBDataModule": [f"--data.init_args.root={imdb_root}", "--data.init_args.max_len=16"],
        "PartsWorldScenesDataModule": ["--data.init_args.num_train=8", "--data.init_args.num_val=4",
                                       "--data.init_args.num_test=4", "--data.init_args.batch_size=4"],
        "VOCDataModule": [f"--data.init_args.root={voc_root}", "--data.init_args.train_split=train",
                          "--data.init_args.val_split=val", "--data.init_args.image_size=96"],
        "IDXDataModule": ["--data.init_args.num_val=8"],
        "CSVTextDataModule": ["--data.init_args.max_len=16"],
    }.get(cls, [])


def uses_release_data(config: str) -> bool:
    """Whether a config reads what benchmarks/data/get_*.sh put under data/ (real data or ImageNet weights)."""
    text = (REPO / config).read_text()
    return any(folder in text for folder in ("data/fashion_mnist", "data/mobilenet_v2", "data/rotten_tomatoes"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs_fast_dev_run(config: str, in_tmp_dir: Path, cub_root: Path,
                                        image_folder_root: Path, imdb_root: Path, voc_root: Path) -> None:
    command = "compare" if is_compare_spec(config) else "fit"
    compare_args = ["--no_explain"] if command == "compare" else []  # explainers: see the compare report test
    result = main([command, "--config", str(REPO / config), "--trainer.fast_dev_run=true", *compare_args,
                   "--trainer.accelerator=cpu",
                   *dataset_overrides(config, cub_root, image_folder_root, imdb_root, voc_root)])
    if command == "compare":
        assert [row["run"] for row in result] == list(yaml.safe_load((REPO / config).read_text())["compare"]["runs"])
        task_metric = "map_50" if "aog_rcnn" in config else "acc"
        assert all(task_metric in row and "train_samples_per_s" in row for row in result)
    else:
        assert result.trainer.state.finished
        task_metric = "val/map_50" if "aog_rcnn" in config else "val/acc"
        assert {"train/loss", task_metric} <= set(result.trainer.callback_metrics)


def test_compare_writes_reports_with_part_metrics(in_tmp_dir: Path) -> None:
    rows = main(["compare", "--config", str(REPO / "configs/quickstart.yaml"), "--trainer.fast_dev_run=true",
                 "--explain_images=2", "--data.init_args.image_size=32", *SMALL_WORLD])
    report = in_tmp_dir / "checkpoints" / "quickstart"
    assert (report / "report.csv").is_file() and "| run |" in (report / "report.md").read_text()
    assert {row["run"] for row in rows} == {"icnn", "opaque_twin", "plain_cnn"}
    assert all({"location_instability", "part_iou"} <= set(row) for row in rows)
    with open(report / "explanations.csv") as f:
        explained = list(csv.DictReader(f))
    methods = {"cam", "saliency", "integrated_gradients", "layer_gradcam", "occlusion", "random"}
    assert {(r["run"], r["method"]) for r in explained} == {(run, m) for run in ("icnn", "opaque_twin", "plain_cnn")
                                                            for m in methods}
    assert all(0 <= float(r["deletion_auc"]) <= 1 and 0 <= float(r["mass_in_parts"]) <= 1 for r in explained)
    assert (report / "explanations.png").is_file() and not list(report.glob("explanations_*.png"))  # one figure
    markdown = (report / "report.md").read_text()  # each direction from the metric's own higher_is_better
    assert re.search(r"higher is better: acc, part_iou\b", markdown) and "lower is better: location_instability" in \
        markdown and re.search(r"lower is better: ms_per_sample, deletion_auc", markdown)


def test_compare_refuses_runs_with_different_settings(in_tmp_dir: Path) -> None:
    spec = {"compare": {"name": "bad", "runs": {
        "a": {"config": str(REPO / "configs/baselines/parts_world.yaml")},
        "b": {"config": str(REPO / "configs/baselines/parts_world.yaml"), "args": ["--data.init_args.seed=3"]}}}}
    (in_tmp_dir / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="'a' and 'b' differ in data"):
        main(["compare", "--config", "bad.yaml"])
    with pytest.raises(ValueError, match="ClassifierSystem declares no twins"):
        main(["compare", "--config", str(REPO / "configs/baselines/parts_world.yaml")])
    (in_tmp_dir / "empty_runs.yaml").write_text("compare: {runs: {}}\n")
    with pytest.raises(ValueError, match="is not a compare spec"):
        main(["compare", "--config", "empty_runs.yaml"])


def test_compare_of_a_family_config_runs_it_against_its_twins(in_tmp_dir: Path) -> None:
    rows = main(["compare", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--trainer.fast_dev_run=true",
                 "--no_explain", *SMALL_WORLD])
    assert [row["run"] for row in rows] == ["icnn", "ordinary_twin", "masked_twin", "plain_cnn"]  # ICNNSystem.TWINS
    assert [row["model"] for row in rows] == ["icnn_tinycnn"] * 3 + ["baseline_tinycnn"]
    from zoo.cli.compare import read_compare_spec
    from zoo.cli.lightning import ZooCLI

    twin = read_compare_spec(REPO / "configs/icnn/parts_world.yaml")["runs"]["ordinary_twin"]
    cli = ZooCLI(args=["--config", twin["config"], *twin["args"], *SMALL_WORLD], run=False)
    assert cli.model.hparams.model_kwargs == {"tau_scale": 16.0, "category_assignment": "balanced", "masks": False}
    assert not cli.model.model.top_filters.masks and cli.model.loss.weight == 0
    assert (in_tmp_dir / "checkpoints" / "icnn_parts_world_compare" / "report.md").is_file()


def test_compare_of_the_aog_config_runs_the_detector_twins(in_tmp_dir: Path) -> None:
    rows = main(["compare", "--config", str(REPO / "configs/aog_rcnn/parts_world_scenes.yaml"),
                 "--trainer.fast_dev_run=true", "--data.init_args.num_train=8", "--data.init_args.num_val=4",
                 "--data.init_args.num_test=4", "--data.init_args.batch_size=4"])  # explanations: none for detectors
    assert [row["run"] for row in rows] == ["aog_rcnn", "average_vote", "two_mlp_head"]  # AOGRCNNSystem.TWINS
    assert [row["model"] for row in rows] == ["aog_rcnn_tinycnn", "vote_rcnn_tinycnn", "faster_rcnn_tinycnn"]
    assert all({"map_50", "map", "grid_part_iou", "box_part_iou"} <= set(row) for row in rows)
    assert "parse_part_iou" in rows[0] and "parse_part_iou" not in rows[1]
    report = in_tmp_dir / "checkpoints" / "aog_rcnn_parts_world_scenes_compare"
    assert (report / "report.md").is_file() and not (report / "explanations.csv").exists()


def test_print_config_round_trip(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    (in_tmp_dir / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "printed.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)
    cli = main(["fit", "--config", "printed.yaml", "--trainer.fast_dev_run=true", *SMALL_WORLD])
    assert cli.trainer.state.finished


def test_fit_writes_run_folder_and_resumes_from_last(in_tmp_dir: Path) -> None:
    args = ["--config", str(REPO / "configs/baselines/parts_world.yaml"), *SMALL_WORLD, "--trainer.max_epochs=1",
            "--trainer.logger.init_args.name=smoke", "--trainer.enable_model_summary=false"]
    main(["fit", *args])
    run = in_tmp_dir / "checkpoints" / "smoke"
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "checkpoints").glob("best-epoch0-*.ckpt"))
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["model_name"] == "baseline_tinycnn"
    assert yaml.safe_load((run / "hparams.yaml").read_text())["num_classes"] == 6  # linked from the datamodule
    resumed = main(["fit", *args, "--trainer.max_epochs=2", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 2 * 1  # 64 images / 64 per batch


def test_readme_model_table_matches_the_registry() -> None:
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- models:start -->\n(.*?)\n<!-- models:end -->", readme, re.S)
    assert table, "README.md lacks the <!-- models:start --> ... <!-- models:end --> block"
    assert table.group(1).strip() == zoo.model_table(), "regenerate: python -c 'import zoo; print(zoo.model_table())'"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(python -m pytest.*)$", readme, re.M)
    assert commands, "README.md names no test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[0] in ci.splitlines()


def test_ablate_averages_over_seeds_and_resumes_without_redoing_finished_points(in_tmp_dir: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    args = ["ablate", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--name", "lam",
            "--grid", "model.init_args.loss.init_args.weight=[0,1]", "--grid", "seed_everything=[0,1]",
            "--trainer.fast_dev_run=true", *SMALL_WORLD]
    rows = main(args)
    assert [(row["weight"], row["seeds"]) for row in rows] == [(0, 2), (1, 2)]
    assert all(isinstance(row["acc_mean"], float) and 0 <= row["acc_mean"] <= 1 and row["acc_std"] >= 0
               for row in rows)
    folder = in_tmp_dir / "checkpoints" / "lam"
    with open(folder / "ablation.csv") as f:  # numbers, not "0.28 +- 0.05" strings
        table = list(csv.DictReader(f))
    assert [float(r["acc_mean"]) for r in table] == [row["acc_mean"] for row in rows]
    assert all(float(r["acc_std"]) >= 0 for r in table)
    results = sorted(folder.glob("*/result.json"))
    assert len(results) == 4 and (folder / "ablation.md").is_file()
    before = {p: p.stat().st_mtime_ns for p in results}
    results[0].unlink()  # as if that run had been killed before finishing
    capsys.readouterr()
    main(args)
    after = {p: p.stat().st_mtime_ns for p in results}
    assert results[0].is_file()
    assert all(after[p] == before[p] for p in results[1:])  # finished points were not redone, and it is said
    printed = capsys.readouterr().out
    assert all(f"point {p.parent.name}: finished with the same settings, reused" in printed for p in results[1:])
    assert f"point {results[0].parent.name}: finished" not in printed
    hparams = folder / "hparams"  # one HPARAMS entry per point, however often the ablation ran
    assert sorted(p.name for p in hparams.iterdir()) == sorted(p.parent.name for p in results)
    assert all(len(list((hparams / p.parent.name).glob("events.out.tfevents.*"))) == 1 for p in results)
    assert not list(hparams.glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match=r"seed_everything needs a non-empty list of values, e\.g\. --grid "
                                         r"seed_everything=\[0\]"):
        main(["ablate", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--grid", "seed_everything=0"])


def test_ablate_names_points_with_mapping_values(in_tmp_dir: Path) -> None:
    """A grid over a mapping (model_kwargs) gets a path- and YAML-safe name (its logger name is parsed as YAML)."""
    from zoo.cli.ablate import point_name

    point = {"model.init_args.model_kwargs": {"terminal_rank": 4}, "seed_everything": 0}
    assert point_name(point) == "model_kwargs=terminal_rank-4,seed_everything=0"
    assert point_name({"a.b": "x/y: z"}) == "b=x_y__z"
    with pytest.raises(ValueError, match="share the folder 'b=x_y'"):
        main(["ablate", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--grid", "a.b=[x/y, x_y]"])
    rows = main(["ablate", "--config", str(REPO / "configs/aog_rcnn/parts_world_scenes.yaml"), "--name", "kw",
                 "--grid", "model.init_args.model_kwargs=[{terminal_rank: 4}]", "--grid", "seed_everything=[0]",
                 "--trainer.fast_dev_run=true", "--data.init_args.num_train=8", "--data.init_args.num_val=8",
                 "--data.init_args.num_test=8"])
    assert len(rows) == 1 and "map_50_mean" in rows[0]
    assert (in_tmp_dir / "checkpoints" / "kw" / point_name(point) / "result.json").is_file()


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_fit_config_works_with_ablate(config: str, in_tmp_dir: Path, cub_root: Path,
                                            image_folder_root: Path, imdb_root: Path, voc_root: Path) -> None:
    rows = main(["ablate", "--config", str(REPO / config), "--name", "grid", "--grid", "seed_everything=[0]",
                 "--trainer.fast_dev_run=true",
                 *dataset_overrides(config, cub_root, image_folder_root, imdb_root, voc_root)])
    assert len(rows) == 1 and rows[0]["seeds"] == 1 and f"{'map_50' if 'aog_rcnn' in config else 'acc'}_mean" in rows[0]


@pytest.mark.parametrize("config", [c for c in FIT_CONFIGS if not c.startswith("configs/baselines/")])
def test_every_family_config_builds_its_declared_twins(config: str, in_tmp_dir: Path, cub_root: Path,
                                                       image_folder_root: Path, imdb_root: Path,
                                                       voc_root: Path) -> None:
    """`compare --config <family config>` builds every twin its System declares with the same data, seed and budget
    (parsed and instantiated here; the family tests train one compare per family end to end)."""
    from zoo.cli.compare import _fit_args, check_same_setting, drop_twins_equal_to_the_model, read_compare_spec
    from zoo.cli.lightning import ZooCLI

    spec = read_compare_spec(REPO / config)
    overrides = dataset_overrides(config, cub_root, image_folder_root, imdb_root, voc_root)
    data_only = [arg for arg in overrides if not arg.startswith("--model.")]  # a twin may be another System class
    clis = {name: ZooCLI(args=_fit_args(name, run, REPO / config, [], data_only if "--model=" in " ".join(
        run.get("args", [])) else overrides), run=False) for name, run in spec["runs"].items()}
    check_same_setting({name: cli.config for name, cli in clis.items()})
    runs = drop_twins_equal_to_the_model(spec["runs"], clis)
    assert len(runs) >= 2, spec  # the family's model and at least one twin
    family, *twins = (clis[name] for name in runs)
    assert all(twin.config.model != family.config.model for twin in twins)  # each twin is another model or loss


def test_compare_evaluates_a_checkpoint_without_training(in_tmp_dir: Path) -> None:
    config = str(REPO / "configs/baselines/parts_world.yaml")
    main(["fit", "--config", config, *SMALL_WORLD, "--trainer.max_epochs=1", "--trainer.logger.init_args.name=src"])
    checkpoint = in_tmp_dir / "checkpoints" / "src" / "checkpoints" / "last.ckpt"
    spec = {"compare": {"name": "from_ckpt", "args": SMALL_WORLD + ["--trainer.max_epochs=1"], "runs": {
        "trained": {"config": config, "checkpoint": str(checkpoint)}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    rows = main(["compare", "--config", "spec.yaml", "--no_explain"])
    saved = torch.load(checkpoint, weights_only=True)
    assert rows[0]["train_samples_per_s"] == "" and rows[0]["acc"] == pytest.approx(
        float(saved["callbacks"][next(k for k in saved["callbacks"] if "val/acc" in k)]["best_model_score"]),
        abs=1e-4)
    wrong = {"compare": {"name": "bad", "args": SMALL_WORLD, "runs": {"icnn": {
        "config": str(REPO / "configs/icnn/parts_world.yaml"), "checkpoint": str(checkpoint)}}}}
    (in_tmp_dir / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    with pytest.raises(ValueError, match="holds baseline_tinycnn with 6 classes .*this run builds icnn_tinycnn"):
        main(["compare", "--config", "wrong.yaml", "--no_explain"])


BF16_CONFIGS = ["configs/icnn/parts_world.yaml", "configs/l2x/xor.yaml", "configs/l2x/digits.yaml",
                "configs/renn/rule_series.yaml", "configs/aog_rcnn/parts_world_scenes.yaml",
                "configs/textual/explanation_label.yaml", "configs/cbm/parts_world.yaml",
                "configs/protopnet/parts_world.yaml", "configs/baselines/parts_world.yaml"]
HALF = (torch.bfloat16, torch.float16)


class RandomDraws(TorchDispatchMode):
    """Records the dtype of every random tensor drawn (uniform, normal, exponential, Bernoulli, ...; multinomial:
    of the probabilities it samples from)."""

    OPS: ClassVar = {getattr(torch.ops.aten, name) for name in (
        "uniform_", "normal_", "exponential_", "bernoulli_", "bernoulli", "rand", "rand_like", "randn", "randn_like",
        "multinomial", "geometric_", "log_normal_", "cauchy_", "normal")}

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.OPS:  # multinomial: the probabilities' dtype (its samples are indices)
            drawn = args[0] if func.overloadpacket is torch.ops.aten.multinomial else out
            self.dtypes.append((str(func), drawn.dtype))
        return out


def half_state(system: torch.nn.Module) -> list[str]:
    """Parameters, buffers and metric states of `system` held in bf16 or float16."""
    from torchmetrics import Metric

    tensors = [*system.named_parameters(), *system.named_buffers()]
    for prefix, metric in system.named_modules():
        if isinstance(metric, Metric):
            for name in metric._defaults:
                value = getattr(metric, name)
                tensors += [(f"{prefix}.{name}", v) for v in (value if isinstance(value, list) else [value])]
    return [name for name, tensor in tensors if torch.is_tensor(tensor) and tensor.dtype in HALF]


# forward outputs whose numerics need float32 under autocast (distances, concept probabilities, selections' scores)
FLOAT32_OUTPUTS = ("concept_logits", "concept_probs", "latent", "min_distances")


def loss_terms(system: Any, batch: Any, autocast: bool) -> tuple[dict[str, torch.Tensor], RandomDraws]:
    """The System's training loss terms on `batch`, seed 0, in float32 or under CPU bf16 autocast, and the random
    draws they took; `draws.outputs` the forward's FLOAT32_OUTPUTS dtypes."""
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), RandomDraws() as draws:
        out = system.forward_batch(batch, "train")
        terms = system.compute_loss(out, batch, "train")
    draws.outputs = {k: out[k].dtype for k in FLOAT32_OUTPUTS if isinstance(out, dict) and torch.is_tensor(out.get(k))}
    return {name: term.float() for name, term in terms.items()}, draws


@pytest.mark.parametrize("config", BF16_CONFIGS)
def test_bf16_autocast_trains_every_family(config: str, in_tmp_dir: Path, cub_root: Path,
                                           image_folder_root: Path) -> None:
    """Every family trains a step under bf16-mixed and keeps its parameters, buffers and metric states out of bf16;
    on one fixed training batch (seed 0) its random draws under bf16 autocast are float32 (L2X's Gumbel noise drawn
    in bf16 lost its tails) and its loss terms agree with the float32 ones within 2 % of the term plus 0.2 % of the
    total loss: bf16 keeps 8 bits (2^-9 relative rounding per op), which the few layers of these models compound to
    at most 0.5 % here (AOG's classifier term); the absolute part covers terms near 0 and REINFORCE's (textual),
    whose sampled sentences change with the logits' rounding (10 % of a term that is 0.6 % of the loss). Precision
    defects that only show in trained models or at large sizes (boxes decoded in bf16, ProtoPNet's bf16 latent) are
    the family tests' (test_aog_rcnn, test_protopnet)."""
    cli = main(["fit", "--config", str(REPO / config), "--trainer.fast_dev_run=true", "--trainer.precision=bf16-mixed",
                *dataset_overrides(config, cub_root, image_folder_root),
                *(["--model.init_args.discriminative_weight=0.2"] if "textual" in config else [])])  # + REINFORCE
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    system = cli.model
    assert not half_state(system)
    batch = next(iter(cli.datamodule.train_dataloader()))
    batch = system.on_after_batch_transfer(system.on_before_batch_transfer(batch, 0), 0)
    system.train()
    exact, _ = loss_terms(system, batch, autocast=False)
    mixed, draws = loss_terms(system, batch, autocast=True)
    assert not half_state(system)
    assert not [(op, dtype) for op, dtype in draws.dtypes if dtype in HALF]
    assert all(dtype == torch.float32 for dtype in draws.outputs.values()), draws.outputs
    assert exact.keys() == mixed.keys()
    total = sum(term.abs() for term in exact.values())
    for name, term in exact.items():
        torch.testing.assert_close(mixed[name], term, rtol=2e-2, atol=2e-3 * float(total), msg=name)


class _NoBf16LstmCpu:
    """torch._VF as seen on a CPU without native bf16 (AVX2 only): an LSTM under CPU bf16 autocast fails in oneDNN."""

    def __getattr__(self, name: str):
        import torch._VF as vf

        return getattr(vf, name)

    @staticmethod
    def lstm(*args, **kwargs):
        import torch._VF as vf

        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")
        return vf.lstm(*args, **kwargs)


@pytest.fixture
def cpu_without_bf16_lstm(monkeypatch: pytest.MonkeyPatch):
    """This process behaves like an AVX2-only CPU for LSTMs; the zoo's probe is re-run against it."""
    import torch.nn.modules.rnn as rnn

    from zoo import layers

    monkeypatch.setattr(rnn, "_VF", _NoBf16LstmCpu())
    layers.cpu_bf16_lstm_supported.cache_clear()
    yield
    layers.cpu_bf16_lstm_supported.cache_clear()


def test_lstm_falls_back_to_float32_on_a_cpu_without_bf16(cpu_without_bf16_lstm: None) -> None:
    from zoo.layers import LSTM, cpu_bf16_lstm_supported

    lstm, x = LSTM(3, 4, batch_first=True), torch.randn(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="primitive descriptor"):  # what torch's own LSTM does there
            torch.nn.LSTM(3, 4, batch_first=True)(x)
        out, (h, c) = lstm(x)
    assert not cpu_bf16_lstm_supported()
    assert out.dtype == h.dtype == c.dtype == torch.float32
    assert torch.equal(out, lstm(x)[0])  # the float32 path is the LSTM without autocast


def test_the_zoo_lstm_is_torchs_lstm() -> None:
    """`zoo.layers.LSTM` (an `nn.RNNBase` in LSTM mode, so that `torch.compile` can read its weights) is `nn.LSTM`:
    the same initial parameters from the same seed, state-dict keys (either loads the other's checkpoint), outputs
    and states bit for bit, with and without an initial state, on a sequence and a packed batch."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from zoo.layers import LSTM

    torch.manual_seed(0)
    ours = LSTM(3, 4, num_layers=2, batch_first=True)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    x, state = torch.randn(2, 5, 3), (torch.randn(2, 2, 4), torch.randn(2, 2, 4))
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    for args in ((x,), (x, state), (packed,)):
        (out, (h, c)), (out_ref, (h_ref, c_ref)) = ours(*args), theirs(*args)
        out, out_ref = (o.data if hasattr(o, "data") else o for o in (out, out_ref))
        assert torch.equal(out, out_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)
    theirs.load_state_dict(LSTM(3, 4, num_layers=2, batch_first=True).state_dict())


@pytest.mark.parametrize("config", ["configs/textual/explanation_label.yaml",
                                    "configs/baselines/rule_series_lstm.yaml"])
def test_bf16_autocast_trains_lstm_models_on_a_cpu_without_bf16(config: str, in_tmp_dir: Path,
                                                                 cpu_without_bf16_lstm: None) -> None:
    textual = [*SMALL_WORLD, *SMALL_EXPLANATION, "--model.init_args.discriminative_weight=0.2"]  # + REINFORCE
    cli = main(["fit", "--config", str(REPO / config), "--trainer.fast_dev_run=true", "--trainer.precision=bf16-mixed",
                *(textual if "textual" in config
                  else ["--data.init_args.num_train=64", "--data.init_args.num_val=32"])])
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_ablate_reruns_a_point_whose_settings_changed(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A finished point is keyed by its resolved settings: another max_epochs under the same name runs it again
    (the old run is kept under stale/), the same settings reuse it and say so."""
    args = ["ablate", "--config", str(REPO / "configs/baselines/parts_world.yaml"), "--name", "stale",
            "--grid", "seed_everything=[0]", *SMALL_WORLD, "--trainer.limit_val_batches=1"]
    main([*args, "--trainer.max_epochs=1"])
    point = in_tmp_dir / "checkpoints" / "stale" / "seed_everything=0"
    first = json.loads((point / "result.json").read_text())
    capsys.readouterr()
    main([*args, "--trainer.max_epochs=2"])
    second = json.loads((point / "result.json").read_text())
    assert "settings changed since its last run; run again" in capsys.readouterr().out
    assert second["settings_sha256"] != first["settings_sha256"]
    assert torch.load(point / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # two epochs, not one
    assert list((in_tmp_dir / "checkpoints" / "stale" / "stale").glob("seed_everything=0-*/result.json"))
    main([*args, "--trainer.max_epochs=2"])
    assert "point seed_everything=0: finished with the same settings, reused" in capsys.readouterr().out
    assert json.loads((point / "result.json").read_text()) == second
    events = list((in_tmp_dir / "checkpoints" / "stale" / "hparams").rglob("events.out.tfevents.*"))
    assert len(events) == 1  # the rerun replaced the point's HPARAMS entry


def test_compare_accepts_a_runs_saved_config_and_a_name(in_tmp_dir: Path) -> None:
    """A run's own config.yaml (with fit's ckpt_path) is a compare run's config; --name picks the report folder."""
    config = str(REPO / "configs/baselines/parts_world.yaml")
    main(["fit", "--config", config, *SMALL_WORLD, "--trainer.max_epochs=1", "--trainer.logger.init_args.name=src"])
    run = in_tmp_dir / "checkpoints" / "src"
    assert "ckpt_path" in yaml.safe_load((run / "config.yaml").read_text())
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    spec = {"compare": {"name": "spec_name", "args": SMALL_WORLD + ["--trainer.max_epochs=1"], "runs": {
        "from_config": {"config": config, "checkpoint": checkpoint},
        "from_saved_config": {"config": str(run / "config.yaml"), "checkpoint": checkpoint}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    rows = main(["compare", "--config", "spec.yaml", "--no_explain", "--name", "my_compare"])
    assert rows[0]["acc"] == rows[1]["acc"]
    assert (in_tmp_dir / "checkpoints" / "my_compare" / "report.md").is_file()
    assert not (in_tmp_dir / "checkpoints" / "spec_name").exists()


def test_compare_starts_every_run_from_the_same_seed(in_tmp_dir: Path) -> None:
    """Two identical runs give identical results whatever ran before: the seed is set again before each fit."""
    config = str(REPO / "configs/baselines/parts_world.yaml")
    spec = {"compare": {"name": "same", "args": [*SMALL_WORLD, "--trainer.max_epochs=1"],
                        "runs": {"first": {"config": config}, "second": {"config": config}}}}
    (in_tmp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    first, second = main(["compare", "--config", "spec.yaml", "--no_explain"])
    assert first["acc"] == second["acc"]
    weights = [torch.load(in_tmp_dir / "checkpoints" / "same" / name / "checkpoints" / "last.ckpt",
                          weights_only=True)["state_dict"] for name in ("first", "second")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_help_lists_compare_and_ablate_with_examples(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    printed = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "compare", "ablate"):
        assert re.search(rf"^  {command}\b", printed, re.M), command
    assert "python train.py compare --config" in printed and "python train.py ablate --config" in printed


def test_a_wrong_data_path_is_said_once_without_a_traceback(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from datamodules._base import DatasetLayoutError
    from train import command_line

    args = ["fit", "--config", str(REPO / "configs/baselines/image_folder.yaml"), "--data.init_args.root=missing"]
    with pytest.raises(DatasetLayoutError, match="ImageFolder root 'missing' does not exist") as raised:
        main(args)  # from Python: the datamodule's own error, not jsonargparse's wrapper around it
    assert raised.value.__cause__ is None
    with pytest.raises(SystemExit) as exit_info:
        command_line(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("does not exist") == 1 and "Traceback" not in error and "NoneType" not in error
    assert error.startswith("train.py: error: ImageFolder root 'missing' does not exist.")


def test_mistyped_options_and_yaml_keys_get_a_did_you_mean(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = REPO / "configs/icnn/parts_world.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.loss.init_args.wieght=1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Option 'wieght' is not accepted" in error
    assert "did you mean 'weight'?" in error and "NoneType" not in error and "Given value" not in error
    assert len(error.splitlines()) < 12  # the message, not LightningCLI's usage of every option
    with pytest.raises(SystemExit):  # an argument of a class the config gives by class_path (the optimizer)
        main(["fit", "--config", str(config), "--model.init_args.optimizer.init_args.wieght_decay=1"])
    assert "did you mean 'weight_decay'?" in capsys.readouterr().err
    (in_tmp_dir / "typo.yaml").write_text(config.read_text().replace("max_epochs", "max_epoch"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", "typo.yaml"])
    error = capsys.readouterr().err
    assert "did you mean 'trainer.max_epochs'?" in error and "the key 'trainer.max_epoch' is in typo.yaml" in error
    (in_tmp_dir / "loss_typo.yaml").write_text(config.read_text().replace("{weight: 1.0", "{wieght: 1.0"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", "loss_typo.yaml"])
    error = capsys.readouterr().err
    assert "did you mean 'weight'?" in error and "the key 'wieght' is in loss_typo.yaml" in error
    (in_tmp_dir / "sub").mkdir()  # a config in a subfolder: jsonargparse parses it from inside that folder
    (in_tmp_dir / "sub" / "loss_typo.yaml").write_text((in_tmp_dir / "loss_typo.yaml").read_text())
    with pytest.raises(SystemExit):
        main(["fit", "--config", "sub/loss_typo.yaml"])
    assert "the key 'wieght' is in sub/loss_typo.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a prefix of an option: a typo too, not argparse's abbreviation
        main(["fit", "--config", str(config), "--trainer.max_epoch", "1", "--trainer.fast_dev_run=true"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: --trainer.max_epoch" in error
    assert "did you mean '--trainer.max_epochs'?" in error
    with pytest.raises(SystemExit) as exit_info:  # a key of the config given as a top-level option: its full name
        main(["fit", "--config", str(config), "--batch_size", "16"])  # (was "the key 'batch_size' is in <config>")
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "did you mean '--data.init_args.batch_size'?" in error
    assert "is in" not in error, error


def test_a_bad_compare_spec_is_said_once(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from train import command_line

    (in_tmp_dir / "empty_runs.yaml").write_text("compare: {runs: {}}\n")
    with pytest.raises(SystemExit) as exit_info:
        command_line(["compare", "--config", "empty_runs.yaml"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("is not a compare spec") == 1 and "Traceback" not in error


def test_validate_test_and_predict_keep_the_runs_config(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Only fit writes a run's config.yaml. validate / predict rewrote it with their own defaults and options
    (`verbose`, `return_predictions`), after which every command refused it; a checkpoint of another class count
    or a missing checkpoint file is said once, exit status 2, not as a traceback."""
    from train import command_line

    main(["fit", "--config", str(REPO / "configs/baselines/parts_world.yaml"), *SMALL_WORLD, "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    saved = (run / "config.yaml").read_text()
    again = ["--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    for command in ("validate", "predict", "test", "validate"):
        main([command, *again])
        assert (run / "config.yaml").read_text() == saved, command
    assert "limit_train_batches: 2" in saved and "\nverbose:" not in saved  # validate's top-level option
    for wrong, message in ((["--data.init_args.num_classes=4"], "holds baseline_tinycnn with 6 classes"),
                           ([f"--ckpt_path={run / 'nowhere.ckpt'}"], "nowhere.ckpt' does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            command_line(["validate", *again, *wrong])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and "Traceback" not in error, message


def test_a_textual_run_is_tested_from_its_own_config_and_checkpoint(in_tmp_dir: Path) -> None:
    """A variant System's checkpoint names its model after the variant (textual_<variant>): `--ckpt_path` compared
    it with the config's unused model_name and refused every textual checkpoint. And `test` logs ROUGE-L, whose
    test copy PyTorch could not see (torchmetrics' ROUGEScore hashed equal copies alike)."""
    main(["fit", "--config", str(REPO / "configs/textual/explanation_label.yaml"), *SMALL_EXPLANATION, *SMALL_WORLD,
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.logger.init_args.name=words"])
    run = in_tmp_dir / "checkpoints" / "words"
    results = main(["test", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                    "--trainer.limit_test_batches=1"]).trainer.callback_metrics
    assert "test/rouge_l" in results and "test/cider_d" in results


def test_metric_copies_that_pytorch_cannot_tell_apart_are_refused() -> None:
    from torchmetrics.text.rouge import ROUGEScore

    from zoo.baselines.system import ClassifierSystem

    system = ClassifierSystem(num_classes=2)
    with pytest.raises(TypeError, match="ROUGEScore's copies hash and compare equal"):
        system.add_metric("rouge", ROUGEScore(rouge_keys="rougeL"))


def test_mistyped_commands_options_and_model_arguments_get_a_did_you_mean(capsys: pytest.CaptureFixture) -> None:
    from train import command_line

    for args, message in ((["compar", "--config", "x.yaml"], "unknown command 'compar'; did you mean 'compare'?"),
                          ([], "give a command first: fit, validate, test, predict, compare, ablate"),
                          (["compare", "--config", "x.yaml", "--no_explian"],
                           "unknown option '--no_explian'; did you mean '--no_explain'?")):
        with pytest.raises(SystemExit) as exit_info:
            command_line(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args
    with pytest.raises(ValueError, match="icnn_tinycnn: unknown argument 'tau_scal' .*Did you mean 'tau_scale'"):
        zoo.create_model("icnn_tinycnn", tau_scal=8)  # model_kwargs is a free mapping: its keys are checked here
    with pytest.raises(ValueError, match="l2x_vector: unknown argument 'kk' .*Did you mean 'k'"):
        zoo.create_model("l2x_vector", kk=3)


def test_late_configuration_mistakes_keep_their_message(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A model_kwargs typo lost its did-you-mean under the CLI (its root cause was the bare TypeError); `mean:
    pretrained` on a backbone without a timm config printed a traceback; model_kwargs did not win num_classes."""
    from train import command_line
    from zoo.registry import create_model_for_data

    config = str(REPO / "configs/icnn/parts_world.yaml")
    for args, message in ((["--model.init_args.model_kwargs.tau_scal=3"], "Did you mean 'tau_scale'?"),
                          (["--data.init_args.mean=pretrained"], "no timm pretrained config with a mean and std")):
        with pytest.raises(SystemExit) as exit_info:
            command_line(["fit", "--config", config, "--trainer.fast_dev_run=true", *SMALL_WORLD, *args])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and "Traceback" not in error, message
    assert create_model_for_data("baseline_tinycnn", 6, 3, None, None, {"num_classes": 10}).num_classes == 10


def test_model_kwargs_set_to_null_are_checked_by_name(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`{pretrained_path:w.pth, freeze_backbone:true}` (no space after the colons) is YAML for two keys set to null:
    create_model dropped every None before any name was checked, so the fine-tune trained from random weights,
    unfrozen, and exited 0; a mistyped name set to null passed too. Under a config with model_kwargs (ICNN's) the
    key, split at its dot, reached the factory and its TypeError lost the did-you-mean."""
    from train import command_line
    from zoo.baselines.system import ClassifierSystem

    for config in ("configs/baselines/parts_world.yaml", "configs/icnn/parts_world.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            command_line(["fit", "--config", str(REPO / config), "--trainer.fast_dev_run=true", *SMALL_WORLD,
                          "--model.init_args.model_kwargs={pretrained_path:w.pth, freeze_backbone:true}"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in error, (config, error)
        assert "is no argument name (model_kwargs). YAML reads `{a:b}` as one key" in error, (config, error)
    with pytest.raises(ValueError, match="unknown argument 'freeze_bakbone' .*Did you mean 'freeze_backbone'"):
        zoo.create_model("baseline_tinycnn", freeze_bakbone=None)
    with pytest.raises(ValueError, match="unknown argument 'pretrained_pth' .*Did you mean 'pretrained_path'"):
        ClassifierSystem("baseline_tinycnn", num_classes=6, model_kwargs={"pretrained_pth": None})
    assert zoo.create_model("baseline_tinycnn", drop_rate=None, pretrained_path=None).num_classes > 0  # defaults
    # None for what a family's helper takes beyond the factory and its class (textual's encoder settings): defaults
    assert zoo.create_model("textual_explanation", encoder=None, encoder_kwargs=None, in_chans=None) is not None


def test_a_checkpoint_trained_with_a_null_yaml_typo_still_loads(tmp_path: Path) -> None:
    """A run trained before such keys were refused saved model_kwargs {'drop_rate:0.2': None} (its model built with
    the defaults): load_checkpoint / export refused its valid weights with advice about a YAML file."""
    import pytorch_lightning as pl

    from zoo.baselines.system import ClassifierSystem

    system = ClassifierSystem("baseline_tinycnn", num_classes=6)
    hparams = {**system.hparams, "model_kwargs": {"drop_rate:0.2": None, "freeze_bakbone": None},
               "_class_path": "zoo.baselines.system.ClassifierSystem"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": pl.__version__}, path)
    with pytest.warns(UserWarning, match=r"saved model_kwargs hold \['drop_rate:0.2', 'freeze_bakbone'\] set to "
                                         r"null.*rebuilt with its defaults"):
        model = zoo.load_checkpoint(path)
    assert torch.equal(model.state_dict()["head.fc.weight"], system.model.state_dict()["head.fc.weight"])


def test_timm_habits_get_an_answer() -> None:
    """pretrained=False is what the zoo does anyway; pretrained=True and reset_classifier(0) are refused by name."""
    assert zoo.create_model("baseline_tinycnn", pretrained=False).num_classes > 0
    with pytest.raises(ValueError, match="pretrained=True would download weights.*pretrained_path"):
        zoo.create_model("baseline_tinycnn", pretrained=True)
    for name in ("baseline_tinycnn", "icnn_tinycnn", "protopnet_tinycnn", "cbm_tinycnn", "renn_series"):
        with pytest.raises(ValueError, match="reset_classifier needs num_classes >= 1; got 0"):
            zoo.create_model(name, num_classes=3).reset_classifier(0)


def test_a_run_stopped_by_sigterm_exits_143_not_0(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Lightning ends a SIGTERMed fit with a bare SystemExit (status 0): a batch script or scheduler took the
    preempted run for a finished one."""
    from train import command_line

    args = ["fit", "--config", str(REPO / "configs/baselines/parts_world.yaml"), "--data.init_args.num_train=64",
            "--data.init_args.num_val=16", "--data.init_args.batch_size=16", "--trainer.max_epochs=2",
            "--trainer.logger=false", "--trainer.callbacks+=tests.helpers.TermAtStep", "--trainer.callbacks.step=2"]
    with pytest.raises(SystemExit) as exit_info:
        command_line(args)
    assert exit_info.value.code == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_a_mistyped_first_part_of_a_nested_option_gets_the_full_option(in_tmp_dir: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """`--model.init_args.los.init_args.weight` was refused inside the model's class_path as "unrecognized arguments:
    --los.init_args.weight=0", matched against the top-level options: no suggestion. Its first part is matched among
    the class's init arguments, as "Option 'los' is not accepted" is, and the whole option is suggested; the same
    for an ablate --grid key (each point is parsed as a fit) and a class's arguments listed where none is close."""
    config = str(REPO / "configs/icnn/parts_world.yaml")
    for args, message in (
            (["fit", "--config", config, "--model.init_args.los.init_args.weight=0"],
             "did you mean '--model.init_args.loss.init_args.weight'?"),
            (["fit", "--config", config, "--model.init_args.optimiser.init_args.lr=0.1"],
             "did you mean '--model.init_args.optimizer.init_args.lr'?"),
            (["fit", "--config", config, "--model.init_args.xyzzy.init_args.lr=0.1"],
             "(ICNNSystem accepts model_name, part_maps_key, "),
            (["ablate", "--config", config, "--grid", "model.init_args.los.init_args.weight=[0,1]"],
             "did you mean '--model.init_args.loss.init_args.weight'?")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error, (args, error)


def test_a_model_setting_the_data_replaces_is_refused_when_it_differs(in_tmp_dir: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit --model.init_args.num_classes=10` on 6-class data trained 6 classes, silently (the data's value replaces
    a linked setting), and an ablate grid over it trained one setting as two rows. A value the data agrees with, or
    none given (the System's default differs), goes on to the fit."""
    from tests.test_checkpoint_config import refused
    from zoo.cli.lightning import ZooCLI

    args = ["fit", "--config", str(REPO / "configs/baselines/parts_world.yaml"), "--data.init_args.num_train=16",
            "--data.init_args.num_val=8"]
    error = refused(capsys, [*args, "--model.init_args.num_classes=10"])
    assert "fit: --model.init_args.num_classes=10 would be ignored: the model's num_classes comes from the data " \
           "(its datamodule's num_classes: 6)" in error and "--data.init_args.num_classes" in error, error
    config = in_tmp_dir / "names.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"class_names": list("abcdef")}}}))
    error = refused(capsys, [*args, "--config", str(config)])
    assert "--model.init_args.class_names=" in error and "comes from the data" in error, error
    assert not (in_tmp_dir / "checkpoints").exists()  # refused before any run folder is made
    # compare runs and ablate points are built without a subcommand: the same refusal, before anything trains
    with pytest.raises(ValueError, match="--model.init_args.num_classes=10 would be ignored"):
        ZooCLI(args=[*args[1:], "--model.init_args.num_classes=10"], run=False)
    error = refused(capsys, ["ablate", *args[1:], "--model.init_args.num_classes=10", "--name", "a",
                             "--grid", "model.init_args.optimizer.init_args.lr=[0.01,0.02]"])
    assert "--model.init_args.num_classes=10 would be ignored" in error, error
    assert not (in_tmp_dir / "checkpoints" / "a").exists()

    class Reached(Exception):
        pass

    def reached(self: ZooCLI) -> None:
        raise Reached(self.model.hparams.num_classes)

    monkeypatch.setattr(ZooCLI, "before_fit", reached)
    for given in (["--model.init_args.num_classes=6"], []):
        with pytest.raises(Reached, match="6"):
            main([*args, *given])
