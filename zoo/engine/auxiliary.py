"""Frozen helper models (L2X's black box and EVAL-X evaluator, the textual image encoder and sentence classifier):
trained by a real Trainer before the System's first step, then frozen.

A System lists them in `auxiliaries()`. For each one not yet ready (its `<name>_ready` buffer, saved in every
checkpoint, so a resumed run never retrains it), in this order:
1. weights from `checkpoint` when given (a state dict, safetensors file or Lightning checkpoint);
2. else the cached checkpoint of an earlier run in the run folder (`<run>/auxiliary/<name>-<key>.ckpt`, keyed by
   what defines it: the module's class and shapes, the training settings, the datamodule's settings and what the
   files and folders they name hold, so a re-fit after the data changed under the same path trains it again);
3. else trained by a `pl.Trainer` with the run's accelerator, devices, strategy and precision, logged under the run
   (TensorBoard `<run>/auxiliary/<name>`), and cached as above (written atomically).
`train.py` prepares them before `trainer.fit`, so a distributed run trains each of them once with its own strategy
(under a script launch, `ddp` or torchrun, the helpers after the first join the process group the first one's fit
started); a single-process `trainer.fit` called from Python prepares them in `on_fit_start`.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, is_dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from pytorch_lightning.utilities.seed import isolate_rng
import torch
import torch.nn as nn

from zoo.fingerprints import file_fingerprint, folder_fingerprint, written_by_runs
from zoo.weights import load_module_weights, weights_will_be_replaced


@dataclass
class Auxiliary:
    """A frozen helper model of a System.

    Args:
        name: the System attribute path of the module ("black_box", "model.image_encoder"); the System has a
            buffer `<last part>_ready`.
        loss: `loss(module, batch) -> scalar tensor`: one training batch's loss.
        epochs: training epochs (0: never trained; the module must be loaded or stays as built).
        lr: Adam learning rate.
        checkpoint: load from this file instead of training.
        trainable_after: leave requires_grad on after preparation (a fine-tuned encoder).
    """

    name: str
    loss: Callable[[nn.Module, Any], torch.Tensor]
    epochs: int
    lr: float = 1e-3
    checkpoint: str | None = None
    trainable_after: bool = False

    def module(self, system: nn.Module) -> nn.Module:
        return system.get_submodule(self.name)

    def ready_flag(self, system: nn.Module) -> torch.Tensor:
        return getattr(system, f"{self.name.rsplit('.', 1)[-1]}_ready")


class AuxiliarySystem(pl.LightningModule):
    """Trains one auxiliary module: its batch loss, Adam, the loss logged as train/loss."""

    def __init__(self, module: nn.Module, loss: Callable[[nn.Module, Any], torch.Tensor], lr: float) -> None:
        super().__init__()
        self.module, self.batch_loss, self.lr = module, loss, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(self.module, batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.module.parameters(), lr=self.lr)


def auxiliaries_pending(system: Any) -> bool:
    return any(not bool(aux.ready_flag(system)) for aux in system.auxiliaries())


def cache_key(aux: Auxiliary, module: nn.Module, datamodule: Any, outputs: Path | None = None) -> str:
    """What defines a trained auxiliary: module class, its layers' settings (the repr: dropout rates, ...) and
    shapes, training settings, the loss (its class and settings: the EVAL-X evaluator's mask geometry), the data
    (`data_settings`, and `data_contents`: what the files and folders they name hold, so a CSV rewritten under the
    same path makes another key) and the run's seed (`seed_everything`: it draws the helper's first weights and its
    batches, so a seed sweep trains a helper per seed). A helper cached for other data, another loss or seed is
    never reused. `outputs`: the run folder, where the cache is written (a data folder holding it is not
    fingerprinted: see `data_contents`). A pure function of the settings and the files, so every process of a
    distributed run reading the same files gets the same key."""
    shapes = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    text = repr((type(module).__qualname__, repr(module), shapes, aux.epochs, aux.lr, describe_callable(aux.loss),
                 type(datamodule).__qualname__, data_settings(datamodule), starting_weights(module),
                 os.environ.get("PL_GLOBAL_SEED"), data_contents(datamodule, outputs)))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def starting_weights(module: nn.Module) -> list[tuple[str, int, int]]:
    """The pretrained files the module's backbones started from (`Backbone.load_report`), each with its size and
    modification time: an encoder trained from ImageNet weights is never reused for one trained from scratch, nor
    for one from a changed file."""
    files = []
    for sub in module.modules():
        report = getattr(sub, "load_report", None)
        if report is not None:
            path = Path(report.path)
            stat = path.stat() if path.is_file() else None
            files.append((str(path), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1))
    return sorted(files)


def describe_callable(function: Any) -> str:
    """A loss as the cache key reads it, the same in every process: a function by its qualified name, a dataclass
    by its class and fields (a field holding a callable by that callable's name), anything else by its class."""
    if is_dataclass(function) and not isinstance(function, type):
        fields = {f.name: getattr(function, f.name) for f in dataclass_fields(function)}
        named = {k: getattr(v, "__qualname__", None) or repr(v) if callable(v) else repr(v) for k, v in fields.items()}
        return f"{type(function).__qualname__}{sorted(named.items())}"
    return getattr(function, "__qualname__", None) or type(function).__qualname__


def saved_settings(datamodule: Any) -> dict[str, Any]:
    """The datamodule's settings: its saved hyperparameters, else its constructor's arguments read from the
    attributes of the same names (the zoo's datamodules keep them so: `dataset`, `num_train`, `root`, `seed`, ...)."""
    saved = dict(getattr(datamodule, "hparams", {}) or {})
    if not saved:
        names = [n for n in inspect.signature(type(datamodule).__init__).parameters if n != "self"]
        saved = {n: getattr(datamodule, n) for n in names if hasattr(datamodule, n)}
    return saved


def data_settings(datamodule: Any) -> list[tuple[str, str]]:
    """The datamodule's settings (`saved_settings`), each as its repr."""
    return sorted((k, repr(v)) for k, v in saved_settings(datamodule).items())


def data_contents(datamodule: Any, outputs: Path | None = None) -> list[tuple[str, str]]:
    """What the datamodule's files and folders hold: for each setting (`saved_settings`) whose value
    is a path naming an existing file or folder (relative paths read from the working folder, as the datamodule
    reads them), (setting, `file_fingerprint` / `folder_fingerprint`): a file's sha256 (its size and mtime past
    `HASHED_FILE_LIMIT`), a folder's file count and each visible file's path, size and mtime (a stat per file, no
    reads). Left out: a folder the run writes in (`written_by_runs`; `outputs` the run folder), a fingerprint of
    which would retrain every helper at every fit."""
    contents = []
    for name, value in saved_settings(datamodule).items():
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            continue
        path = os.fspath(value)
        if os.path.isfile(path):
            contents.append((name, file_fingerprint(path)))
        elif os.path.isdir(path) and not written_by_runs(path, outputs):
            contents.append((name, folder_fingerprint(path)))
    return sorted(contents)


def run_folder(trainer: pl.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


def registered_strategy_name(strategy: Any) -> str:
    """The Lightning registry name of a strategy of the same class and launch ("ddp_spawn" for a spawning DDP),
    so that the helper Trainer launches its processes as the run does (not with "auto", whose DDP re-runs the
    command line in subprocesses); "auto" for a strategy the registry does not name."""
    from pytorch_lightning.strategies import StrategyRegistry

    for name, entry in StrategyRegistry.items():
        if entry["strategy"] is type(strategy) and all(
                getattr(strategy, f"_{key}", getattr(strategy, key, None)) == value
                for key, value in entry["init_params"].items()):
            return name
    return "auto"


def inside_spawned_rank(trainer: pl.Trainer) -> bool:
    """Whether this process is already one rank of `trainer`'s running distributed call that a spawning launcher
    (`ddp_spawn`, `ddp_notebook`) started: there no second launch can happen. A script launch (`ddp`: Lightning's
    re-run of the command line, torchrun, SLURM; `_SubprocessScriptLauncher`) keeps its process group for every
    later fit of the script, which a helper's DDP fit joins: after the first helper's fit started the group, the
    next helpers still train with the run's strategy (they were trained by each process alone, on all the data)."""
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    script = isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)
    return torch.distributed.is_available() and torch.distributed.is_initialized() and not script


def _trainer_like(trainer: pl.Trainer, folder: Path, name: str, epochs: int) -> pl.Trainer:
    """A Trainer for one helper: the run's accelerator, precision, strategy, devices and nodes (so a distributed run
    trains it once, on every rank's share of the data); one device for a single-process run (`on_fit_start`'s
    preparation), or inside a rank a spawning launcher already started (`inside_spawned_rank`: no second launch can
    happen there, each rank trains it alone; `ZooSystem.on_fit_start` refuses a distributed fit with helpers
    pending, so only a direct call from inside a running `ddp_spawn` call gets there). Its TensorBoard run
    (``<run>/auxiliary/<name>``) holds the helper's curves and no HPARAMS entry: Lightning gave it one with the
    datamodule's settings as its only columns and hp_metric -1 (a helper has no monitor), a row among the real
    runs' in an ablation's or comparison's HPARAMS table."""
    from pytorch_lightning.loggers import TensorBoardLogger

    strategy_name = registered_strategy_name(trainer.strategy)
    settings: dict[str, Any] = dict(
        accelerator=trainer.accelerator, precision=trainer.precision, max_epochs=epochs,
        logger=TensorBoardLogger(save_dir=str(folder), name="auxiliary", version=name, default_hp_metric=False),
        enable_autolog_hparams=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(folder))  # deterministic flags: the run's, left as they are
    if trainer.world_size > 1 and not inside_spawned_rank(trainer):
        settings |= dict(strategy=strategy_name, devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    else:
        settings |= dict(devices=1)
    return pl.Trainer(**settings)


def load_auxiliary_checkpoints(system: Any) -> None:
    """Load every auxiliary of `system` that names a `checkpoint` and is not ready, and mark it ready. A System may
    call this at the end of its __init__, so that a bad file fails at once and validate/test/predict work without a
    fit; `prepare_auxiliaries` calls it too. Nothing is read while a checkpoint's weights will replace the System's
    (`zoo.weights.weights_will_be_replaced`: a resumed fit, `--ckpt_path`, `load_from_checkpoint`): the auxiliaries'
    weights and ready flags come from it, and the file may have moved."""
    if weights_will_be_replaced():
        return
    for aux in system.auxiliaries():
        ready = aux.ready_flag(system)
        if aux.checkpoint is not None and not bool(ready):
            load_module_weights(aux.module(system), aux.checkpoint, f"{aux.name}.", aux.name.replace("_", " "))
            ready.fill_(True)


def prepare_auxiliaries(system: Any, trainer: pl.Trainer, datamodule: Any) -> None:
    """Load, reuse or train (in that order) every auxiliary of `system` that is not ready; then freeze it. A System
    with a `check_data(datamodule)` (the textual one: sentences present, `vocab_size` of the data's vocabulary)
    checks the data first, as its fit does at its start: a helper trained on bad data would fail on its first batch
    with the helper's own, less helpful, message."""
    check_data = getattr(system, "check_data", None)
    if callable(check_data) and datamodule is not None:
        check_data(datamodule)
    folder = run_folder(trainer)
    load_auxiliary_checkpoints(system)
    for aux in system.auxiliaries():
        module, ready = aux.module(system), aux.ready_flag(system)
        if not bool(ready):
            if aux.epochs > 0:
                _load_or_train(aux, module, trainer, datamodule, folder)
            else:
                continue
            ready.fill_(True)
        module.requires_grad_(aux.trainable_after)
        if not aux.trainable_after:
            module.eval()


def _load_or_train(aux: Auxiliary, module: nn.Module, trainer: pl.Trainer, datamodule: Any, folder: Path) -> None:
    name = aux.name.rsplit(".", 1)[-1]
    cache = folder / "auxiliary" / f"{name}-{cache_key(aux, module, datamodule, folder)}.ckpt"
    if cache.is_file():
        load_module_weights(module, cache, "", name.replace("_", " "))
        return
    module.requires_grad_(True).train()
    device = next(iter(module.parameters())).device
    with isolate_rng():  # trained or loaded from the cache, a helper leaves the run's random stream as it found it
        _trainer_like(trainer, folder, name, aux.epochs).fit(AuxiliarySystem(module, aux.loss, aux.lr),
                                                              datamodule=datamodule)
    datamodule.trainer = trainer  # the run's trainer again (the helper's fit took the datamodule over)
    module.to(device)  # Lightning's teardown moved it to the CPU
    if int(os.environ.get("RANK", 0)) == 0 and (not torch.distributed.is_initialized()
                                               or torch.distributed.get_rank() == 0):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
        os.replace(tmp, cache)  # atomic: a killed run leaves no half-written cache
