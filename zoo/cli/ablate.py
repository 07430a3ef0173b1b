"""`train.py ablate`: a grid of fits over config values, seeds averaged, resumable point by point."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.cli.lightning import ZooCLI, fit
from zoo.cli.report import write_report

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
    fit(cli, ckpt_path=str(last) if last.is_file() else None)
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
