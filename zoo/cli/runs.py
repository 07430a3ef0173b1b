"""A run folder holds one run: an earlier run found where a new one is about to start is moved aside first.

The configs' loggers have version "" (checkpoints/<name>/ is the run folder; Lightning's version_N numbering is
off), so a second `fit` with the same name, a compare run again, or `fit --config <run>/config.yaml` would write
into the earlier run's folder: best-*.ckpt beside best-*-v1.ckpt, two runs' event files on one curve, the earlier
run's pictures and last.ckpt left for `--ckpt_path last` to resume. `move_earlier_run` moves such a run to
<parent>/stale/<run>-<time>/ before the new one writes anything (the run's own entries, its helper models'
curves included: other runs' folders, the helper cache and stale/ stay); ablate moves a whole point whose settings
changed (`move_aside`). The report files of a compare or ablate folder that describe runs being moved go to
<folder>/stale/ too (`move_earlier_reports`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from zoo.engine.callbacks import logger_folder
from zoo.fingerprints import holds_working_folder

STALE = "stale"  # <parent of the run folder>/stale/: where earlier runs go
HELPERS = "auxiliary"  # <run>/auxiliary/: the helper models' cache files and their TensorBoard folders
KEPT = (HELPERS,)  # stays in the run folder: the helper-model cache, keyed by content (`zoo.engine.auxiliary`)
EVENTS = "events.out.tfevents.*"  # TensorBoard's event files
EVALUATION_FOLDERS = ("", "validate", "test")  # where a run's event files are (`log_evaluation_apart`)


def config_strings(config: Any, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Every non-empty string of a nested config, less the values of the keys named in `skip` (at any depth)."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key not in skip:
                yield from config_strings(value, skip)
    elif isinstance(config, list):
        for value in config:
            yield from config_strings(value, skip)
    elif isinstance(config, str) and config:
        yield config


def existing_files(config: Any, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Every string of a nested config that names an existing file (init_checkpoint, pretrained_path, ...),
    relative paths read from the working folder as the run reads them."""
    return (value for value in config_strings(config, skip) if os.path.isfile(value))


def logger_run_folders(trainer: pl.Trainer) -> list[Path]:
    """The run folders of `trainer`'s TensorBoard and CSV loggers, each once (`zoo.engine.callbacks.logger_folder`);
    none without a logger (`logger: false`, fast_dev_run's dummy) or for another kind."""
    return list(dict.fromkeys(folder for folder in map(logger_folder, trainer.loggers) if folder is not None))


def run_folder_settings(trainer: pl.Trainer) -> list[tuple[str, Path]]:
    """The folders `trainer` will write into, each with the setting that places it: its TensorBoard / CSV loggers'
    `save_dir` and run folders (`<save_dir>/<name>/<version>`, a TensorBoard `sub_dir` included), its checkpoint
    callbacks' `dirpath` where the config gives one, and `default_root_dir`."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    found: list[tuple[str, Path]] = []
    for logger in trainer.loggers:
        folder = logger_folder(logger)
        if folder is None:
            continue
        sub_dir = getattr(logger, "sub_dir", None)  # validate / test: <run>/<stage> (`log_evaluation_apart`)
        save_dir = Path(os.path.expanduser(os.path.expandvars(str(logger.save_dir))))  # as `logger_folder` reads it
        found += [("--trainer.logger.init_args.save_dir", save_dir),  # checked first, its parents too
                  ("--trainer.logger.init_args.name (and version)",
                   folder / sub_dir if isinstance(sub_dir, str) else folder)]
    found += [("--checkpoint.dirpath", Path(callback.dirpath)) for callback in trainer.checkpoint_callbacks
              if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None]
    return [*found, ("--trainer.default_root_dir", Path(trainer.default_root_dir))]


def check_run_folders(trainer: pl.Trainer) -> None:
    """Refuse, before anything is written, a run whose folders (`run_folder_settings`) lie at or below a FILE: the
    logger's `makedirs` raised NotADirectoryError with a traceback at the first log line (a mistyped
    `--trainer.logger.init_args.save_dir=config.yaml`). Names the setting, the folder and the file in the way, as a
    configuration error. Called by ZooCLI once its Trainer is built; compare and ablate get it through ZooCLI."""
    from zoo.cli.errors import mark

    for setting, folder in run_folder_settings(trainer):
        blocking = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
        if blocking is not None:
            inner = "" if blocking == folder else f" (the folder {str(folder)!r} would lie inside it)"
            raise mark(NotADirectoryError(
                f"{setting}: {str(blocking)!r} is a file, not a folder{inner}. Give a folder (one that does not exist "
                f"yet is made), or move the file away; nothing was written."))


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a run: a last.ckpt or best-*.ckpt in <folder>/checkpoints, TensorBoard event files
    in it or its validate / test sub-folders, or a CSVLogger's metrics.csv. A folder with only auxiliary/ (a run
    stopped while its helper models trained) or a config.yaml holds none."""
    checkpoints = folder / "checkpoints"
    if (checkpoints / "last.ckpt").is_file() or any(checkpoints.glob("best-*.ckpt")):
        return True
    return (folder / "metrics.csv").is_file() or any(any((folder / sub).glob(EVENTS)) for sub in EVALUATION_FOLDERS)


def stale_path(folder: Path) -> Path:
    """<parent>/stale/<folder name>-<local time, to the second>, with -2, -3, ... where that is taken."""
    base = folder.parent / STALE / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, count = base, 1
    while path.exists():
        count += 1
        path = base.with_name(f"{base.name}-{count}")
    return path


def move_aside(folder: Path, stale: Path) -> Path:
    """Move a whole run folder `folder` to `stale` (a folder there already is replaced): ablate's point whose
    settings changed, helper cache and all (a new point starts from nothing). Returns `stale`."""
    shutil.rmtree(stale, ignore_errors=True)
    stale.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(stale)  # one rename: a run killed here is either still in place or wholly moved
    return stale


def inside(path: str | Path | None, folder: Path) -> bool:
    """Whether file `path` lies in `folder` (or below)."""
    return path is not None and folder.resolve() in Path(path).resolve().parents


def helper_curves(folder: Path) -> list[Path]:
    """The TensorBoard folders of run folder `folder`'s helper models (`<run>/auxiliary/<name>/`): the earlier run's
    curves, which move with it, so that a helper the next run trains again (its data changed) starts a curve of its
    own instead of a second one from step 0 in the same folder. The cache files beside them
    (`auxiliary/<name>-<key>.ckpt`, keyed by content) stay for the next run to reuse."""
    helpers = folder / HELPERS
    if not helpers.is_dir() or holds_run(helpers):  # a run named <run>/auxiliary: none of it is a helper's curve
        return []
    def curve(entry: Path) -> bool:  # TensorBoard's files only: a helper's log, not a run's checkpoints
        return entry.is_dir() and all(f.match(EVENTS) or f.name == "hparams.yaml"
                                      for f in entry.rglob("*") if f.is_file())

    return sorted(entry for entry in helpers.iterdir() if curve(entry))


def own_entries(folder: Path) -> list[Path]:
    """What of run folder `folder` is its run's: every entry but the helper cache (`KEPT`), earlier runs (`STALE`)
    and sub-folders that hold runs of their own (a run named <name>/<sub> under a run named <name>, or every run
    under checkpoints/ when the logger's name is empty)."""
    def other_runs(entry: Path) -> bool:
        return entry.is_dir() and entry.name not in EVALUATION_FOLDERS and entry.name != "checkpoints" and any(
            holds_run(sub) for sub in (entry, *entry.rglob("*")) if sub.is_dir())

    return [entry for entry in sorted(folder.iterdir())
            if entry.name not in (*KEPT, STALE) and not other_runs(entry)]


def move_earlier_run(trainer: pl.Trainer, command: str, restores_checkpoint: bool, config: Any = None,
                     reads: str | None = None) -> list[Path]:
    """Before a run that does not restore a checkpoint starts in its loggers' run folders (`logger_run_folders`),
    an earlier run there (`holds_run`) is moved to <parent>/stale/<run>-<time>/ (its `own_entries`, and its helpers'
    curves to <stale>/auxiliary/ (`helper_curves`): the helper cache, stale/ and other runs' folders stay), and said
    in one line. Nothing moves for a resumed run (`restores_checkpoint`), without a run folder (logger false,
    fast_dev_run), on a process other than global rank zero (`ddp`'s children re-run the CLI: their ranks come from
    LOCAL_RANK / NODE_RANK when the Trainer is built), from a folder that holds the working folder (save_dir "." with
    an empty name: the user's own files), nor where the run still reads a file of that folder outside auxiliary/
    (`reads`, a compare run's checkpoint, or a file its `config` names, such as a sentence_classifier_checkpoint,
    read after this): that is said instead. Returns where the earlier runs went."""
    if restores_checkpoint or not trainer.is_global_zero:
        return []
    moved = []
    for folder in logger_run_folders(trainer):
        if not folder.is_dir() or not holds_run(folder):
            continue
        named = [*existing_files(config or {}, skip=("config", "ckpt_path")), *([reads] if reads else [])]
        needed = [path for path in named if inside(path, folder) and not any(inside(path, folder / k) for k in KEPT)]
        if needed or holds_working_folder(folder):
            why = f"this run reads {needed[0]} from it" if needed else "it holds the working folder"
            print(f"{command}: {folder} holds an earlier run, left in place: {why} (its files and curves mix with "
                  f"this run's; give this run another logger name to keep them apart).", flush=True)
            continue
        stale = stale_path(folder)
        stale.mkdir(parents=True)
        for entry in own_entries(folder):
            entry.rename(stale / entry.name)
        for entry in helper_curves(folder):
            (stale / HELPERS).mkdir(exist_ok=True)
            entry.rename(stale / HELPERS / entry.name)
        kept = [name for name in KEPT if (folder / name).exists()]
        print(f"{command}: {folder} held an earlier run: moved to {stale}"
              f"{' (' + ', '.join(f'the helper cache {name}/' for name in kept) + ' kept)' if kept else ''}"
              f"{instead_of_a_new_run(command, stale)}", flush=True)
        moved.append(stale)
    return moved


def instead_of_a_new_run(command: str, stale: Path) -> str:
    """How to use the earlier run just moved to `stale` instead of the new one, for `command`'s user: `fit` resumes
    a run with --ckpt_path last; compare takes no --ckpt_path (it refuses the option), it scores trained weights
    given as a spec run's `checkpoint:`. "." for another command."""
    if command == "fit":
        return "; to continue a run instead, give --ckpt_path last."
    if command == "compare":
        last = stale / "checkpoints" / "last.ckpt"
        weights = last if last.is_file() else stale / "checkpoints" / "<file>.ckpt"
        return (f"; to score that run instead of training it again, list it in a compare spec with "
                f"`checkpoint: {weights}` (compare takes no --ckpt_path).")
    return "."


def move_earlier_reports(folder: Path, names: Iterable[str], command: str, runs_stay: bool = False) -> Path | None:
    """Move report folder `folder`'s files among `names` (an earlier compare's report.md, ablate's ablation.md, ...)
    to <folder>/stale/<stem of the first name>-<time>/ (`stale_path`, where the earlier runs go), and say so in one
    line: a report left in place while the runs it describes move to stale/ one by one described runs no longer
    there once a rerun was interrupted. `runs_stay`: this command's runs have no run folder (fast_dev_run,
    logger=false), so the earlier runs stay where they are and the message says so: the report is kept in stale/ all
    the same, from the smoke run's that replaces it. Returns where they went; None (nothing said) where there were
    none."""
    names = list(names)
    found = [folder / name for name in names if (folder / name).is_file()]
    if not found:
        return None
    stale = stale_path(folder / Path(names[0]).stem)
    stale.mkdir(parents=True)
    for path in found:
        path.rename(stale / path.name)
    why = (f"this {command}'s runs have no run folder (fast_dev_run, logger=false): the earlier runs stay in place, "
           f"and the report this {command} writes when it ends describes its own runs only" if runs_stay else
           f"they describe the earlier runs; this {command} writes its own when it ends")
    print(f"{command}: the earlier {', '.join(path.name for path in found)} of {folder} moved to {stale} ({why}).",
          flush=True)
    return stale
