"""interpretable-zoo command line.

    python train.py fit --config configs/baselines/parts_world.yaml        # LightningCLI: fit/validate/test/predict
    python train.py compare --config configs/quickstart.yaml               # interpretable vs opaque twin, one table
    python train.py ablate --config configs/icnn/parts_world.yaml --grid model.init_args.loss.init_args.weight=[0,1]

Every run lives in checkpoints/<run>/ (the logger's name): TensorBoard events, config.yaml (the resolved
config), and checkpoints/ with last.ckpt and the best checkpoint by validation accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from zoo.callbacks import LatestCheckpoint, RNGStateCallback

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "checkpoints",
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "checkpoints", "name": "default", "version": ""},
    },
}


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: any LightningModule/DataModule by class_path, the datamodule's
    `num_classes`, `num_channels` and `image_size` linked into the model, a best+last ModelCheckpoint, seed 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(RNGStateCallback, "rng_state")  # resumed runs draw what the dead one would
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")  # last.ckpt after every validation
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,  # last.ckpt comes from LatestCheckpoint, refreshed every validation
            "checkpoint.filename": "best-epoch{epoch}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.init_args.in_chans", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
        parser.link_arguments("data.model_inputs", "model.init_args.data_inputs", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Lightning copies a `--ckpt_path` checkpoint's hyperparameters over the config; refuse first, naming both,
        a checkpoint of another System or model (else the run would silently rebuild the checkpoint's model and
        pair it with this config's loss)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            from zoo.checkpointing import check_config_fits_checkpoint, read_checkpoint

            check_config_fits_checkpoint(self.config[subcommand].get("model"), read_checkpoint(ckpt_path),
                                         f"--ckpt_path {ckpt_path!r}")
        super()._parse_ckpt_path()


# ----------------------------------------------------------------------------------------------------- compare
COMPARE_HELP = """\
--config takes a family config (it is compared with its opaque twin: its loss weight set to 0) or a compare spec,
a YAML file with one top-level key:

compare:
  name: quickstart                      # report folder: checkpoints/<name>/
  args: ["--trainer.max_epochs=6"]      # overrides shared by every run
  runs:
    icnn: {config: configs/icnn/parts_world.yaml}
    opaque_twin: {config: configs/icnn/parts_world.yaml, args: ["--model.init_args.loss...weight=0"]}
    trained: {config: ..., checkpoint: checkpoints/x/checkpoints/last.ckpt}   # evaluate, do not train
  explain:                              # optional: explainers scored on the first validation images
    methods: [cam, saliency, integrated_gradients, layer_gradcam, occlusion]
    num_images: 32
    step: 128                           # pixels per deletion/insertion step
"""
BUDGET_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches", "fast_dev_run")


TWIN_OVERRIDE = "--model.init_args.loss.init_args.weight=0"


def read_compare_spec(path: str | Path) -> dict[str, Any]:
    """A compare spec, or for a fit config the implied one: the config against its opaque twin (the family loss's
    `weight` set to 0, which family losses define as the twin's objective)."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if "compare" not in spec:
        loss = (((spec.get("model") or {}).get("init_args") or {}).get("loss") or {})
        if "weight" not in (loss.get("init_args") or {}):
            raise ValueError(f"{path} is neither a compare spec nor a config whose loss has a family `weight` to "
                             f"set to 0 for the opaque twin.\n{COMPARE_HELP}")
        return {"name": f"{Path(path).stem}_compare", "runs": {
            "interpretable": {"config": str(path)}, "opaque_twin": {"config": str(path), "args": [TWIN_OVERRIDE]}}}
    if not isinstance(spec.get("compare"), dict) or not spec["compare"].get("runs"):
        raise ValueError(f"{path} is not a compare spec.\n{COMPARE_HELP}")
    return spec["compare"]


def resolve_config(path: str, spec_path: Path) -> Path:
    """A run's config path: as given (from the working directory), else relative to a folder above the spec."""
    for candidate in (Path(path), *(folder / path for folder in spec_path.resolve().parents)):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"compare spec {spec_path} names config {path!r}, found neither in the working "
                            f"directory nor relative to a folder above the spec.")


def _fit_args(run_name: str, run: dict[str, Any], spec_path: Path, common: list[str], extra: list[str]) -> list[str]:
    if "config" not in run:
        raise ValueError(f"compare run {run_name!r} names no config.\n{COMPARE_HELP}")
    return ["--config", str(resolve_config(run["config"], spec_path)), *common, *run.get("args", []), *extra]


def load_system_weights(system: pl.LightningModule, path: str) -> None:
    """Weights of a Lightning checkpoint into `system` (weights_only=True); any key mismatch is named."""
    from zoo._io import CheckpointError, read_state_dict
    from zoo.checkpointing import read_checkpoint
    from zoo.systems import check_checkpoint_fits

    check_checkpoint_fits(system, read_checkpoint(path), f"checkpoint {path!r}")
    state = read_state_dict(path)
    missing, unexpected = system.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path!r} does not fit {type(system).__name__}({system.hparams.get('model_name')}): "
                              f"missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}.")


def check_same_setting(configs: dict[str, Any]) -> None:
    """Runs must share data, seed and training budget, or the comparison says nothing."""
    reference_name, reference = next(iter(configs.items()))
    for name, config in configs.items():
        for key, value, expected in (
            ("data", config.data, reference.data),
            ("seed_everything", config.seed_everything, reference.seed_everything),
            *((f"trainer.{k}", config.trainer.get(k), reference.trainer.get(k)) for k in BUDGET_KEYS),
        ):
            if value != expected:
                raise ValueError(f"compare runs {reference_name!r} and {name!r} differ in {key}: {expected} vs "
                                 f"{value}. Same data, seed and budget are required; set it in the shared args.")


def compare(spec_path: str, extra: list[str], explain_images: int | None = None,
            explain: bool = True) -> list[dict[str, Any]]:
    """Train every run of a compare spec with the same data, seed and budget; evaluate; write report.md/.csv."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # compare builds its own args
    spec = read_compare_spec(spec_path)
    explain_settings = dict(spec.get("explain") or {})
    if explain_images is not None:
        explain_settings["num_images"] = explain_images
    name, common = spec.get("name", Path(spec_path).stem), list(spec.get("args", []))
    runs = spec["runs"]
    clis = {run_name: ZooCLI(args=_fit_args(run_name, run, Path(spec_path), common,
                                            [*extra, f"--trainer.logger.init_args.name={name}/{run_name}"]), run=False)
            for run_name, run in runs.items()}
    check_same_setting({run_name: cli.config for run_name, cli in clis.items()})  # before any training starts
    rows: list[dict[str, Any]] = []
    explanation_rows: list[dict[str, Any]] = []
    for run_name, run in runs.items():
        cli = clis[run_name]
        start = time.perf_counter()
        if run.get("checkpoint"):  # evaluate trained weights instead of training
            load_system_weights(cli.model, run["checkpoint"])
            cli.datamodule.setup("validate")
        else:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        train_samples = cli.trainer.global_step * cli.datamodule.batch_size
        start = time.perf_counter()
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        val_seconds = time.perf_counter() - start
        if explain and hasattr(cli.model, "input_key"):  # image classifiers; detectors report part IoU instead
            explained, maps, images = explain_run(cli, explain_settings)
            explanation_rows += [{"run": run_name, **row} for row in explained]
            save_explanation_figure(Path("checkpoints") / name / f"explanations_{run_name}.png", images, maps)
        rows.append({
            "run": run_name,
            "model": cli.model.hparams.get("model_name", type(cli.model).__name__),
            **{k.removeprefix("val/"): round(float(v), 4) for k, v in sorted(metrics.items())
               if not k.startswith("val/loss")},
            "train_samples_per_s": round(train_samples / fit_seconds, 1) if train_samples else "",
            "infer_samples_per_s": round(len(cli.datamodule.splits["val"]) / val_seconds, 1),
        })
    folder = Path("checkpoints") / name
    tables = {"models": rows, **({"explanations": explanation_rows} if explanation_rows else {})}
    write_report(folder, tables)
    return rows


def explain_run(cli: LightningCLI, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], dict, torch.Tensor]:
    """Score the run's explainers on the first `num_images` validation images (the same images for every run);
    returns the score rows, the saliency maps by method and the images."""
    from metrics.explanations import DEFAULT_METHODS, score_explanations

    dataset = cli.datamodule.splits["val"]
    count = min(int(settings.get("num_images", 32)), len(dataset))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(count)])
    model = cli.model.model
    images = batch[cli.model.input_key].to(cli.model.device)
    rows, maps = score_explanations(model, images, batch[cli.model.target_key].to(cli.model.device),
                                    batch.get("part_masks"), settings.get("methods", DEFAULT_METHODS),
                                    int(settings.get("step", 128)))
    return rows, maps, images


def save_explanation_figure(path: Path, images: torch.Tensor, maps: dict[str, torch.Tensor], count: int = 6) -> None:
    """One row per explainer over the first `count` images (red = important)."""
    from torchvision.utils import save_image

    from zoo.callbacks import heatmap_overlay

    images = images[:count].float().cpu()
    saliency = torch.stack([m[:count].float().cpu() for m in maps.values()])  # (M, N, H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(heatmap_overlay(images, saliency).flatten(0, 1), path, nrow=len(images))
    path.with_suffix(".md").write_text("rows, top to bottom: " + ", ".join(maps) + "\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of dict rows, columns in first-seen key order (reports and benchmark scripts)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows])


def write_report(folder: Path, tables: dict[str, list[dict[str, Any]]], stem: str = "report") -> None:
    """<stem>.md (one section per table), <stem>.csv (the first table) and <table>.csv; tables printed."""
    from rich.console import Console
    from rich.table import Table

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for index, (title, rows) in enumerate(tables.items()):
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for path in dict.fromkeys(([folder / f"{stem}.csv"] if index == 0 else []) + [folder / f"{title}.csv"]):
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(rows)
        sections.append(f"## {title}\n\n{markdown_table(rows)}")
        table = Table(title=f"{folder}: {title}")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row.get(c, "")) for c in columns))
        Console().print(table)
    (folder / f"{stem}.md").write_text("\n\n".join(sections) + "\n")


# ------------------------------------------------------------------------------------------------------ ablate
ABLATE_HELP = """\
python train.py ablate --config configs/icnn/parts_world.yaml --name icnn_lambda \\
    --grid model.init_args.loss.init_args.weight=[0,1,10] --grid seed_everything=[0,1] [fit overrides ...]

Each grid point is one fit in checkpoints/<name>/<point>/; a finished point keeps result.json and is skipped when
the same command runs again, an interrupted one resumes from its last.ckpt. The table averages every metric over
seed_everything (mean +- std) and goes to checkpoints/<name>/ablation.{md,csv}, with TensorBoard hparams.
"""
SEED_KEY = "seed_everything"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["key=[v1,v2]", ...] -> {key: [v1, v2]} (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        parsed = yaml.safe_load(values) if sep else None
        if not sep or not isinstance(parsed, list) or not parsed:
            raise ValueError(f"--grid takes key=[v1,v2,...]; got {item!r}.\n{ABLATE_HELP}")
        grid[key] = parsed
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values; refuses two points that would share a folder (see point_name)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        points = [{**point, key: value} for point in points for value in values]
    names = [point_name(point) for point in points]
    if len(set(names)) < len(names):
        clash = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"two grid points would share the folder {clash!r}: their values differ only in characters "
                         f"that point names replace with '_'; make the values distinct.")
    return points


def point_name(point: dict[str, Any]) -> str:
    """A folder (and logger) name for a grid point: the last part of each key with its value, mappings written as
    key-value pairs; characters unsafe in a path or in a YAML scalar (the logger name is parsed) become "_"."""
    def text(value: Any) -> str:
        return "+".join(f"{k}-{text(v)}" for k, v in value.items()) if isinstance(value, dict) else str(value)

    name = ",".join(f"{key.rsplit('.', 1)[-1]}={text(value)}" for key, value in point.items())
    return re.sub(r"[^\w.=,+-]", "_", name)


def run_grid_point(config: str, name: str, point: dict[str, Any], extra: list[str]) -> dict[str, float]:
    """Fit one grid point (resuming from its last.ckpt), validate, and store result.json atomically."""
    folder = Path("checkpoints") / name / point_name(point)
    result_path = folder / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())["metrics"]
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in point.items()]
    logger = f"--trainer.logger.init_args.name={name}/{point_name(point)}"
    cli = ZooCLI(args=["--config", config, *overrides, *extra, logger], run=False)
    last = folder / "checkpoints" / "last.ckpt"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    metrics = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if not k.startswith("val/loss")}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"point": point, "metrics": metrics}, indent=1))
    os.replace(tmp, result_path)  # atomic: a killed run leaves no half-written result
    return metrics


def summarise(results: list[tuple[dict[str, Any], dict[str, float]]]) -> list[dict[str, Any]]:
    """Group grid points that differ only in the seed; mean +- std of every metric."""
    groups: dict[tuple, list[dict[str, float]]] = {}
    settings: dict[tuple, dict[str, Any]] = {}
    for point, metrics in results:
        setting = {k: v for k, v in point.items() if k != SEED_KEY}
        key = tuple(sorted((k, str(v)) for k, v in setting.items()))
        groups.setdefault(key, []).append(metrics)
        settings[key] = setting
    rows = []
    for key, runs in groups.items():
        row: dict[str, Any] = {k.rsplit(".", 1)[-1]: v for k, v in settings[key].items()}
        row["seeds"] = len(runs)
        for metric in dict.fromkeys(m for run in runs for m in run):
            values = torch.tensor([run[metric] for run in runs if metric in run])
            std = values.std().item() if len(values) > 1 else 0.0
            row[metric] = f"{values.mean().item():.4f} +- {std:.4f}"
        rows.append(row)
    return rows


def ablate(config: str, grid_items: list[str], name: str, extra: list[str]) -> list[dict[str, Any]]:
    """Run every grid point (skipping finished ones), write the table and TensorBoard hparams."""
    from torch.utils.tensorboard import SummaryWriter

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    grid = parse_grid(grid_items)
    results = [(point, run_grid_point(config, name, point, extra)) for point in grid_points(grid)]
    folder = Path("checkpoints") / name
    with SummaryWriter(str(folder / "hparams")) as writer:
        for point, metrics in results:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in point.items()}
            writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=point_name(point))
    rows = summarise(results)
    write_report(folder, {"ablation": rows}, stem="ablation")
    return rows


def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "compare":
        parser = argparse.ArgumentParser(prog="train.py compare", epilog=COMPARE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, help="compare spec YAML")
        parser.add_argument("--explain_images", type=int, help="override explain.num_images of the spec")
        parser.add_argument("--no_explain", action="store_true", help="skip the explainers")
        known, extra = parser.parse_known_args(argv[1:])
        return compare(known.config, extra, explain_images=known.explain_images, explain=not known.no_explain)
    if argv and argv[0] == "ablate":
        parser = argparse.ArgumentParser(prog="train.py ablate", epilog=ABLATE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, help="a fit config")
        parser.add_argument("--grid", action="append", required=True, help="key=[v1,v2,...]; repeat for axes")
        parser.add_argument("--name", help="folder under checkpoints/ (default: <config stem>_ablation)")
        known, extra = parser.parse_known_args(argv[1:])
        return ablate(known.config, known.grid, known.name or f"{Path(known.config).stem}_ablation", extra)
    return ZooCLI(args=args)


if __name__ == "__main__":
    main()
