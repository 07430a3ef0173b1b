"""`train.py ablate`: a grid of fits over config values, seeds averaged, resumable point by point."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.cli.compare import check_not_a_fit_run, config_argument, counting
from zoo.cli.errors import configuration_phase, is_configuration_error, mark, root_cause
from zoo.cli.lightning import ParsedCLI, ZooCLI, fit, refuse_empty_budget
from zoo.cli.preflight import check_no_print_config, cli_callbacks, preflight
from zoo.cli.report import metric_directions, write_report
from zoo.cli.runs import STALE, config_strings, existing_files, move_aside, move_earlier_reports, stale_path
from zoo.engine.callbacks import scoring_logged_apart
from zoo.fingerprints import (HASHED_FILE_LIMIT, file_fingerprint, folder_fingerprint,  # noqa: F401 (re-exported)
                              written_by_runs)
from zoo.weights import flat_settings

ABLATE_HELP = """\
python train.py ablate --config configs/icnn/parts_world.yaml --name icnn_lambda \\
    --grid model.init_args.loss.init_args.weight=[0,1,10] --grid seed_everything=[0,1] [fit overrides ...]

Each grid point is one fit in <save_dir>/<name>/<point>/ (the logger's save_dir: checkpoints/ unless overridden),
keyed by a hash of its resolved settings and of the contents of the files and folders they name (init_checkpoint,
a data root: each file's path, size and mtime, hidden ones left out) and of the source file of each module a
class_path names (a loss of your own: mylosses.py): a finished point is reused when the same settings run again
("point X: finished with the same settings, reused"), a point whose settings changed (another max_epochs, an edited
config or mylosses.py, a refitted checkpoint, a file added to, removed from or rewritten in its data folder) runs
again and the changed keys are said, an interrupted one resumes from its last.ckpt. Settings that cannot
change a result (the logger, log_every_n_steps, the progress bar, the model summary, pin_memory, picture callbacks)
are left out of the hash. The table averages every metric over seed_everything (<metric>_mean, <metric>_std) and goes to
<save_dir>/<name>/ablation.{md,csv}, scored with each point's last weights (not its best-*.ckpt; said under the
table; setting columns as given, metrics rounded for reading, the CSV in full precision); the HPARAMS entries of
the grid's points are in <save_dir>/<name>/hparams/. A point that runs again goes to stale/ with its result; its
HPARAMS entry is removed and the earlier table moved to stale/ablation-<time>/ then. A grid over other axes than
the table in <save_dir>/<name>/ is another study: that table moves to stale/ablation-<time>/ and its HPARAMS entries
go (said; give each study its own --name). --config may be repeated: every point layers the configs in order, as
`train.py fit` does (the default name comes from the first). Fit overrides reach every point; one that sets a
--grid key is refused (the grid gives that key's values), and so is a key given to --grid twice, a value given twice
in one axis, and two points that resolve to the same settings (a value that does not reach the run: a model
argument the data sets, such as model.init_args.num_classes, whose grid key is data.init_args.num_classes). Every
point's arguments are checked, and its model and datamodule built (no data is read), before the first point
trains; a configuration mistake (a mistyped key, a model name or mode a class refuses, a data folder that is not
there) is said once with the point, exit status 2, and leaves no folder of a point that did not run.
"""
SEED_KEY = "seed_everything"
VALUE_LIMIT = 48  # characters of one value in a point's name; a longer one is cut and ends in a hash of the value
NAME_LIMIT = 200  # bytes of a point's name (a file name may have 255; stale/ adds 9), cut likewise
IGNORED_SETTINGS = (  # keys that cannot change a point's result: left out of its settings hash
    "trainer.logger",  # where the run is written (the point's folder) and how, not what it computes
    "trainer.log_every_n_steps",  # how often the training step is logged
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "progress_bar",
    "checkpoint.verbose",
    "data.init_args.pin_memory",  # page-locked host memory: the same batches
)
OUTPUT_KEYS = ("default_root_dir", "dirpath", "save_dir")  # folders a run writes in: not fingerprinted
REPORT_FILES = ("ablation.md", "ablation.csv")  # the table `ablate` writes in <save_dir>/<name>/ when it ends


class GridNumber(float):
    """A grid value written in exponent form without a dot (1e-3), which YAML 1.1 reads as a string: the number,
    with the text it was written as (`text`), the name earlier ablates gave its point's folder (`legacy_point_name`)."""

    text: str

    def __new__(cls, text: str) -> GridNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number


class GridLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads a plain scalar in exponent form (1e-3, -2E+4) as a number (`GridNumber`):
    result.json, the table's column and HPARAMS would keep the text, and a point 1e-3 would train the same setting
    as a point 0.001 in another folder. Quoted scalars ("2007", a VOC year) stay strings."""


GridLoader.add_implicit_resolver("tag:yaml.org,2002:grid_number", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))
GridLoader.add_constructor("tag:yaml.org,2002:grid_number",
                           lambda loader, node: GridNumber(loader.construct_scalar(node)))
yaml.SafeDumper.add_representer(GridNumber, yaml.SafeDumper.represent_float)  # a point's override: --key=0.001


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["key=[v1,v2]", ...] -> {key: [v1, v2]} (values parsed as YAML, plain scalars in exponent form as numbers:
    `GridLoader`, so 1e-3 is the number 0.001 and names the same point). Spaces around a key are dropped (a shell
    line's ' key=[...]' gave "unrecognized arguments: -- key=0"). Refused: an empty key, a key given twice (the last
    one would silently win), `seed` (the run's seed is `seed_everything`) and an axis whose values name one point
    twice (`check_distinct_values`)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parsed = yaml.load(values, Loader=GridLoader) if sep else None  # noqa: S506 - a safe loader
        if not sep:
            raise ValueError(f"--grid takes key=[v1,v2,...]; got {item!r}.\n{ABLATE_HELP}")
        if not key:
            raise ValueError(f"--grid {item!r} names no key: give the config key whose values to ablate before the "
                             f"'=', e.g. --grid model.init_args.optimizer.init_args.lr={values.strip() or '[v1,v2]'}.")
        if not isinstance(parsed, list) or not parsed:  # a scalar or [] would give no point or a point of no list
            example = f"[{values}]" if values.strip() and not isinstance(parsed, (list, dict)) else "[v1,v2]"
            raise ValueError(f"--grid {item!r}: {key} needs a non-empty list of values, e.g. --grid {key}={example}.")
        if key == "seed":
            raise ValueError(f"--grid {item!r}: there is no key 'seed'; the run's seed is seed_everything "
                             f"(--grid {SEED_KEY}={values}).")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice ({grid[key]} and {parsed}); give all its values in one "
                             f"--grid {key}=[...].")
        check_distinct_values(key, values, parsed)
        grid[key] = parsed
    return grid


def check_distinct_values(key: str, text: str, values: list[Any]) -> None:
    """Refuse two values of one --grid axis that would name the same point folder (`point_name`), saying why: the
    same text twice ("the value 0 is given twice"), two texts YAML reads as one value (true and yes, 1e-3 and
    0.001), or values that differ only in characters a point name replaces with "_". `text`: the axis's YAML list,
    from which each value's own text is shown."""
    node = yaml.compose(text, Loader=GridLoader)
    texts = [text[item.start_mark.index:item.end_mark.index] for item in node.value] \
        if isinstance(node, yaml.SequenceNode) and len(node.value) == len(values) else [str(v) for v in values]
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        name = point_name({key: value})
        if name not in seen:
            seen[name] = index
            continue
        first, second = texts[seen[name]], texts[index]
        other = values[seen[name]]
        if first == second:
            why = f"the value {first} is given twice"
        elif other == value and isinstance(other, bool) == isinstance(value, bool):  # 1e-3 is a GridNumber
            why = f"{first} and {second} are the same value once read as YAML ({json.dumps(value, default=str)})"
        else:
            why = f"{first} and {second} differ only in characters that point names replace with '_'"
        raise ValueError(f"--grid {key}: {why}, so two grid points would share the folder {name!r}; give each "
                         f"value once.")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values; refuses two points that would share a folder (see point_name; one
    axis's values are checked by `parse_grid`, by name)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        points = [{**point, key: value} for point in points for value in values]
    names = [point_name(point) for point in points]
    if len(set(names)) < len(names):
        clash = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"two grid points would share the folder {clash!r}: their values are the same number "
                         f"(1e-3 and 0.001) or differ only in characters that point names replace with '_'; make "
                         f"the values distinct.")
    return points


def short_hash(value: Any) -> str:
    """8 hex digits of the sha256 of `value` as sorted JSON: the same in every process."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def point_name(point: dict[str, Any]) -> str:
    """A folder (and logger) name for a grid point: the last part of each key with its value, mappings written as
    key-value pairs; characters unsafe in a path or in a YAML scalar (the logger name is parsed) become "_". A
    value longer than VALUE_LIMIT characters (ReNN's stages) is cut and ends in "~" and a hash of the whole value,
    and so is a name longer than NAME_LIMIT bytes, so names stay unique and fit a file system's 255 bytes."""
    def text(value: Any) -> str:
        return "+".join(f"{k}-{text(v)}" for k, v in value.items()) if isinstance(value, dict) else str(value)

    def safe(part: str) -> str:
        return re.sub(r"[^\w.=,+-]", "_", part)

    parts = []
    for key, value in point.items():
        shown = safe(text(value))
        if len(shown) > VALUE_LIMIT:
            shown = f"{shown[:VALUE_LIMIT - 9]}~{short_hash(value)}"
        parts.append(f"{safe(key.rsplit('.', 1)[-1])}={shown}")
    name = ",".join(parts)
    if len(name.encode()) > NAME_LIMIT:
        name = f"{name.encode()[:NAME_LIMIT - 9].decode(errors='ignore')}~{short_hash(point)}"
    return name


def legacy_point_name(point: dict[str, Any]) -> str:
    """The folder name an ablate before `GridLoader` gave a point: its exponent-form numbers, at any depth of a
    value (a mapping `{lr: 1e-3}`, a list), as the text they were written in (lr=1e-3, not lr=0.001), so that an
    upgrade finds the points it finished (`run_grid_point`)."""
    def text_of(value: Any) -> Any:
        if isinstance(value, GridNumber):
            return value.text
        if isinstance(value, list):
            return [text_of(item) for item in value]
        return {k: text_of(v) for k, v in value.items()} if isinstance(value, dict) else value

    return point_name({key: text_of(value) for key, value in point.items()})


def column_labels(keys: list[str]) -> dict[str, str]:
    """Each grid key's table column: the shortest dotted suffix that no other key ends with
    (`model.init_args.loss.init_args` and `model.init_args.optimizer.init_args` -> `loss.init_args`,
    `optimizer.init_args`), so two keys never share a column."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            label = ".".join(parts[-length:])
            if not any(other != key and (other == label or other.endswith(f".{label}")) for other in keys):
                break
        labels[key] = label
    return labels


def drop_key(config: dict[str, Any], dotted: str) -> None:
    """Remove `dotted` ("trainer.logger") from a nested mapping, if it is there."""
    *parents, last = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def report_only(entry: Any) -> bool:
    """Whether a `trainer.callbacks` entry only draws or tabulates, so adding, dropping or tuning it cannot change a
    result: its class says so (`report_only = True`: every FixedBatchCallback, RNG isolated, eval mode, no_grad; a
    family's own reporting callbacks such as CBM's intervention curve)."""
    path = entry.get("class_path") if isinstance(entry, dict) else None
    if not isinstance(path, str):
        return False
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and getattr(cls, "report_only", False) is True


def existing_folders(config: Any, outputs: Path | None = None) -> Iterator[str]:
    """Every string of a nested config that names an existing folder (a data root, ...), relative paths read from
    the working folder, less where runs write: the values of OUTPUT_KEYS (trainer.default_root_dir, checkpoints'
    dirpath, a logger's save_dir), the working folder and the folders above it (".": every run writes below it)
    and any folder that holds `outputs` (the point's run folder) or lies inside it. Their contents change with
    every run, so fingerprinting them would run every finished point again (`written_by_runs`)."""
    return (value for value in config_strings(config, OUTPUT_KEYS)
            if os.path.isdir(value) and not written_by_runs(value, outputs))


def class_paths(config: Any) -> Iterator[str]:
    """Every `class_path` string of a nested config (the System, its loss and optimiser, the datamodule, ...)."""
    if isinstance(config, dict):
        if isinstance(config.get("class_path"), str):
            yield config["class_path"]
        for value in config.values():
            yield from class_paths(value)
    elif isinstance(config, list):
        for value in config:
            yield from class_paths(value)


def code_file(class_path: str) -> tuple[str, str] | None:
    """(module, source file) of the module that defines the class `class_path` names (the class's own module where
    it can be imported: a package's __init__ that re-exports it holds none of its code; else the named module's,
    `importlib.util.find_spec(...).origin`); None where there is no such file (a built-in, a module not there)."""
    import importlib.util

    module, _, name = class_path.rpartition(".")
    with contextlib.suppress(ImportError, AttributeError, ValueError):
        module = getattr(importlib.import_module(module), name).__module__
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return (module, origin) if origin and os.path.isfile(origin) else None


def code_fingerprints(config: Any) -> dict[str, str]:
    """{module: `file_fingerprint` of its source file} for every module a `class_path` of `config` names
    (`code_file`; keyed by module name, so the same wherever the repository or the working folder is): a user's
    loss edited between two runs of the same ablate changes a point's settings, so the point runs again instead of
    reusing numbers the old code made. Only the named modules' files: code they import is not covered."""
    found = (code_file(path) for path in dict.fromkeys(class_paths(config)))
    return {module: file_fingerprint(origin) for module, origin in dict.fromkeys(f for f in found if f is not None)}


def resolved_settings(cli: ZooCLI, outputs: Path | None = None) -> dict[str, Any]:
    """What a point's result depends on: its resolved config (every default, file and override applied) less
    IGNORED_SETTINGS and the picture callbacks (`report_only`), the fingerprint of every existing file
    (`file_fingerprint`) and folder (`folder_fingerprint`; a data root) the config names, and that of the source
    file of every module a `class_path` names (`code_fingerprints`): {"config": ..., "files": {path: fingerprint},
    "code": {module: fingerprint}}. `outputs`: the point's run folder (default: its logger's, `run_folder`),
    whose folders are not fingerprinted (the run writes there)."""
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    for key in IGNORED_SETTINGS:
        drop_key(config, key)
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), list):
        trainer["callbacks"] = [entry for entry in trainer["callbacks"] if not report_only(entry)]
    if outputs is None:
        with contextlib.suppress(Exception):  # a logger ablate refuses: it is said where the point runs
            outputs = run_folder(cli.config_init, cli.config)
    files = {path: file_fingerprint(path) for path in dict.fromkeys(existing_files(config))}
    files |= {path: folder_fingerprint(path) for path in dict.fromkeys(existing_folders(config, outputs))}
    return {"config": config, "files": files, "code": code_fingerprints(config)}


def without_code(settings: dict[str, Any]) -> dict[str, Any]:
    """`resolved_settings` as the ablate before code fingerprints made them (no "code" entry), whose
    `settings_hash` the points it finished stored."""
    return {key: value for key, value in settings.items() if key != "code"}


def settings_hash(settings: dict[str, Any] | ZooCLI) -> str:
    """sha256 of a point's `resolved_settings` (given, or of a CLI): a finished point is reused only while this is
    unchanged."""
    settings = settings if isinstance(settings, dict) else resolved_settings(settings)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def legacy_settings_hash(cli: ZooCLI) -> str:
    """The hash ablate stored before settings.json: the resolved config less the logger and the progress bar,
    without the files it names. A point it finished is kept when this matches and the config names no file (the
    old hash then covered everything the new one does, and more), so an upgrade does not rerun a finished grid."""
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    config.pop("progress_bar", None)
    (config.get("trainer") or {}).pop("logger", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def settings_changes(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 8) -> str:
    """"key: old -> new; ..." for what differs between two `resolved_settings` (the first `limit` keys)."""
    if old is None:
        return "not known (the earlier run stored no settings.json)"
    if "code" not in old:  # stored by the ablate before code fingerprints: which code ran then is not known
        new = without_code(new)
    before, after = flat_settings(old), flat_settings(json.loads(json.dumps(new, default=str)))  # as stored

    def shown(settings: dict[str, Any], key: str) -> str:
        text = json.dumps(settings[key], default=str) if key in settings else "(not set)"
        return text if len(text) <= 60 else f"{text[:57]}..."

    changed = [key for key in dict.fromkeys([*after, *before])
               if key not in before or key not in after or before[key] != after[key]]
    lines = [f"{key}: {shown(before, key)} -> {shown(after, key)}" for key in changed[:limit]]
    more = [f"and {len(changed) - limit} more (see settings.json)"] if len(changed) > limit else []
    return "; ".join(lines + more) or "none found"


def hparam_values(point: dict[str, Any], grid: dict[str, list[Any]] | None = None) -> dict[str, float | str]:
    """A point's values as its HPARAMS entry's columns, each axis of one type at every point (TensorBoard takes a
    column's type from one entry): numbers where every value of the axis (`grid`; else the point's own) is a number,
    else every value as its YAML/JSON text ("true", "null", "[1, 2]"). torch's `hparams` stores a bool as the
    number 1.0 and leaves None out, so a `[null, 0.1]` axis was a string at one point and a number at the other."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value, default=str)

    return {key: value if all(number(v) for v in (grid or {}).get(key, [value])) else text(value)
            for key, value in point.items()}


def write_hparams(folder: Path, point: dict[str, Any], metrics: dict[str, float],
                  grid: dict[str, list[Any]] | None = None) -> None:
    """The point's TensorBoard HPARAMS entry, once, in <ablation>/hparams/<point>/ (rewritten only when the point
    is rerun), so TensorBoard's HPARAMS tab lists each point once however often the ablation runs. Its columns are
    `hparam_values` (of one type per axis of `grid`)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    shutil.rmtree(folder, ignore_errors=True)
    values = hparam_values(point, grid)
    scores = {f"hparam/{k}": v for k, v in metrics.items()}
    with SummaryWriter(str(folder)) as writer:
        for summary in hparams(values, scores):
            writer.file_writer.add_summary(summary)
        for key, value in scores.items():
            writer.add_scalar(key, value)


def keep_hparams_of(folder: Path, names: set[str]) -> list[str]:
    """Remove the HPARAMS entries (<ablation>/hparams/<point>/) of points that are not in the grid that ran last,
    so TensorBoard's HPARAMS tab shows the points of ablation.md; their runs and result.json stay. Returns the
    removed entries' names."""
    removed = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and entry.name not in names:
                shutil.rmtree(entry)
                removed.append(entry.name)
    return removed


def table_axes(path: Path) -> list[str] | None:
    """The setting columns of an ablation.csv (those before `seeds`: the grid's axes but the seed); None where
    there is no such table."""
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except OSError:
        return None
    return header[:header.index("seeds")] if "seeds" in header else None


def move_other_study(folder: Path, axes: list[str], names: set[str]) -> Path | None:
    """Before a grid whose axes (the table's setting columns, `axes`) differ from those of the table in `folder`
    (an earlier ablate under the same --name, by default one per config) runs: that table describes another study,
    which this grid's table would replace without a word and whose HPARAMS entries it would remove. Its ablation.md
    and .csv move to <folder>/stale/ablation-<time>/ (as when a point reruns), its HPARAMS entries of points not in
    this grid (`names`) are removed (their runs and result.json stay), and one line says so. A grid with the same
    axes (values added or dropped) is the same study: its table replaces the earlier one. Returns where the table
    went; None where nothing moved."""
    earlier = table_axes(folder / "ablation.csv")
    if earlier is None or set(earlier) == set(axes):
        return None
    stale = stale_path(folder / "ablation")
    stale.mkdir(parents=True)
    for file in REPORT_FILES:
        if (folder / file).is_file():
            (folder / file).rename(stale / file)
    dropped = keep_hparams_of(folder / "hparams", names)

    def shown(columns: list[str]) -> str:
        return ", ".join(columns) or "seeds only"

    print(f"ablate: {folder} held the table of another study (its axes: {shown(earlier)}; this grid's: "
          f"{shown(axes)}): moved to {stale}, and its HPARAMS entries removed "
          f"({', '.join(dropped) or 'none'}; their runs stay). Give each study a name of its own: --name <name>.",
          flush=True)
    return stale


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


def check_logger(config: str | list[str], extra: list[str]) -> None:
    """Refuse a run without a logger class (`--trainer.logger=false`, or `logger: false` in a config: of several
    configs, the last that sets it, as `fit` layers them) before the parser does, in words: ablate names each
    point's logger (its run folder), which a bare bool cannot take."""
    given, where = None, None
    for index, arg in enumerate(extra):
        if option_name(arg) == "trainer.logger":
            value = arg.partition("=")[2] if "=" in arg else (extra[index + 1] if index + 1 < len(extra) else "")
            given, where = value, f"--trainer.logger={value}"
    for path in reversed(config_list(config) if where is None else []):
        try:
            trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer")
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # the parser says what is wrong with the file
        if isinstance(trainer, dict) and "logger" in trainer:
            given, where = trainer["logger"], f"{path} (trainer.logger: {trainer['logger']})"
            break
    if where is None:
        return
    try:
        value = yaml.safe_load(given) if isinstance(given, str) else given
    except yaml.YAMLError:
        return
    if value is None or isinstance(value, bool) or str(value).lower() in ("none", "null", "false", "true"):
        raise ValueError(f"ablate needs a logger class: {where} gives none, but each point's run (its checkpoints, "
                         f"last.ckpt to resume from, result.json) is the logger's folder <save_dir>/<name>/<point>. "
                         f"Drop it (to put the runs elsewhere, give --trainer.logger.init_args.save_dir=<folder>).")


def run_folder(init: Any, config: Any) -> Path:
    """A point's run folder from its instantiated config (`cli.config_init`) and its config: the configured
    logger's <save_dir>/<name> (<name> is <ablation>/<point>, see point_args), where Lightning writes the run's
    events and checkpoints (last.ckpt) and ablate its result.json. Read from the configured logger, not the
    trainer's: fast_dev_run swaps that for a dummy. Refused: a logger that is not a TensorBoardLogger or CSVLogger,
    a logger version other than "" (Lightning would number the runs, version_0, version_1, ..., and a rerun would
    not find its point) and a last_checkpoint.dirpath (every point would resume from the same last.ckpt)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    logger = init.get("trainer.logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
        raise mark(ValueError(f"ablate keeps each point's run in its logger's folder <save_dir>/<name>/<point>: it "
                              f"needs a TensorBoardLogger or CSVLogger, not {type(logger).__name__}."))
    if getattr(logger, "_version", None) != "":  # the configured version (the property numbers a None one)
        raise mark(ValueError(f"ablate: each point's run is <save_dir>/<name>/<point>, so the logger's version must "
                              f"be '' (as in the configs); got {getattr(logger, '_version', None)!r}."))
    if config.get("last_checkpoint.dirpath") is not None:
        raise mark(ValueError("ablate: last_checkpoint.dirpath is set, so every point would write and resume from "
                              "the same last.ckpt; leave it unset (each point's is in its run folder)."))
    return Path(logger.save_dir or config.get("trainer.default_root_dir") or "checkpoints") / str(logger.name)


def config_list(config: str | list[str]) -> list[str]:
    """ablate's `--config` values as a list: one config (a path or a YAML text), or several that `train.py fit`
    layers in order (a base config and a tweak of it)."""
    return [config] if isinstance(config, str) else list(config)


def point_args(config: str | list[str], name: str, point: dict[str, Any], extra: list[str]) -> list[str]:
    """A grid point's fit arguments: every config in order, each as its own `--config` as `train.py fit` layers
    them (a path, or a YAML text: `ablate` passes a run's saved config.yaml without fit's ckpt_path and
    weights_only, `config_argument`), the extra overrides, then the point's values (after the extra ones, so the
    grid wins), then its logger name (its folder)."""
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in point.items()]
    configs = [arg for each in config_list(config) for arg in ("--config", each)]
    return [*configs, *extra, *overrides, f"--trainer.logger.init_args.name={name}/{point_name(point)}"]


def point_cli(config: str | list[str], name: str, point: dict[str, Any], extra: list[str]) -> ZooCLI:
    """A grid point's CLI (seeded and instantiated as `train.py fit` of the same arguments); a configuration
    mistake is said once (`configuration_phase`)."""
    with configuration_phase():
        cli = ZooCLI(args=point_args(config, name, point, extra), run=False)
    without_hp_metric(cli.trainer)
    return cli


def without_hp_metric(trainer: Any) -> None:
    """A point run's TensorBoardLogger writes no HPARAMS entry of its own (`default_hp_metric` off: Lightning then
    records the hyperparameters in hparams.yaml only): ablate writes each point's entry, with the grid's values as
    columns and the point's metrics (`write_hparams`). With Lightning's own entries beside them, TensorBoard took
    its columns from one point run's (every Lightning hparam, hp_metric -1 as the one metric) and listed each
    point twice."""
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._default_hp_metric = False  # the logger's `default_hp_metric` argument


@contextlib.contextmanager
def naming_the_point(index: int, total: int, point: dict[str, Any]) -> Iterator[None]:
    """Errors raised inside, while a point is checked before any training, name the point: a class's error is
    raised as a configuration error ending in "(ablate point i/n: <point>; no point has trained)"; the parser, which
    prints its own error and exits, gets that line after its message."""
    said = f"(ablate point {index}/{total}: {point_name(point)}; no point has trained)"
    try:
        yield
    except SystemExit:
        sys.stderr.write(f"{said}\n")
        raise
    except Exception as error:
        raise mark(ValueError(f"{root_cause(error)}\n{said}")) from error


class PointCheck(ParsedCLI):
    """A grid point's CLI that only parses its arguments and builds its model, datamodule (no `setup`: no data is
    read), logger and callbacks: no Trainer, no seeding (`train.py fit` seeds when the point runs). Its own parser
    builds the System: LightningCLI's instantiators give a System the hyperparameters of the CLI that owns the
    parser (a System builds its model from them), so another point's parser would build that point's model."""

    def instantiate_classes(self) -> None:
        with configuration_phase():
            self.config_init = self.parser.instantiate_classes(self.config)
            self.datamodule, self.model = self._get(self.config_init, "data"), self._get(self.config_init, "model")
            self.resolve_pretrained_mean()
            self.refuse_settings_the_data_replaces()  # a grid value the data's would replace, silently


def check_points(config: str | list[str], name: str, points: list[dict[str, Any]], extra: list[str], first: int = 1,
                 total: int | None = None, settings_of: dict[str, dict[str, Any]] | None = None) -> None:
    """Before the first point trains, parse every grid point's arguments and build its model, datamodule and
    logger (`PointCheck`) and run its `preflight` (optimiser values, the stages' loss terms, monitors), so a grid
    value the config, a class or torch refuses (a mistyped model name, a CBM mode without its stages, lr=-0.1) is
    said with its point before any training, not hours later. `first`: the number of points[0] in
    the grid of `total` points. Two points whose settings hash alike (`settings_hash`: what settings.json holds)
    are refused (`check_distinct_settings`): a grid value that does not reach the run would train one setting
    twice, and the table would show it as two. `settings_of`: {settings hash: point} of points checked before
    (the first point, built by `ablate`).

    Everything runs under `isolate_rng` (building a model draws its initial weights from the global generator) and
    Lightning's seed variables are put back: the first point's fit draws what `train.py fit` would. CUDA's states
    are taken only where CUDA is already initialised (reading them would initialise it, which a forked DDP launch
    refuses; models are built on the CPU, which draws nothing from CUDA's generators)."""
    from pytorch_lightning.utilities.seed import isolate_rng

    total = total if total is not None else len(points) + first - 1
    seed_variables = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    seen = dict(settings_of or {})
    try:
        with isolate_rng(include_cuda=torch.cuda.is_initialized()):
            for index, point in enumerate(points, first):
                with naming_the_point(index, total, point):
                    check = PointCheck(args=point_args(config, name, point, extra), run=False)
                    folder = run_folder(check.config_init, check.config)
                    preflight(check.model, cli_callbacks(check), check.datamodule)  # data, optimiser, losses, ...
                    refuse_empty_budget(check.config.get("trainer"))
                    digest = settings_hash(resolved_settings(check, folder))
                    del check
                check_distinct_settings(seen, digest, point)
    finally:
        for key, value in seed_variables.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_distinct_settings(seen: dict[str, dict[str, Any]], digest: str, point: dict[str, Any]) -> None:
    """Refuse grid point `point` when a point in `seen` ({settings hash: point}, updated here) has its settings
    hash `digest`: both would train the same run (the same settings.json) and the table would give each a row as if
    they differed. Says the axes that differ and why each may not reach the run: a model argument the data sets
    (`zoo.weights.DATA_LINKS`: the data's value replaces it), a setting that cannot change a result
    (IGNORED_SETTINGS, picture callbacks), or a key another axis or a link sets after it (one key given as two axes
    in two spellings: model.loss.init_args.weight and model.init_args.loss.init_args.weight)."""
    from zoo.weights import DATA_LINKS

    other = seen.setdefault(digest, point)
    if other is point:
        return

    def text(value: Any) -> str:
        return json.dumps(value, default=str)

    # as written: 1 and 1.0 are equal in Python, but two values of the grid (two folders)
    axes = [key for key in dict.fromkeys([*other, *point]) if text(other.get(key)) != text(point.get(key))]
    reasons = []
    for key in axes:
        source = next((source for source, target in DATA_LINKS.items() if key == f"model.init_args.{target}"), None)
        if other.get(key) == point.get(key):  # 1 and 1.0 for a float setting
            reasons.append(f"{key}: {text(other.get(key))} and {text(point.get(key))} are the same value once the "
                           f"setting reads them; give it once")
        elif source is not None:
            reasons.append(f"{key} comes from the data, whose value replaces the grid's: ablate "
                           f"data.init_args.{source} instead")
        elif any(key == ignored or key.startswith(f"{ignored}.") for ignored in IGNORED_SETTINGS) \
                or key.startswith("trainer.callbacks"):
            reasons.append(f"{key} cannot change a result (ablate leaves it out of a point's settings); drop the axis")
        else:
            reasons.append(f"{key} does not reach the run: another axis or a link sets the same setting after it "
                           f"(one key given as two axes in two spellings?); give each setting one axis")
    values = "; ".join(f"{key}: {text(other.get(key))} and {text(point.get(key))}" for key in axes)
    raise mark(ValueError(f"ablate: grid points {point_name(other)} and {point_name(point)} resolve to the same "
                          f"settings (one settings hash: they would train one run twice, and the table would show "
                          f"it as two rows) although they differ in {values}. {'. '.join(reasons)}. No point has "
                          f"trained."))


def remove_if_empty(folder: Path, top: Path) -> None:
    """`folder` and the folders above it up to `top` (not included), each only while empty."""
    while folder != top and top in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def run_grid_point(config: str | list[str], name: str, point: dict[str, Any], extra: list[str],
                   cli: ZooCLI | None = None, grid: dict[str, list[Any]] | None = None
                   ) -> tuple[dict[str, float], dict[str, bool | None]]:
    """Fit one grid point (resuming from its last.ckpt), validate, and store result.json atomically; return its
    metrics and their directions. The point's run folder is its logger's (`run_folder`), set up by
    `prepare_point_folder`: a finished point with the same settings is reused, one whose settings changed is moved
    to <ablation>/stale/ and run again from scratch. `cli`: the point's CLI if already built (`point_cli`); `grid`:
    the grid's values, which give each HPARAMS column one type (`hparam_values`).

    Under `ddp` every rank runs this (the launcher re-runs the whole command in its children), but only global rank
    zero touches the point's files (its folder, settings, result.json, HPARAMS entry): two ranks moving the same
    point to stale/ failed ("Directory not empty") or deleted the run the other had just moved. The other ranks wait
    at the strategy's barrier (a no-op without a process group: before the first fit's launch only rank zero's
    process exists, and the children start after it set the point up) and then read whether the point is finished,
    and the last.ckpt to resume from, from what rank zero left: every rank decides alike, else one rank would fit
    while another skipped the point and the fit's collectives would hang. After the point's results are written the
    ranks meet again, so none reads the next point's folder before rank zero is done with this one.

    A configuration mistake found while training (a data folder that is not there, read at setup) is said once;
    the point's folder is removed if this call made it, so a point that never ran leaves nothing behind."""
    cli = cli if cli is not None else point_cli(config, name, point, extra)
    with configuration_phase():
        folder = run_folder(cli.config_init, cli.config)
    save_dir = folder.parents[len(Path(name).parts)]  # folder is <save_dir>/<name>/<point>
    result_path, hparams_path = folder / "result.json", folder.parent / "hparams" / folder.name
    rank_zero = cli.trainer.is_global_zero
    digest, new = prepare_point_folder(cli, point, folder, grid) if rank_zero else (None, False)
    cli.trainer.strategy.barrier("ablate_point_ready")  # no rank reads the folder before rank zero set it up
    if result_path.is_file():  # finished (`prepare_point_folder` moved a stale result away): the same on every rank
        return json.loads(result_path.read_text())["metrics"], metric_directions(cli.model, "val")
    last = folder / "checkpoints" / "last.ckpt"
    try:
        with counting(cli, "train") as trained:  # which weights the result scores, also from a spawned fit
            fit(cli, ckpt_path=str(last) if last.is_file() else None)
        with scoring_logged_apart(cli.trainer, "validate"):  # TensorBoard <point>/validate, not the fit's curves
            metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    except Exception as error:
        if new and is_configuration_error(error) and not last.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # it never trained: nothing to resume
            remove_if_empty(folder.parent, save_dir)
        raise
    metrics = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if not k.startswith("val/loss")}
    if rank_zero:
        write_hparams(hparams_path, point, metrics, grid)
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"point": point, "settings_sha256": digest, "metrics": metrics,
                                   "weights": trained.last_weights(cli.trainer)}, indent=1))
        os.replace(tmp, result_path)  # atomic: a killed run leaves no half-written result
    cli.trainer.strategy.barrier("ablate_point_written")  # before any rank reads the next point's folder
    return metrics, metric_directions(cli.model, "val")


def prepare_point_folder(cli: ZooCLI, point: dict[str, Any], folder: Path, grid: dict[str, list[Any]] | None = None
                         ) -> tuple[str, bool]:
    """Set up grid point `point`'s run folder `folder` before it runs (global rank zero only, `run_grid_point`);
    returns the hash of its settings and whether this call made the folder.

    The point's `resolved_settings` (config, the files it names, the source files of its classes' modules) are
    hashed and stored (settings.sha256, settings.json) before training, so an interrupted point resumes only with
    these settings. A finished point (result.json) with the same hash is left as it is, said reused (its HPARAMS
    entry written again where `keep_hparams_of` dropped it); a point whose settings changed since (another
    max_epochs, a changed config file or loss module, a refitted init_checkpoint, a changed data folder) is moved to
    <ablation>/stale/, result and all, and the changed keys are said. A point finished by an earlier ablate is kept
    when the settings it stored still hold: the old hash of the config alone (`legacy_settings_hash`, no file
    named), or settings.json without "code" (before code fingerprints) with the same config and files; a folder
    named by an ablate before `GridLoader` (lr=1e-3) is renamed first."""
    legacy = folder.parent / legacy_point_name(point)
    if not folder.exists() and legacy != folder and legacy.is_dir():  # named by an earlier ablate: lr=1e-3
        os.replace(legacy, folder)
        print(f"ablate: point {point_name(point)}: its folder {legacy.name} renamed {folder.name}")
    result_path, hash_path, settings_path = folder / "result.json", folder / "settings.sha256", folder / "settings.json"
    settings = resolved_settings(cli, folder)
    digest, label = settings_hash(settings), point_name(point)
    stored = hash_path.read_text().strip() if hash_path.is_file() else None
    if (stored is not None and stored != digest and not settings_path.is_file() and not settings["files"]
            and stored == legacy_settings_hash(cli)):  # a point of an earlier ablate with these very settings
        hash_path.write_text(digest + "\n")
        settings_path.write_text(json.dumps(settings, indent=1, default=str))
        stored = digest
    old = None
    with contextlib.suppress(OSError, ValueError):  # none, or cut short by a kill while it was written
        old = json.loads(settings_path.read_text())
    if (stored is not None and stored != digest and isinstance(old, dict) and "code" not in old
            and stored == settings_hash(without_code(settings))):  # finished before code fingerprints, the same
        hash_path.write_text(digest + "\n")  # config and files: kept (an upgrade does not rerun a whole grid),
        settings_path.write_text(json.dumps(settings, indent=1, default=str))  # the code it ran taken as today's
        stored = digest
    if folder.is_dir() and stored != digest:
        stale = move_aside(folder, folder.parent / STALE / f"{label}-{(stored or 'unknown')[:8]}")
        print(f"ablate: point {label}: settings changed since its last run; run again (old run moved to {stale})\n"
              f"  changed: {settings_changes(old, settings)}")
        # the moved run's HPARAMS entry and the table holding its numbers go too: a rerun stopped before its end
        # left them describing a run no longer in the grid folder (its result.json went to stale/ with it)
        shutil.rmtree(folder.parent / "hparams" / folder.name, ignore_errors=True)
        move_earlier_reports(folder.parent, REPORT_FILES, "ablate")
    elif result_path.is_file():
        print(f"ablate: point {label}: finished with the same settings, reused")
        hparams_path = folder.parent / "hparams" / folder.name
        if not hparams_path.is_dir():  # dropped from an earlier grid's HPARAMS entries (`keep_hparams_of`)
            write_hparams(hparams_path, point, json.loads(result_path.read_text())["metrics"], grid)
        return digest, False
    new = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    hash_path.write_text(digest + "\n")  # before training: an interrupted point resumes only with these settings
    settings_path.write_text(json.dumps(settings, indent=1, default=str))
    return digest, new


def summarise(results: list[tuple[dict[str, Any], dict[str, float]]], labels: dict[str, str] | None = None
              ) -> list[dict[str, Any]]:
    """Group grid points that differ only in the seed; every metric's mean and standard deviation over the seeds as
    numbers in full precision (`<metric>_mean`, `<metric>_std`; std 0 for one seed: the report rounds for reading,
    the CSV keeps them). A seed whose metric is NaN (nothing to score: ReNN's rule precision where no rule fired) is
    left out of that metric's mean and std, as the zoo leaves NaN out of means; NaN where every seed is, and the std
    NaN where one seed of several scored. Grid keys are columns labelled by `labels` (default `column_labels` of the
    points' keys)."""
    if labels is None:
        labels = column_labels([k for k in dict.fromkeys(k for point, _ in results for k in point) if k != SEED_KEY])
    groups: dict[tuple, list[dict[str, float]]] = {}
    settings: dict[tuple, dict[str, Any]] = {}
    for point, metrics in results:
        setting = {k: v for k, v in point.items() if k != SEED_KEY}
        key = tuple(sorted((k, str(v)) for k, v in setting.items()))
        groups.setdefault(key, []).append(metrics)
        settings[key] = setting
    rows = []
    for key, runs in groups.items():
        row: dict[str, Any] = {labels.get(k, k): v for k, v in settings[key].items()}
        row["seeds"] = len(runs)
        for metric in dict.fromkeys(m for run in runs for m in run):
            values = torch.tensor([run[metric] for run in runs if metric in run], dtype=torch.float64)
            values = values[~values.isnan()]  # a seed with nothing to score (NaN) is left out of the mean
            row[f"{metric}_mean"] = values.mean().item() if len(values) else math.nan
            # one scored seed of several: no spread to tell (std 0.0 would read as seeds that agree)
            row[f"{metric}_std"] = (values.std().item() if len(values) > 1 else
                                    0.0 if len(values) == len(runs) == 1 else math.nan)
        rows.append(row)
    return rows


def ablate(config: str | list[str], grid_items: list[str], name: str, extra: list[str]) -> list[dict[str, Any]]:
    """Run every grid point (reusing finished ones whose settings are unchanged), write the table; each point's
    TensorBoard HPARAMS entry is written when the point finishes, and entries of points no longer in the grid go.
    Under `ddp` every rank runs this and gets the rows; only global rank zero writes files (`run_grid_point`)."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    with configuration_phase():  # the grid and the overrides; then every point's arguments, before any training
        configs = config_list(config)
        check_no_print_config("ablate", " --config ".join(configs), extra)
        grid = parse_grid(grid_items)
        points = grid_points(grid)
        check_extra(grid, extra)
        check_logger(configs, extra)
        # a run's saved config.yaml: without fit's ckpt_path and weights_only
        config = [config_argument(Path(each), "ablate") if os.path.isfile(each) else each for each in configs]
    with naming_the_point(1, len(points), points[0]):
        cli = point_cli(config, name, points[0], extra)
        first_folder = run_folder(cli.config_init, cli.config)
        folder = first_folder.parent  # <save_dir>/<name>
        preflight(cli.model, cli_callbacks(cli), cli.datamodule)  # data, optimiser, losses, monitors: before any point
        refuse_empty_budget(cli.config.get("trainer"))
        first_settings = {settings_hash(resolved_settings(cli, first_folder)): points[0]}
    with configuration_phase():
        check_not_a_fit_run(folder, "ablate")  # a fit's next run would move the table and leave the points
    check_points(config, name, points[1:], extra, first=2, total=len(points), settings_of=first_settings)
    labels = column_labels([key for key in grid if key != SEED_KEY])
    names = {point_name(point) for point in points}
    if cli.trainer.is_global_zero:  # `ddp` runs this on every rank: rank zero moves files
        move_other_study(folder, list(labels.values()), names)
    results, directions = [], {}
    for index, point in enumerate(points, 1):
        print(f"\n=== ablate point {index}/{len(points)}: {point_name(point)} ===", flush=True)
        metrics, point_directions = run_grid_point(config, name, point, extra, cli if index == 1 else None, grid)
        results.append((point, metrics))
        directions |= point_directions
    rows = summarise(results, labels)
    if not cli.trainer.is_global_zero:  # `ddp` runs this on every rank: rank zero writes the table
        return rows
    dropped = keep_hparams_of(folder / "hparams", names)
    if dropped:
        print(f"ablate: HPARAMS entries of points not in this grid removed (their runs stay in {folder}): "
              f"{', '.join(dropped)}", flush=True)
    write_report(folder, {"ablation": rows}, directions, stem="ablation", settings=[*labels.values(), "seeds"])
    note = weights_note([json.loads((folder / point_name(point) / "result.json").read_text()).get("weights")
                         for point in points])
    with open(folder / "ablation.md", "a") as report_file:
        report_file.write(f"\n{note}\n")
    print(f"\n{note}", flush=True)
    return rows


def weights_note(weights: list[str | None]) -> str:
    """The line under the table saying which weights its numbers are of: each point's last weights
    (`SampleCounter.last_weights`, stored in its result.json; None for a point finished before ablate stored them),
    with how many points each epoch and step holds, and not the best-*.ckpt its checkpoint callback kept."""
    counts: dict[str, int] = {}
    for value in weights:
        key = value or "last (epoch and step not recorded: finished by an earlier ablate)"
        counts[key] = counts.get(key, 0) + 1
    held = "; ".join(f"{key}: {count} point{'s' if count != 1 else ''}" for key, count in counts.items())
    return (f"Every point is scored with its last weights, as its fit left them ({held}), not with the best-*.ckpt "
            f"its checkpoint callback kept.")
