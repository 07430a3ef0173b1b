"""Callbacks every family shares: last.ckpt after every validation and at the end of fit, RNG state in checkpoints,
the base of every picture callback (a fixed batch, rank zero, eval mode and no_grad, RNG isolated), the one place
that says where a run's pictures go, what their files are named and at which step they are logged (`run_folder`,
`record_name`, `logged_step`), where validate /
test log apart from the fit (`log_evaluation_apart`; compare's and ablate's scoring validation after a fit:
`scoring_logged_apart`) and the loader of a whole split that rank-zero reports read
(`whole_split_loader`)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import DummyLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from zoo.figures import log_figure, log_text, save_figure


class LatestCheckpoint(ModelCheckpoint):
    """`last.ckpt` after every validation, whether or not the monitored metric improved (Lightning's `save_last`
    only refreshes it when a top-k checkpoint is written, so a killed run could resume from a stale state), and
    once more when fit ends if the last steps were not saved yet (`check_val_every_n_epoch` > 1, `max_steps`
    mid-epoch, early stop): last.ckpt always holds the final weights. The end-of-fit save is the same save (same
    contents, written atomically by `trainer.save_checkpoint`); nothing is written when fit stops on an exception
    or is killed, so such a run resumes from its last validation as before. A validation inside a
    gradient-accumulation window (`accumulate_grad_batches` with a `val_check_interval` that is not a multiple of it)
    defers its save to the epoch's end, Lightning's own end-of-epoch save point, where the last batch has stepped:
    the window's gradients are not in a checkpoint, so a run resumed from one written mid-window stepped without them.

    Every checkpoint written after fit stopped inside an epoch (`max_steps`, `max_time`, a stop asked for mid-epoch)
    records that epoch as unfinished (`reopen_interrupted_epoch`): Lightning has already closed it by then, and a run
    resumed under `max_epochs` skipped the epoch's remaining batches and its validation.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         enable_version_counter=False)
        self._deferred = False  # a validation inside an accumulation window asked for a save

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deferred = inside_accumulation_window(trainer)
        if not self._deferred:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred and not self._should_save_on_train_epoch_end(trainer):
            self._deferred = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips fast_dev_run and a step already saved
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        reopen_interrupted_epoch(trainer, checkpoint)  # every full checkpoint, whichever callback writes it


def stopped_inside_epoch(trainer: pl.Trainer) -> bool:
    """Whether fit has closed an epoch that did not train all its batches: the training loop stopped inside it
    (`max_steps`, `max_time`, `should_stop` set mid-epoch) and Lightning ran the epoch's end anyway (its epoch
    progress counts it processed and completed, its batch progress is not at the last batch)."""
    if trainer.state.fn != TrainerFn.FITTING:
        return False
    loop = trainer.fit_loop
    epochs, batches = loop.epoch_progress.current, loop.epoch_loop.batch_progress
    closed = epochs.started == epochs.processed > 0  # the current epoch went through Lightning's epoch end
    expected = trainer.num_training_batches  # after limit_train_batches; inf for an iterable without a length
    return closed and not batches.is_last_batch and 0 < batches.current.ready < expected


def reopen_interrupted_epoch(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint written after fit stopped inside an epoch (`stopped_inside_epoch`), made to say what a checkpoint
    written at the same batch inside the epoch says: the epoch started, not processed nor completed (`epoch` the
    interrupted one). Lightning saved it as processed, and `FitLoop` resumes such a checkpoint at the next epoch
    unless `max_steps` is set: the epoch's remaining batches and its validation were skipped, and the resumed run
    ended short of an uninterrupted one's budget (7 of 9 steps) or trained nothing at all. Resumed from the checkpoint
    now, Lightning restarts mid-epoch and the training loader continues the epoch (`datamodules.resumable`), so the
    run ends bit-identical to one that never stopped. Only the checkpoint's copy is changed: the finished fit's
    loops are left as they are."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if progress is None or not stopped_inside_epoch(trainer):
        return
    for counts in (progress["total"], progress["current"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1  # idempotent: started is untouched
    checkpoint["epoch"] = progress["current"]["started"] - 1  # the epoch it stopped in, as a save inside it says


def inside_accumulation_window(trainer: pl.Trainer) -> bool:
    """Whether fit stands between two batches of one gradient-accumulation window (`accumulate_grad_batches` > 1 and
    a validation that `val_check_interval` placed mid-window): the gradients of the window's earlier batches are
    not in a checkpoint, so a run resumed from one written now would step without them. Every rank decides alike
    (the same batch counts)."""
    return trainer.state.fn == TrainerFn.FITTING and trainer.fit_loop.epoch_loop._should_accumulate()


class RNGStateCallback(pl.Callback):
    """Saves the torch (CPU and, where the run uses it, the current CUDA device's), numpy and Python random states in
    every checkpoint and restores them on resume, so a run killed mid-epoch and resumed from last.ckpt draws the same
    batches and noise as an uninterrupted one (noise drawn on a GPU, e.g. CEM's RandInt masks, included). States
    are stored as tensors and plain lists: the checkpoint still loads with weights_only=True. A CUDA state is not
    restored on a machine without CUDA (a GPU run resumed on the CPU draws its device noise anew)."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        version, python_state, gauss = random.getstate()
        cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_initialized() else {}  # never starts CUDA
        return {
            "torch": torch.get_rng_state(),
            **cuda,
            "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
            "python": {"version": version, "state": list(python_state), "gauss": gauss},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        numpy_state = state["numpy"]
        np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["gauss"]))
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def precision_context(trainer: pl.Trainer) -> ContextManager[Any]:
    """The run's precision, as Lightning runs a step in it (`precision_plugin.forward_context`: autocast under
    *-mixed, the default dtype under *-true, nothing in float32). Lightning enters it for the *_step hooks only: a
    callback that runs the model elsewhere enters it itself (with its inputs through `precision_input`), or under
    `--trainer.precision=bf16-true` its float32 inputs meet bf16 parameters, which refuse them. A bare stand-in for
    a Trainer (tests) has no precision plugin: no context."""
    plugin = getattr(trainer, "precision_plugin", None)
    return nullcontext() if plugin is None else plugin.forward_context()


def precision_input(trainer: pl.Trainer, data: Any) -> Any:
    """`data` (a tensor or a collection of them) as Lightning hands a batch to a step in the run's precision
    (`precision_plugin.convert_input`): float tensors in bf16 under bf16-true, float64 under 64-true, the same
    object in float32 and under *-mixed. `data` itself is not changed. A stand-in without a plugin: `data`."""
    plugin = getattr(trainer, "precision_plugin", None)
    return data if plugin is None else plugin.convert_input(data)


class FixedBatchCallback(pl.Callback):
    """Base of every picture callback: after each validation epoch (not the sanity check), on rank zero, `draw` gets
    a fixed validation batch and the model in eval mode under no_grad, in the run's precision (`precision_context`,
    and `fixed_batch` converts the batch as Lightning does a step's); the training mode is restored afterwards.

    Everything runs under `isolate_rng`: building the batch iterates a DataLoader, which draws its base seed from
    the global torch generator. Without the isolation the first picture of a run shifts every later shuffle, and
    a run resumed from last.ckpt (which draws that seed one epoch later) is not the run that never died.

    The fixed batch (`fixed_batch`) takes the first validation sample of each class, then the second, ... so the
    pictures show every class (deterministic, and read under the same isolation). It is taken from the whole
    validation split (`whole_split_loader`), so a run shows the same images with any number of processes.

    Subclasses set `num_items` and implement `draw(trainer, pl_module, batch)`; `collective(trainer, pl_module)`
    runs on every rank first (for metrics that synchronise) and its result is passed to `draw` as `shared`.
    A KeyError raised in either (a key the run's model output or batch lacks: a family's callback in a twin) is
    re-raised as a RuntimeError naming the callback, the run, its System and model, and the remedy
    (`missing_key_error`).
    """

    num_items: int = 8
    report_only: bool = True  # draws and tabulates only: `ablate` leaves it out of a point's settings hash

    def __init__(self) -> None:
        self.batch: Any = None

    @staticmethod
    def displayable(trainer: pl.Trainer, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) as drawn: the datamodule's normalisation undone (`denormalize`, where it has one: a
        `mean: pretrained` run feeds ImageNet-normalised inputs), in [0, 1], float, on the CPU."""
        datamodule = getattr(trainer, "datamodule", None)
        shown = images.float()
        if hasattr(datamodule, "denormalize"):
            shown = datamodule.denormalize(shown)
        return shown.clamp(0, 1).cpu()

    def fixed_batch(self, trainer: pl.Trainer) -> Any:
        """`num_items` validation samples covering every class, taken once and kept (see `covering_batch`), from
        the whole split: under DDP the datamodule's validation loader holds this rank's shard only.

        Returned in the run's precision, as Lightning hands a batch to a step
        (`trainer.precision_plugin.convert_input`: float tensors in bf16 under `--trainer.precision=bf16-true`,
        float64 under `64-true`; unchanged, the same object, in float32 and under `*-mixed`): a model whose
        parameters are bf16 refuses float32 images. The kept batch stays as loaded, so a later run in another
        precision (`validate` of the same callback object) converts it from the original values."""
        return precision_input(trainer, self.kept_batch(trainer))

    def kept_batch(self, trainer: pl.Trainer) -> Any:
        """The fixed batch as the validation loader gives it, read once (the first call) and kept. Read before
        `draw` enters the run's precision context: under *-true that context sets the default dtype, under *-mixed
        it is autocast, and the data a datamodule makes while loading must not depend on either."""
        if self.batch is None:
            target_key = getattr(trainer.lightning_module, "target_key", "label")
            loader = whole_split_loader(trainer.datamodule.val_dataloader())
            self.batch = covering_batch(loader, target_key, self.num_items,
                                        getattr(trainer.datamodule, "num_classes", None))
        return self.batch

    def collective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return None

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: Any) -> None:
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with isolate_rng():
            try:
                shared = self.collective(trainer, pl_module)
                if not trainer.is_global_zero:
                    return
                was_training = pl_module.training
                if getattr(trainer, "datamodule", None) is not None:  # (without one there is no fixed batch to read)
                    self.kept_batch(trainer)  # read outside the precision context below
                pl_module.eval()
                try:
                    with torch.no_grad(), precision_context(trainer):
                        self.draw(trainer, pl_module, shared)
                finally:
                    pl_module.train(was_training)
            except KeyError as error:
                raise self.missing_key_error(trainer, pl_module, error) from error

    def missing_key_error(self, trainer: pl.Trainer, pl_module: pl.LightningModule, error: KeyError) -> RuntimeError:
        """What a KeyError raised while drawing means, said with the callback, the run, its System and model: most
        often a family's callback, from the config's `trainer.callbacks`, ran in a twin that `compare` trains with
        the same config (a plain classifier's output has none of the family's keys); a bare `KeyError: 'attention'`
        named neither the callback nor the run, after the runs before it had trained."""
        key = error.args[0] if error.args else "?"
        run = getattr(getattr(trainer, "logger", None), "name", None)  # the logger's own name: no broadcast
        hparams = getattr(pl_module, "hparams", None)
        model_name = hparams.get("model_name") if isinstance(hparams, dict) else None
        model = getattr(pl_module, "model", None)
        built = f"model {model_name} ({type(model).__name__})" if model_name else f"model {type(model).__name__}"
        return RuntimeError(
            f"{type(self).__name__} (a picture callback, from trainer.callbacks) read key {key!r}, which "
            f"{type(pl_module).__name__} with {built}{f' in run {run!r}' if run else ''} does not give (its output "
            f"or its batch lacks it). A config's callbacks also run in every twin compare trains from it, whose "
            f"model gives other keys: make {type(self).__name__} skip outputs without its keys (`if {key!r} not in "
            f"out: return`, as the families' own picture callbacks choose what to draw by the keys there), "
            f"or give the twin '--trainer.callbacks=null' in its System's TWINS args.")

    def publish(self, trainer: pl.Trainer, name: str, figure: Any, markdown: str, figure_tag: str) -> None:
        """The epoch's picture and its table, in the run folder (``<name>/epoch<e>.png`` and ``.md``; outside fit
        ``<name>/validate.png``, ...: `record_name`) and in TensorBoard (figure ``<name>/<figure_tag>``, text
        ``<name>/table``): what every picture callback writes."""
        folder, record = run_folder(trainer, name), record_name(trainer)
        if folder is not None:
            save_figure(figure, folder / f"{record}.png")
            (folder / f"{record}.md").write_text(markdown)
        log_figure(trainer.loggers, f"{name}/{figure_tag}", figure, logged_step(trainer))
        log_text(trainer.loggers, f"{name}/table", markdown, logged_step(trainer))


def logged_step(trainer: pl.Trainer, at_fit_end: bool = False) -> int:
    """The step of the scalars Lightning logs now (its count of batches that stepped, which it raises after a
    batch's validation), for pictures, texts and hp_metric: at `trainer.global_step` (optimizer steps, already
    raised) an epoch's pictures sat one step right of its val/* points in TensorBoard. `at_fit_end`: the step of
    the fit's last validation, for what is drawn once the fit has ended (Lightning counted its last batch since)."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)  # (a stand-in trainer has none)
    step = int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))
    return max(step - 1, 0) if at_fit_end else step


def record_name(trainer: pl.Trainer) -> str:
    """The name of what a picture or report records, for its files in the run folder: ``epoch<e>`` while fitting
    (the fit's per-epoch record), else the stage's (``validate``, ``test``, ``predict``). `validate` / `test` of a
    checkpoint run outside fit at epoch 0: named by the epoch, their pictures (the final weights') overwrote the
    fit's first epoch's, and `compare`'s validation after fit wrote one for an epoch that never ran."""
    return f"epoch{trainer.current_epoch}" if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value


EVALUATION_LOGS = ("validate", "test")  # the TensorBoard sub-folders of a run's evaluations (`log_evaluation_apart`)


def log_evaluation_apart(trainer: pl.Trainer, stage: str) -> None:
    """`validate` / `test` of a run's checkpoint log to TensorBoard in a folder of their own, ``<run>/<stage>``
    (TensorBoardLogger's `sub_dir`): outside fit Lightning's step counters start at 0, so their val/* scalars and
    pictures were points at step 0 of the fit's curves, beside its first epoch's. TensorBoard shows them as run
    ``<run>/<stage>`` next to the fit's. The run folder (pictures, predictions: `run_folder`) stays the run's.
    Only a TensorBoard logger without a `sub_dir` of its own, before it has written anything, is moved."""
    if stage not in EVALUATION_LOGS:
        raise ValueError(f"stage must be one of {EVALUATION_LOGS}; got {stage!r}.")
    logger = trainer.logger
    if isinstance(logger, TensorBoardLogger) and logger.sub_dir is None and logger._experiment is None:
        logger._sub_dir = stage  # TensorBoardLogger's `sub_dir` argument, which the config does not give


HP_METRIC_DECLARED = "_zoo_declares_hp_metric"  # TensorBoardLogger attribute: `zoo.engine.system.declare_hp_metric`


def declares_hp_metric(logger: Any) -> bool:
    """Whether `logger` is a TensorBoardLogger the System took over to declare hp_metric in its HPARAMS entry
    (`zoo.engine.system.declare_hp_metric`, which marks it)."""
    return bool(getattr(logger, HP_METRIC_DECLARED, False))


def evaluation_logger(logger: TensorBoardLogger, stage: str) -> TensorBoardLogger:
    """A fresh TensorBoardLogger for run ``<run>/<stage>`` of `logger`'s run: its save_dir, name, version,
    prefix, `default_hp_metric` (off for ablate's points: ablate writes their HPARAMS entries; on for one the
    System took over to declare hp_metric, `declares_hp_metric`) and SummaryWriter arguments, with
    `sub_dir` `stage` (below the logger's own `sub_dir` where it has one: ``<run>/<sub_dir>/<stage>``). The run
    folder (`logger_folder`: pictures, checkpoints) is the same."""
    sub_dir = stage if logger.sub_dir is None else os.path.join(logger.sub_dir, stage)
    return TensorBoardLogger(save_dir=logger.save_dir, name=logger.name, version=logger.version,
                             default_hp_metric=logger._default_hp_metric or declares_hp_metric(logger),
                             prefix=logger._prefix, sub_dir=sub_dir, **logger._kwargs)


@contextmanager
def scoring_logged_apart(trainer: pl.Trainer, stage: str = "validate") -> Iterator[None]:
    """Within the block `trainer` logs to TensorBoard in ``<run>/<stage>`` (`evaluation_logger` of each of its
    TensorBoardLoggers without a `sub_dir`), as `train.py validate` of the run does (`log_evaluation_apart`); its
    fit's loggers are back afterwards (a logger with a `sub_dir` of its own: ``<run>/<sub_dir>/<stage>``). For the
    validation compare and ablate score a run's last weights with after
    its fit (and a compare `checkpoint:` run's, which trains nothing): on the fit's logger it wrote a second val/*
    point one step after the fit's last validation, an `epoch` point of an epoch that never ran, a picture more
    and a second HPARAMS session into the fit's curves. `log_evaluation_apart` cannot be used after a fit: it
    moves only a logger that has not written yet. Other loggers (CSV, fast_dev_run's dummy) are kept as they are.

    The evaluation loggers are finalized at the block's end (Lightning finalized them at the validation's end
    already; what the block logs after it, compare's explanations figure, reopens their writer)."""
    if stage not in EVALUATION_LOGS:
        raise ValueError(f"stage must be one of {EVALUATION_LOGS}; got {stage!r}.")
    from pytorch_lightning.cli import SaveConfigCallback

    fit_loggers, fit_callbacks = list(trainer.loggers), list(trainer.callbacks)
    apart = [evaluation_logger(logger, stage) if isinstance(logger, TensorBoardLogger) else logger
             for logger in fit_loggers]
    trainer.loggers = apart
    # the run's config.yaml is the fit's: a spawned validation's SaveConfigCallback wrote one into <run>/<stage>
    trainer.callbacks = [callback for callback in fit_callbacks if not isinstance(callback, SaveConfigCallback)]
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for logger in apart:
            if not any(logger is kept for kept in fit_loggers):
                logger.finalize(status)  # rank zero only (Lightning's `rank_zero_only`)
        trainer.loggers, trainer.callbacks = fit_loggers, fit_callbacks


def logger_folder(logger: Any) -> Path | None:
    """The run folder of a TensorBoardLogger or CSVLogger: <save_dir>/<name>/<version> (version_<n> for a numbered
    one), where Lightning also puts the run's checkpoints; without a `sub_dir` (validate / test log their events in
    one, `log_evaluation_apart`). None for another kind of logger. Read from the logger, not `trainer.log_dir`,
    which broadcasts (a collective)."""
    if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return None
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(os.path.expanduser(os.path.expandvars(os.path.join(logger.root_dir, version))))


def run_folder(trainer: pl.Trainer, name: str) -> Path | None:
    """Where a run writes its pictures and reports: <run>/<name>, made (`logger_folder`). None when the trainer has
    no logger (`fast_dev_run`, `logger: false`): there is no run folder then, and `default_root_dir` (checkpoints/)
    is shared by every run and family, so pictures are not written to disk (callers skip their files).

    Read on rank zero only, so not through `trainer.log_dir`: that property broadcasts (a collective), and rank
    zero calling it alone would wait forever for the other processes under DDP."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None or isinstance(logger, DummyLogger):
        return None
    base = logger_folder(logger) or getattr(logger, "save_dir", None)
    folder = Path(base or trainer.default_root_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def whole_split_loader(loader: DataLoader) -> DataLoader:
    """`loader`'s whole dataset in order: a loader of the same batch size, collate function and workers over every
    sample of `loader.dataset` with a `SequentialSampler`, where `loader` samples otherwise (under DDP the
    datamodules' evaluation loaders give each rank its shard, `UnrepeatedDistributedSampler`); `loader` itself
    where it already reads the dataset in order (one process). For what rank zero computes alone from a split (the
    pictures' fixed batch, CBM's intervention curve): with its shard only, the result depended on the process
    count. Builds a loader and nothing more (no collective), so rank zero may call it while the others wait."""
    plain_batches = loader.batch_sampler is None or type(loader.batch_sampler) is BatchSampler
    if (isinstance(loader.sampler, SequentialSampler) and plain_batches) or isinstance(loader.dataset,
                                                                                       IterableDataset):
        return loader  # in order already (or an iterable dataset, which has no sampler to replace)
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=SequentialSampler(loader.dataset),
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context)


def covering_batch(loader: DataLoader, target_key: str, count: int, num_classes: int | None = None) -> Any:
    """`count` samples of a sequential validation loader that cover every class, deterministically: the first
    sample of each class in loader order, then the second of each, ... (a sorted ImageFolder shows every class,
    not `count` images of its first). Batches are read only until every class (`num_classes`, else every class
    seen) has its share. Batches without one class id per sample (detection scenes) or a shuffled loader: the first
    `count` samples in loader order, read batch by batch until there are `count` (`first_samples`): a picture of
    8 scenes from a loader of batch size 4 showed the first batch's 4 only. Fewer where the split holds fewer."""
    by_class: dict[int, list[int]] = {}
    position, read = 0, []  # read: the batches kept for `first_samples`
    plain: bool | None = None  # take the first samples rather than cover the classes (the first batch decides)
    for batch in loader:
        labels = batch.get(target_key) if isinstance(batch, dict) else None
        if plain is None:
            plain = not isinstance(loader.sampler, SequentialSampler) or not torch.is_tensor(labels) or labels.ndim != 1
        if plain:
            read.append(batch)
            if sum(map(samples_in, read)) >= count:
                break
            continue
        share = math.ceil(count / num_classes) if num_classes else count
        for offset, label in enumerate(labels.tolist()):
            if len(by_class.setdefault(label, [])) < share:
                by_class[label].append(position + offset)
        position += len(labels)
        if num_classes and len(by_class) >= num_classes and all(len(v) >= share for v in by_class.values()):
            break
    if plain is None:
        raise ValueError("the validation loader is empty: no fixed batch to draw.")
    if plain:  # tensors padded to each batch's own length (tokens) do not join: the first batch's samples
        return first_samples(read if _joinable(read) else read[:1], count)
    chosen = [indices[rank] for rank in range(max(map(len, by_class.values())))
              for _, indices in sorted(by_class.items()) if rank < len(indices)][:count]  # round robin over classes
    return loader.collate_fn([loader.dataset[i] for i in chosen])


def samples_in(batch: Any) -> int:
    """How many samples a collated batch holds: the length of its first tensor or list (a dict's first value; a
    detection batch's list of images), 1 for anything else."""
    if isinstance(batch, dict):
        return samples_in(next(iter(batch.values()))) if batch else 0
    if torch.is_tensor(batch):
        return len(batch) if batch.ndim else 1
    return len(batch) if isinstance(batch, (list, tuple)) else 1


def _joinable(batches: list[Any]) -> bool:
    """Whether every tensor of collated `batches` has the first batch's shape after dimension 0 (tokens padded to
    each batch's longest do not)."""
    first = batches[0]
    if isinstance(first, dict):
        return all(_joinable([batch[key] for batch in batches]) for key in first)
    if torch.is_tensor(first) and first.ndim:
        return all(torch.is_tensor(b) and b.shape[1:] == first.shape[1:] for b in batches)
    return True


def first_samples(batches: list[Any], count: int) -> Any:
    """The first `count` samples of collated `batches`, as one batch of their collate: per key, tensors
    concatenated along their first dimension (N, ...), lists (a detection batch's images and targets,
    `detection_collate`) joined, anything else (a 0-d tensor, a string) the first batch's. Joins what the loader
    already gave, so nothing is read twice."""
    first = batches[0]
    if isinstance(first, dict):
        return {key: first_samples([batch[key] for batch in batches], count) for key in first}
    if torch.is_tensor(first) and first.ndim:
        return torch.cat([batch[:count] for batch in batches])[:count]
    if isinstance(first, list):
        return [sample for batch in batches for sample in batch][:count]
    return first
