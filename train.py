"""interpretable-zoo command line.

    python train.py fit --config configs/baselines/parts_world.yaml        # LightningCLI: fit/validate/test/predict
    python train.py compare --config configs/quickstart.yaml               # interpretable vs opaque twin, one table

Every run lives in checkpoints/<run>/ (the logger's name): TensorBoard events, config.yaml (the resolved
config), and checkpoints/ with last.ckpt and the best checkpoint by validation accuracy.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

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
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.init_args.in_chans", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")


# ----------------------------------------------------------------------------------------------------- compare
COMPARE_HELP = """\
A compare spec is a YAML file with one top-level key:

compare:
  name: quickstart                      # report folder: checkpoints/<name>/
  args: ["--trainer.max_epochs=6"]      # overrides shared by every run
  runs:
    icnn: {config: configs/icnn/parts_world.yaml}
    opaque_twin: {config: configs/icnn/parts_world.yaml, args: ["--model.init_args.loss...weight=0"]}
"""
BUDGET_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches", "fast_dev_run")


def read_compare_spec(path: str | Path) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(spec.get("compare"), dict) or not spec["compare"].get("runs"):
        raise ValueError(f"{path} is not a compare spec.\n{COMPARE_HELP}")
    return spec["compare"]


def resolve_config(path: str, spec_path: Path) -> Path:
    """A run's config path: as given (from the working directory), else beside the spec or one folder up."""
    for candidate in (Path(path), spec_path.parent / path, spec_path.parent.parent / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"compare spec {spec_path} names config {path!r}, found neither in the working "
                            f"directory nor beside the spec.")


def _fit_args(run_name: str, run: dict[str, Any], spec_path: Path, common: list[str], extra: list[str]) -> list[str]:
    if "config" not in run:
        raise ValueError(f"compare run {run_name!r} names no config.\n{COMPARE_HELP}")
    return ["--config", str(resolve_config(run["config"], spec_path)), *common, *run.get("args", []), *extra]


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


def compare(spec_path: str, extra: list[str]) -> list[dict[str, Any]]:
    """Train every run of a compare spec with the same data, seed and budget; evaluate; write report.md/.csv."""
    spec = read_compare_spec(spec_path)
    name, common = spec.get("name", Path(spec_path).stem), list(spec.get("args", []))
    runs = spec["runs"]
    parsed = {}
    for run_name, run in runs.items():
        cli = ZooCLI(args=_fit_args(run_name, run, Path(spec_path), common, extra), run=False)
        parsed[run_name] = cli.config
    check_same_setting(parsed)
    rows = []
    for run_name, run in runs.items():
        logger_name = f"--trainer.logger.init_args.name={name}/{run_name}"
        cli = ZooCLI(args=_fit_args(run_name, run, Path(spec_path), common, [*extra, logger_name]), run=False)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        train_samples = cli.trainer.global_step * cli.datamodule.batch_size
        start = time.perf_counter()
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        val_seconds = time.perf_counter() - start
        rows.append({
            "run": run_name,
            "model": cli.model.hparams.get("model_name", type(cli.model).__name__),
            **{k.removeprefix("val/"): round(float(v), 4) for k, v in sorted(metrics.items())},
            "train_samples_per_s": round(train_samples / fit_seconds, 1),
            "infer_samples_per_s": round(len(cli.datamodule.splits["val"]) / val_seconds, 1),
        })
    write_report(Path("checkpoints") / name, rows)
    return rows


def write_report(folder: Path, rows: list[dict[str, Any]]) -> None:
    """report.csv and report.md in `folder`, and the table printed."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compare: {folder}")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console().print(table)


def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "compare":
        parser = argparse.ArgumentParser(prog="train.py compare", epilog=COMPARE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, help="compare spec YAML")
        known, extra = parser.parse_known_args(argv[1:])
        return compare(known.config, extra)
    return ZooCLI(args=args)


if __name__ == "__main__":
    main()
