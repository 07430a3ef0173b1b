"""`train.py ablate`: a grid of fits over config values, seeds averaged, resumable point by point."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.cli.errors import configuration_phase, is_configuration_error
from zoo.cli.lightning import ZooCLI, fit, merge_kwargs_options
from zoo.cli.report import metric_directions, write_report

ABLATE_HELP = """\
python train.py ablate --config configs/icnn/parts_world.yaml --name icnn_lambda \\
    --grid model.init_args.loss.init_args.weight=[0,1,10] --grid seed_everything=[0,1] [fit overrides ...]

Each grid point is one fit in checkpoints/<name>/<point>/, keyed by a hash of its resolved settings: a finished
point is reused when the same settings run again ("point X: finished with the same settings, reused"), a point
whose settings changed (another max_epochs, an edited config) runs again, an interrupted one resumes from its
last.ckpt. The table averages every metric over seed_everything (<metric>_mean, <metric>_std) and goes to
checkpoints/<name>/ablation.{md,csv}; each point's TensorBoard HPARAMS entry is in checkpoints/<name>/hparams/.
Fit overrides reach every point; one that sets a --grid key is refused (the grid gives that key's values). Every
point's arguments are checked before the first point runs; a configuration mistake (a mistyped key, a data folder
that is not there) is said once, exit status 2, and leaves no folder of a point that did not run.
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


def settings_hash(cli: ZooCLI) -> str:
    """sha256 of a point's resolved config (every default, file and override applied) less what does not change a
    result (the logger, the progress bar): a finished point is reused only while this is unchanged."""
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    config.pop("progress_bar", None)
    (config.get("trainer") or {}).pop("logger", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def write_hparams(folder: Path, point: dict[str, Any], metrics: dict[str, float]) -> None:
    """The point's TensorBoard HPARAMS entry, once, in <ablation>/hparams/<point>/ (rewritten only when the point
    is rerun), so TensorBoard's HPARAMS tab lists each point once however often the ablation runs."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    shutil.rmtree(folder, ignore_errors=True)
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in point.items()}
    scores = {f"hparam/{k}": v for k, v in metrics.items()}
    with SummaryWriter(str(folder)) as writer:
        for summary in hparams(values, scores):
            writer.file_writer.add_summary(summary)
        for key, value in scores.items():
            writer.add_scalar(key, value)


def option_name(arg: str) -> str | None:
    """The dotted key an argument sets ("--a.b=1" or "--a.b" -> "a.b"); None for a value or a short option."""
    return arg[2:].partition("=")[0] if arg.startswith("--") and len(arg) > 2 else None


def check_extra(grid: dict[str, list[Any]], extra: list[str]) -> None:
    """Refuse a fit override that sets a grid key (or a key inside one): it would give every point the same value,
    silently, so the grid would train one setting several times."""
    for arg in extra:
        name = option_name(arg)
        clash = next((key for key in grid if name is not None and (name == key or name.startswith(f"{key}."))), None)
        if clash is not None:
            raise ValueError(f"ablate: {arg!r} sets the grid key {clash!r}, whose values come from --grid "
                             f"({grid[clash]}); drop the argument, or give the value in --grid.")


def point_args(config: str, name: str, point: dict[str, Any], extra: list[str]) -> list[str]:
    """A grid point's fit arguments: the config, the extra overrides, then the point's values (after the extra
    ones, so the grid wins), then its logger name (its folder)."""
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in point.items()]
    return ["--config", config, *extra, *overrides, f"--trainer.logger.init_args.name={name}/{point_name(point)}"]


def point_cli(config: str, name: str, point: dict[str, Any], extra: list[str]) -> ZooCLI:
    """A grid point's CLI (seeded and instantiated as `train.py fit` of the same arguments); a configuration
    mistake is said once (`configuration_phase`)."""
    with configuration_phase():
        return ZooCLI(args=point_args(config, name, point, extra), run=False)


def check_points(cli: ZooCLI, config: str, name: str, points: list[dict[str, Any]], extra: list[str]) -> None:
    """Parse every grid point's arguments with `cli`'s parser (cheap: nothing is instantiated), so a grid value
    the config refuses is said before the first point trains, not hours later."""
    from pytorch_lightning.utilities.seed import isolate_rng

    with isolate_rng():  # the first point's CLI is built: its fit draws what `train.py fit` would
        for point in points:
            cli.parser.parse_args(merge_kwargs_options(point_args(config, name, point, extra)))


def remove_if_empty(folder: Path) -> None:
    """`folder` and the folders above it up to checkpoints/, each only while empty."""
    while folder.name != "checkpoints" and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def run_grid_point(config: str, name: str, point: dict[str, Any], extra: list[str], cli: ZooCLI | None = None
                   ) -> tuple[dict[str, float], dict[str, bool | None]]:
    """Fit one grid point (resuming from its last.ckpt), validate, and store result.json atomically; return its
    metrics and their directions. The point's resolved settings are hashed: a finished point with the same hash is
    reused (and said so); a point whose settings changed since (another max_epochs, a changed config file) is
    moved to <name>/stale/ and run again from scratch. `cli`: the point's CLI if already built (`point_cli`).

    A configuration mistake found while training (a data folder that is not there, read at setup) is said once;
    the point's folder is removed if this call made it, so a point that never ran leaves nothing behind."""
    folder = Path("checkpoints") / name / point_name(point)
    result_path, hash_path = folder / "result.json", folder / "settings.sha256"
    cli = cli if cli is not None else point_cli(config, name, point, extra)
    digest, label = settings_hash(cli), point_name(point)
    stored = hash_path.read_text().strip() if hash_path.is_file() else None
    if folder.is_dir() and stored != digest:
        stale = Path("checkpoints") / name / "stale" / f"{label}-{(stored or 'unknown')[:8]}"
        shutil.rmtree(stale, ignore_errors=True)
        stale.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(stale)
        print(f"ablate: point {label}: settings changed since its last run; run again (old run moved to {stale})")
    elif result_path.is_file():
        print(f"ablate: point {label}: finished with the same settings, reused")
        return json.loads(result_path.read_text())["metrics"], metric_directions(cli.model, "val")
    new = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    hash_path.write_text(digest + "\n")  # before training: an interrupted point resumes only with these settings
    last = folder / "checkpoints" / "last.ckpt"
    try:
        fit(cli, ckpt_path=str(last) if last.is_file() else None)
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    except Exception as error:
        if new and is_configuration_error(error) and not last.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # it never trained: nothing to resume
            remove_if_empty(folder.parent)
        raise
    metrics = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if not k.startswith("val/loss")}
    write_hparams(Path("checkpoints") / name / "hparams" / label, point, metrics)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"point": point, "settings_sha256": digest, "metrics": metrics}, indent=1))
    os.replace(tmp, result_path)  # atomic: a killed run leaves no half-written result
    return metrics, metric_directions(cli.model, "val")


def summarise(results: list[tuple[dict[str, Any], dict[str, float]]]) -> list[dict[str, Any]]:
    """Group grid points that differ only in the seed; every metric's mean and standard deviation over the seeds as
    numbers (`<metric>_mean`, `<metric>_std`; std 0 for one seed)."""
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
            values = torch.tensor([run[metric] for run in runs if metric in run], dtype=torch.float64)
            row[f"{metric}_mean"] = round(values.mean().item(), 4)
            row[f"{metric}_std"] = round(values.std().item(), 4) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def ablate(config: str, grid_items: list[str], name: str, extra: list[str]) -> list[dict[str, Any]]:
    """Run every grid point (reusing finished ones whose settings are unchanged), write the table; each point's
    TensorBoard HPARAMS entry is written when the point finishes."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    with configuration_phase():  # the grid and the overrides; then every point's arguments, before any training
        grid = parse_grid(grid_items)
        points = grid_points(grid)
        check_extra(grid, extra)
    cli = point_cli(config, name, points[0], extra)
    check_points(cli, config, name, points[1:], extra)
    results, directions = [], {}
    for index, point in enumerate(points, 1):
        print(f"\n=== ablate point {index}/{len(points)}: {point_name(point)} ===", flush=True)
        metrics, point_directions = run_grid_point(config, name, point, extra, cli if index == 1 else None)
        results.append((point, metrics))
        directions |= point_directions
    rows = summarise(results)
    write_report(Path("checkpoints") / name, {"ablation": rows}, directions, stem="ablation")
    return rows
