"""ZooSystem: the one LightningModule every family's System subclasses.

The base owns what every family shares: the model from the registry, the loss dict summed (narrowed by the current
stage), the non-finite-loss policy, per-term logging, metrics logged as objects, schedules, auxiliary models,
optimiser and scheduler from YAML, and checkpoint compatibility checks. A family overrides hooks only:

    forward_batch(batch, stage) -> out      the model's output dict for a batch
    compute_loss(out, batch, stage) -> dict  named loss terms (default: self.loss(out, batch))
    update_state(out, batch)                 online statistics, training steps only (ICNN's Z_T, categories)
    update_metrics(out, batch, stage)        validation / test metrics (default: accuracy of out["logits"])
    auxiliaries() -> list[Auxiliary]         frozen helper models trained before the first step
    batch_size(batch) -> int                 for logging

and declares its opaque twins in `TWINS`: name -> CLI overrides applied to the family's config
(`train.py compare --config <family config>` trains the config and every twin with the same data, seed and budget).
"""

from __future__ import annotations

import copy
import functools
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.plugins.precision import DoublePrecision
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torchmetrics import Metric

from datamodules._base import DataSettingError
from zoo.checks import batch_field, check_class_ids, check_on_host
from zoo.distributed import all_reduce_, end_spawned_process_group, is_distributed
from zoo.engine.auxiliary import Auxiliary, auxiliaries_pending, prepare_auxiliaries
from zoo.engine.callbacks import HP_METRIC_DECLARED, declares_hp_metric, logged_step
from zoo.engine.plateau import PLATEAU_KEY, due_plateau_steps, take_plateau_steps
from zoo.engine.stages import Schedule, epoch_schedules, scale_group_rates
from zoo.registry import check_same_model, create_model_for_data
from zoo.weights import (MODEL_KEYS, SETTINGS_KEY, CheckpointError, check_resume_keys, model_spec, resolve_class,
                         restore_datamodule_state)

NONFINITE_POLICIES = ("raise", "skip")
EVAL_STAGES = ("val", "test")
SCHEDULE_EPOCH_KEY = "zoo_schedule_epoch"  # checkpoint entry: the epoch whose schedules the weights were trained under


def format_terms(names: tuple[str, ...], values: torch.Tensor) -> str:
    """"loss_task=0.6931, loss_bad=nan": a step's loss terms for an error message (reads the device)."""
    return ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values.tolist()))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # inductor's modes


def compile_model(model: nn.Module, how: str | Callable[..., Any] = "inductor") -> None:
    """`torch.compile` `model` in place (`nn.Module.compile`: parameters and state-dict keys unchanged). `how`: a
    backend (a name, "inductor", "aot_eager", "cudagraphs", ..., or a callable) or one of inductor's
    `COMPILE_MODES` ("reduce-overhead" replays the step as CUDA graphs on a GPU: for small models, whose steps are
    bound by kernel launches). A torchvision detector (`GeneralizedRCNN`) reads data-dependent shapes (proposal
    counts, matched boxes) throughout its RPN and RoI sampling: only its backbone, where its convolutions are, is
    compiled, and the rest runs eagerly (warned)."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    options = {"mode": how} if how in COMPILE_MODES else {"backend": how}
    if isinstance(model, GeneralizedRCNN):
        rank_zero_warn(f"compile=True: {type(model).__name__} is a torchvision detector (data-dependent shapes in its "
                       "RPN and RoI sampling); its backbone is compiled, the rest runs eagerly.")
        model.backbone.compile(**options)
        return
    model.compile(**options)


def plain_value(value: Any) -> Any:
    """`value` with NumPy scalars and arrays as Python numbers and lists, paths as strings, through dicts, lists and
    tuples: what a System saves as hyperparameters must load under `torch.load(weights_only=True)`, which every
    checkpoint reader uses and which refuses NumPy's types and paths (the registry accepts NumPy numbers as inputs,
    and a backbone a `pretrained_path` Path, so a run may be given them)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()  # a scalar's Python number (`.item()`), an array's nested lists
    if isinstance(value, os.PathLike):  # a `pretrained_path=Path(...)`: the same file, named by a string
        return os.fspath(value)
    if isinstance(value, dict):
        return type(value)((plain_value(k), plain_value(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):  # a NamedTuple keeps its own type
        return type(value)(plain_value(v) for v in value)
    return value


def check_loadable_hparams(owner: str, hparams: dict[str, Any]) -> None:
    """Refuse, naming the hyperparameter, a value a checkpoint could be written with and not read back: every reader
    uses `torch.load(weights_only=True)`, which loads plain values (numbers, strings, lists, dicts, tensors) only.
    Checked when the System is built, not after a run has trained (its checkpoints would be unreadable)."""
    for key, value in hparams.items():
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means the same: the checkpoint could not be read
            raise ValueError(f"{owner}: hyperparameter {key}={value!r} cannot be saved in a checkpoint that loads "
                             f"with weights_only=True ({type(err).__name__}: {err}); give plain values (numbers, "
                             f"strings, lists, dicts) or names the model resolves.") from err


TRAINING_COMPONENTS = ("loss", "optimizer", "scheduler")  # System arguments that are not checkpoint hparams
HP_METRIC = "hp_metric"  # the metric of a run's HPARAMS entry (`declare_hp_metric`; `ZooSystem.hp_metric_name`)
HP_METRIC_KEY = "zoo_hp_metric"  # checkpoint entry: the run's last hp_metric (`ZooSystem.write_restored_hp_metric`)
HP_METRIC_STEP_KEY = "zoo_hp_metric_step"  # checkpoint entry: the step that hp_metric was logged at


def given_init_args(cls: type) -> dict[str, Any] | None:
    """The init arguments LightningCLI is building a System of class `cls` from, as its config gives them (the
    loss, optimiser and scheduler as {"class_path", "init_args"} with every default filled in); None outside the
    CLI, or while the CLI builds another class (a System built inside another's constructor)."""
    try:
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without it: the settings are read off the objects (`component_settings`)
        return None
    given = _given_hyperparameters.get()
    if not isinstance(given, dict) or not isinstance(given.get("_class_path"), str):
        return None
    return given if resolve_class(given["_class_path"]) is cls else None


def _class_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _flat_setting(key: str, value: Any, out: dict[str, Any]) -> None:
    """`value` into `out` under `key`: a class given as {"class_path", "init_args"} as its path under `key` and each
    init argument under "<key>/<argument>"; a mapping entry by entry; anything else as a plain value."""
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        out[key] = value["class_path"]
        for name, item in {**(value.get("init_args") or {}), **(value.get("dict_kwargs") or {})}.items():
            _flat_setting(f"{key}/{name}", item, out)
    elif isinstance(value, dict) and value:
        for name, item in value.items():
            _flat_setting(f"{key}/{name}", item, out)
    else:
        out[key] = plain_value(value)


def _object_init_args(component: Any) -> tuple[str | None, dict[str, Any]]:
    """(class path, init arguments) read off a loss, optimiser or scheduler given as an object: a class or function
    (its path, no arguments), a `functools.partial` (LightningCLI's optimiser callables: the class it builds and its
    keyword arguments) or an instance (its class, and the arguments of its `__init__` it keeps as attributes of
    the same name with plain values: numbers, strings, booleans, one-element tensors)."""
    import functools
    import inspect

    if component is None:
        return None, {}
    if isinstance(component, functools.partial):
        built = next((arg for arg in (component.func, *component.args) if isinstance(arg, type)), component.func)
        return _class_path(built), dict(component.keywords)
    if isinstance(component, type) or inspect.isroutine(component):
        return _class_path(component), {}
    args: dict[str, Any] = {}
    try:
        parameters = inspect.signature(type(component).__init__).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    for parameter in parameters:
        if parameter.name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(component, parameter.name, None)
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)):
            args[parameter.name] = value
    return _class_path(type(component)), args


def component_settings(name: str, component: Any, given: Any = None) -> dict[str, Any]:
    """What TensorBoard's HPARAMS (and the logger's hparams.yaml) show of a System's loss, optimiser or scheduler,
    which are not checkpoint hyperparameters (a checkpoint's loss is rebuilt by its config, not from them): flat
    plain values, {name: class path, "<name>/<argument>": value, ...} ({name: None} without one). Taken from the
    config the CLI built the System from (`given`: {"class_path", "init_args"}, every default filled in) where there
    is one, else read off the object (`_object_init_args`). Why: a fit with another loss weight or learning rate
    logged the same hparams as the default run, so HPARAMS could not tell them apart."""
    out: dict[str, Any] = {}
    if isinstance(given, dict) and isinstance(given.get("class_path"), str):
        _flat_setting(name, given, out)
        return out
    path, args = _object_init_args(component)
    _flat_setting(name, {"class_path": path, "init_args": args} if path is not None else None, out)
    return out


LOW_PRECISION_FLOATS = (torch.bfloat16, torch.float16)  # metric states in these are widened to float32


def _widened(value: Any) -> Any:
    """`value` with its bf16 / float16 tensors as float32, through lists ("cat" states), tuples and dicts (a cached
    compute() result); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION_FLOATS else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_widened(item) for item in value)
    if isinstance(value, dict):
        return type(value)((key, _widened(item)) for key, item in value.items())
    return value


def keep_metric_states_float32(module: nn.Module) -> None:
    """Give every torchmetrics `Metric` in `module` floating states of at least float32: its bf16 / float16 states
    (and their reset defaults, its cached result) become float32, its integer and float64 states stay as they are.

    Why: Lightning's "bf16-true" / "16-true" convert a LightningModule with `module.to(dtype=...)`, and torchmetrics
    guards its states only against `.half()` / `.float()` / `.type()`, not `.to(dtype)`: every float state (sums,
    means, counts kept as floats) became bf16, which holds whole numbers exactly only up to 256, so a count of 1,000
    images read 256 and the scores came out wrong without a word. `Metric.set_dtype` is not used: it converts the
    integer states (confusion counts) to float as well."""
    for metric in module.modules():
        if not isinstance(metric, Metric):
            continue
        for key, default in metric._defaults.items():
            metric._defaults[key] = _widened(default)
            setattr(metric, key, _widened(getattr(metric, key)))
        metric._computed = _widened(metric._computed)
        if metric._dtype in LOW_PRECISION_FLOATS:  # what update() casts its inputs to (MeanMetric, SumMetric, ...)
            metric._dtype = torch.float32


def backbone_of(model: nn.Module) -> nn.Module | None:
    """A model's backbone, what `freeze_backbone` / `backbone_lr_scale` act on: its `backbone` submodule (the
    zoo's classifiers, ICNN, AOG-RCNN's detector), or None (L2X's selectors, ReNN, the textual generators)."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else None


def convert_for_precision(system: nn.Module, trainer: pl.Trainer) -> None:
    """Convert `system` as `trainer`'s precision plugin will (64-true: to float64) before weights are loaded into
    it: Lightning converts a module in its strategy's setup, after a checkpoint was restored, so float64 weights
    copied into float32 parameters came back rounded. Other precisions need nothing (bf16 / fp16 values survive
    float32 exactly); converting twice changes nothing."""
    plugin = trainer.precision_plugin
    if isinstance(plugin, DoublePrecision):
        plugin.convert_module(system)


def declare_hp_metric(logger: Any) -> None:
    """Make a TensorBoardLogger built with `default_hp_metric: true` declare hp_metric in the HPARAMS entry it writes
    when a trainer starts (`log_hyperparams`, called by Lightning before every fit / validate / test / predict)
    without logging Lightning's placeholder hp_metric -1 at step 0: the run's own values come after validations
    (`ZooSystem._write_hp_metric`). Each resumed fit wrote the placeholder again at step 0, and TensorBoard, which
    takes a step going back as a restart, dropped every hp_metric point before it (the curve read -1, then the last
    session's points only). A logger with `default_hp_metric: false` (ablate's point runs, helper runs) is left as
    it is: it declares no hp_metric. Idempotent."""
    from pytorch_lightning.loggers import TensorBoardLogger

    if (not isinstance(logger, TensorBoardLogger) or getattr(logger, HP_METRIC_DECLARED, False)
            or getattr(logger, "_default_hp_metric", False) is not True):
        return
    logger._default_hp_metric = False  # Lightning's log_hyperparams then writes hparams.yaml's record, no summaries
    setattr(logger, HP_METRIC_DECLARED, True)
    logger.log_hyperparams = functools.partial(_log_hyperparams_declaring_hp_metric, logger)


def _log_hyperparams_declaring_hp_metric(logger: Any, params: Any, metrics: dict[str, Any] | None = None,
                                         step: int | None = None) -> None:
    """`logger.log_hyperparams` for a logger `declare_hp_metric` took over: Lightning's own (hparams.yaml's record;
    with `metrics` its summaries and scalars too), then, for Lightning's call without metrics, the HPARAMS summaries
    with hp_metric as the metric and no scalar."""
    type(logger).log_hyperparams(logger, params, metrics, step)
    if metrics is None:
        _write_hparams_summaries(logger, params, step)


@rank_zero_only
def _write_hparams_summaries(logger: Any, params: Any, step: int | None) -> None:
    """The HPARAMS summaries (experiment, session start and end) Lightning's `TensorBoardLogger.log_hyperparams`
    writes for `params`, declaring hp_metric as the metric, without logging a value for it."""
    from lightning_fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE
    from lightning_fabric.utilities.logger import _convert_params, _flatten_dict

    if _TENSORBOARD_AVAILABLE:  # the summary writer Lightning's logger writes with
        from torch.utils.tensorboard.summary import hparams
    else:
        from tensorboardX.summary import hparams
    flat = logger._sanitize_params(_flatten_dict(_convert_params(params)))  # as Lightning formats them
    writer = logger.experiment._get_file_writer()
    for summary in hparams(flat, {HP_METRIC: None}):  # (experiment, session start, session end); values unread
        writer.add_summary(summary, step)


class ZooSystem(pl.LightningModule):
    """A registered model trained with a named-terms loss (see the module docstring for the hooks).

    Args:
        model_name: registry name, e.g. "icnn_tinycnn" (each family's System defaults to a model of its own).
        num_classes, in_chans, image_size, data_inputs: what the data fixes about the model, linked from the
            datamodule by the CLI (`data_inputs`: num_features, vocab_size, ...); in Python, give the datamodule's
            (`num_classes=dm.num_classes`, ...): a fit, validate, test or predict with a datamodule of other values
            is refused at `setup` (`check_data_settings`).
        model_kwargs: extra keyword arguments for `zoo.create_model` (they win over the linked ones).
        loss: module returning named loss terms {"loss_<term>": tensor}; default `default_loss()`.
        optimizer / scheduler: callables injected by LightningCLI (``optimizer: {class_path: torch.optim.SGD}``).
        input_key / target_key: batch fields fed to the model and scored against its output.
        stages: list of `zoo.engine.Stage` fields (name, epochs, train, losses, lr_scale, settings).
        nonfinite_loss: a NaN/inf training loss "raise"s `FloatingPointError` naming the step, the batch and every
            term (the last good checkpoint stays), or "skip"s the batch with a warning: no parameter, optimiser
            state or buffer (BatchNorm statistics) changes, and a step whose gradients are NaN/inf is skipped
            the same way. "raise" reads no device value inside a step: each step's terms are kept (detached) and
            checked together every `log_every_n_steps` steps, at the epoch's end and before any checkpoint is
            written; "skip" must decide on the host before the optimiser step, so it costs two host-device
            synchronisations per step (the loss, the gradients) and a copy of the buffers. Under DDP every rank
            decides alike (one all-reduce of a per-rank flag each step): a batch whose loss is NaN/inf on any rank
            is skipped on every rank (each returns a zero loss that reaches every trainable parameter, so DDP's
            gradient all-reduce still runs, and the gradients are dropped before the optimiser step), and the
            rank that saw it warns, naming itself (rank 0 too, naming the rank(s)).
        compile: `torch.compile` the model (`nn.Module.compile`: same parameters and checkpoint keys); True uses
            torch's default backend (inductor), a string names another ("aot_eager", "cudagraphs", ...) or one of
            inductor's modes ("reduce-overhead": CUDA graphs on a GPU, "max-autotune", ...). Of a torchvision
            detector only the backbone is compiled (its RPN and RoI sampling run eagerly), with a warning.
        class_names: the data's class names (linked from the datamodule's `class_names` by the CLI, taken from the
            trainer's datamodule at `setup` where None), saved in the checkpoint so predictions and reports name
            classes; None without a datamodule: "0", "1", ...
        freeze_backbone: fine-tuning: the model's backbone (`backbone_of`) gets no updates and stays in eval mode
            (BatchNorm statistics too) until `unfreeze_epoch` (None: for the whole run). Under DDP, as with stages,
            the strategy must find unused parameters.
        unfreeze_epoch: the epoch from which a frozen backbone trains.
        backbone_lr_scale: the backbone's learning rate is the optimiser's times this (its own parameter group,
            saved with the optimiser, so a resumed run keeps it; stage `lr_scale`s multiply both groups).
    """

    TWINS: ClassVar[dict[str, list[str]]] = {}
    # hyperparameters a checkpoint must share with the run that loads it: what its weights were trained to mean
    # (CBM: the training mode). A mismatch is refused by name, on `--ckpt_path last` and in `fit --ckpt_path FILE`.
    RESUME_KEYS: ClassVar[tuple[str, ...]] = ()
    # System arguments validate / test / predict of a checkpoint take as given, not as the checkpoint's (they change
    # no weight: the textual max_len; `zoo.cli.lightning.evaluation_free`)
    EVALUATION_FREE: ClassVar[tuple[str, ...]] = ()
    # whether `train.py predict` draws the first images beside their explanation (`zoo.cli.predict.PredictionWriter`)
    PREDICT_PICTURES: ClassVar[bool] = True

    def __init__(
        self,
        model_name: str = "baseline_tinycnn",
        num_classes: int = 10,
        in_chans: int | None = 3,
        image_size: int | None = 64,
        data_inputs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        input_key: str = "image",
        target_key: str = "label",
        stages: list[dict[str, Any]] | None = None,
        nonfinite_loss: str = "raise",
        compile: bool | str = False,
        class_names: list[str] | None = None,
        freeze_backbone: bool = False,
        unfreeze_epoch: int | None = None,
        backbone_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}; got {nonfinite_loss!r}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names holds {len(class_names)} names for num_classes={num_classes}.")
        given = given_init_args(type(self))  # the CLI's config of this System: its loss, optimiser, scheduler
        self.save_hyperparameters(ignore=list(TRAINING_COMPONENTS))
        # saved as plain values (a family puts its own objects as names into its kwargs before this: ReNN's rules)
        for key, value in self.hparams.items():
            self.hparams[key] = plain_value(value)
        check_loadable_hparams(type(self).__name__, self.hparams)
        head = (self.hparams.get("model_kwargs") or {}).get("num_classes")
        if head is not None and head != num_classes:  # the metrics and the loss count num_classes: a torchmetrics
            # shape error at the first batch (1000-way head, 6 classes) or a label past the head (3 for 10)
            raise ValueError(f"{type(self).__name__}: model_kwargs num_classes={head} but num_classes={num_classes} "
                             f"(the data's classes; train.py links it from the datamodule): its metrics and loss "
                             f"count {num_classes} classes. Drop num_classes from model_kwargs (the data sets it), "
                             f"or train on data with {head} classes.")
        self.model = self.build_model()
        if compile:
            compile_model(self.model, "inductor" if compile is True else compile)
        self._check_fine_tuning(freeze_backbone, unfreeze_epoch, backbone_lr_scale)
        self.input_key, self.target_key = input_key, target_key  # before `default_loss`, which reads them
        self.loss = loss if loss is not None else self.default_loss()
        loss_key = getattr(self.loss, "target_key", target_key)
        if loss_key != target_key:
            raise ValueError(f"The loss reads the labels from batch[{loss_key!r}] but the System from "
                             f"batch[{target_key!r}] (target_key={target_key!r}); give the loss the same field "
                             f"(loss.init_args.target_key: {target_key}).")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self._hparams_initial = self.logged_hparams(given)  # what loggers record (TensorBoard's HPARAMS)
        self._hp_metric_restored: float | None = None  # a resumed run's last hp_metric (`HP_METRIC_KEY`)
        self._hp_metric_restored_step: int | None = None  # ... and its step (`HP_METRIC_STEP_KEY`)
        self._hp_metric_pending = False  # a resumed fit has not yet written its restored hp_metric where needed
        self._validated_step: int | None = None  # the step of the last validation's val/* points in this session
        self._plateau_taken: dict[int, int] = {}  # plateau scheduler index -> the epoch of its last step taken here
        self._plateau_owed: dict[int, list[float]] = {}  # a resumed checkpoint's owed plateau steps (`PLATEAU_KEY`)
        self.schedule = Schedule(stages, self.model)
        self.metrics = nn.ModuleDict()  # "<stage>_<name>": a ModuleDict key "train" would shadow nn.Module.train
        self._dict_metrics: dict[str, str] = {}  # metrics whose compute() returns a dict: key -> log prefix
        self._unchecked: list[tuple[torch.Tensor, torch.Tensor, tuple[str, ...], str]] = []  # steps not yet read
        self._buffers_before: list[tuple[nn.Module, str, torch.Tensor]] = []  # nonfinite_loss="skip": copies
        self._skipped_step = False  # nonfinite_loss="skip" under DDP: this step's batch was skipped (drop gradients)
        self._window_kept = False  # nonfinite_loss="skip" under DDP: a batch of this accumulation window was kept
        self._deferred_checks: list[tuple[torch.Tensor, str]] = []  # `defer_check`: (device bool, message)
        self._schedule_epoch: int | None = None  # the epoch whose schedules are in force (None: never entered)
        # the run's model settings as its CLI was given them (`zoo.weights.model_settings`), kept in checkpoints so
        # that a resumed fit with another learning rate or loss weight is refused; None outside the CLI
        self.model_settings: dict[str, Any] | None = None

    def logged_hparams(self, given: dict[str, Any] | None = None) -> Any:
        """What Lightning hands the loggers (`hparams_initial`: TensorBoard's HPARAMS columns, hparams.yaml): the
        checkpoint's hyperparameters as plain values, less LightningCLI's internal `_instantiator`, plus the loss,
        optimiser and scheduler settings (`component_settings`; `given`: the CLI's config of this System, from
        `given_init_args`). The checkpoint's `hyper_parameters` stay as they are (`self.hparams`): loading and resume
        checks read them, and the loss and optimiser are held by `model_settings` there."""
        logged = copy.deepcopy(self._hparams)
        logged.pop("_instantiator", None)
        for name in TRAINING_COMPONENTS:
            component = {"loss": self.loss, "optimizer": self.optimizer_factory,
                         "scheduler": self.scheduler_factory}[name]
            logged.update(component_settings(name, component, (given or {}).get(name)))
        return logged

    # ------------------------------------------------------------------------------------------- family hooks
    def build_model(self) -> nn.Module:
        hp = self.hparams
        return create_model_for_data(hp.model_name, hp.num_classes, hp.in_chans, hp.image_size, hp.data_inputs,
                                     hp.model_kwargs)

    # ---------------------------------------------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        """Before every fit / validate / test / predict: the System's data settings against the trainer's datamodule
        (`check_data_settings`), where there is one, and the TensorBoard loggers' HPARAMS entry declaring hp_metric
        without Lightning's placeholder (`declare_hp_metric`: Lightning logs the hyperparameters after this hook).
        Families that override `setup` call this first."""
        for logger in self.loggers if self._trainer is not None else []:
            declare_hp_metric(logger)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:
            self.check_data_settings(datamodule)

    def check_data_settings(self, datamodule: Any) -> None:
        """Refuse, naming each setting and both values, a System built for other data than `datamodule`'s, and take
        the datamodule's `class_names` where the System was given none.

        Why: `train.py` links the datamodule's `num_classes`, `num_channels`, `image_size`, `model_inputs` and
        `class_names` into the System (`zoo.cli.lightning`), so its runs always agree; a System built in Python and
        fitted with a plain `pl.Trainer` took its defaults instead, silently (a 10-way head for 6 classes, image_size
        64 saved for 32-pixel images, classes named "0".."9"). The links' meaning is kept: a datamodule's None (no
        channels or size: series, vectors, token ids) fixes nothing, nor does a System's (a model that reads no size,
        as the textual generators'), and a `model_inputs` entry is checked where the
        System's `data_inputs` gives it too, unless its `model_kwargs` does (the user's value wins over the data's
        under the CLI too); one the System does not give is left to the model's default. Class names are taken, not
        refused: they name the classes in checkpoints, exports and predictions, and change no weight."""
        hp, owner, data = self.hparams, type(self).__name__, type(datamodule).__name__
        wrong: list[tuple[str, Any, Any, str]] = []  # (System setting, its value, the data's value, the data's name)
        for setting, attribute in (("num_classes", "num_classes"), ("in_chans", "num_channels"),
                                   ("image_size", "image_size")):
            value, mine = getattr(datamodule, attribute, None), hp.get(setting)
            if value is not None and (mine is not None or setting == "num_classes") and mine != plain_value(value):
                wrong.append((setting, hp.get(setting), plain_value(value), attribute))
        given, chosen = dict(hp.get("data_inputs") or {}), dict(hp.get("model_kwargs") or {})
        for key, value in plain_value(dict(getattr(datamodule, "model_inputs", None) or {})).items():
            if key in given and key not in chosen and not _same_value(given[key], value):
                wrong.append((f"data_inputs[{key!r}]", given.get(key), value, f"model_inputs[{key!r}]"))
        if wrong:
            settings = "; ".join(f"{setting}={mine!r} but the data's {name} is {theirs!r}"
                                 for setting, mine, theirs, name in wrong)
            fixes = {"num_classes": "num_classes=dm.num_classes", "in_chans": "in_chans=dm.num_channels",
                     "image_size": "image_size=dm.image_size"}
            wanted = list(dict.fromkeys(fixes.get(setting, "data_inputs=dm.model_inputs") for setting, *_ in wrong))
            raise DataSettingError(
                f"{owner} ({hp.get('model_name')}) was built for other data than {data}: {settings}. Build it with "
                f"the datamodule's values, {owner}(..., {', '.join(wanted)}, class_names=dm.class_names), or train "
                f"with train.py, which links them from the datamodule.")
        names = getattr(datamodule, "class_names", None)
        if hp.get("class_names") is None and names is not None and len(names) == hp.get("num_classes"):
            self.hparams["class_names"] = [str(name) for name in names]  # into checkpoints and exports
            self._hparams_initial["class_names"] = list(self.hparams["class_names"])  # what loggers record

    def default_loss(self) -> nn.Module:
        """The loss when the config gives none: cross-entropy on `target_key`. Families override it with their own
        (a config without `loss:` must still train what makes the family interpretable)."""
        from losses.baselines import ClassificationLoss

        return ClassificationLoss(target_key=self.target_key)

    def forward_batch(self, batch: Any, stage: str) -> dict[str, Any]:
        return self.model(batch_field(batch, self.input_key))

    def compute_loss(self, out: dict[str, Any], batch: Any, stage: str) -> dict[str, torch.Tensor]:
        if self.target_key in batch and torch.is_tensor(batch[self.target_key]):
            check_class_ids(batch[self.target_key], self.model_classes, self.hparams.num_classes)
        return self.loss(out, batch)

    def update_state(self, out: dict[str, Any], batch: Any) -> None:
        """Online statistics after a training forward (never in evaluation)."""

    def update_metrics(self, out: dict[str, Any], batch: Any, stage: str) -> None:
        """Default: out["logits"] against the target into the "acc" metric of each stage the System added one for
        (`add_metric("acc", ...)`; the base adds none, since what accuracy means is the family's choice)."""
        if "logits" in out and self.target_key in batch:
            self.log_metric(stage, "acc", out["logits"].detach(), batch[self.target_key], prog_bar=True)

    def auxiliaries(self) -> list[Auxiliary]:
        """Frozen helper models (L2X black box, textual sentence classifier) that must be ready before training."""
        return []

    def explanation_report(self, datamodule: Any, settings: dict[str, Any]) -> tuple[list[dict], dict, Any] | None:
        """What `compare` reports on explanations: by default every post-hoc explainer (and the model's own map)
        scored on the same validation images (`zoo.explain`); None for inputs that are not images."""
        from zoo.explain.scores import explain_validation_images

        return explain_validation_images(self, datamodule, settings)

    def batch_size(self, batch: Any) -> int:
        return len(batch[self.target_key]) if isinstance(batch, dict) and self.target_key in batch else 1

    @property
    def model_classes(self) -> int:
        """The classes the model predicts: its own `num_classes` where it has one (a model_kwargs num_classes other
        than the System's is refused as it is built), else the data's."""
        return int(getattr(self.model, "num_classes", None) or self.hparams.num_classes)

    @property
    def class_names(self) -> list[str]:
        """The class names of the data it was trained on (public: pictures, reports and predictions print them)."""
        return list(self.hparams.get("class_names") or [str(c) for c in range(self.hparams.num_classes)])

    # ------------------------------------------------------------------------------------------------ metrics
    def add_metric(self, name: str, metric: Metric, stages: tuple[str, ...] = EVAL_STAGES,
                   log_prefix: str | None = None) -> None:
        """One copy of `metric` per stage, as `metrics["<stage>_<name>"]`. A metric whose compute() returns a dict
        is logged entry by entry at the epoch's end as "<stage>/<log_prefix><key>" (`log_prefix` given)."""
        for stage in stages:
            key = f"{stage}_{name}"
            self.metrics[key] = metric if stage == stages[0] else metric.clone()
            if log_prefix is not None:
                self._dict_metrics[key] = log_prefix
        seen = {id(module) for module in self.metrics.children()}  # a set of modules: equal hashes collapse
        if any(id(self.metrics[f"{stage}_{name}"]) not in seen for stage in stages):
            raise TypeError(f"{type(metric).__name__}'s copies hash and compare equal, so PyTorch sees only one of "
                            f"them (logging and .to(device) miss the others); give the class an identity __hash__.")

    def log_metric(self, stage: str, name: str, *args: Any, **log_kwargs: Any) -> None:
        """Update `metrics["<stage>_<name>"]` with `args` and, for a scalar metric, log the metric object (Lightning
        computes, synchronises and resets it at the epoch's end)."""
        key = f"{stage}_{name}"
        if key not in self.metrics:
            return
        metric = self.metrics[key]
        metric.update(*args)
        if key not in self._dict_metrics:
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, **log_kwargs)

    def logged_metrics(self, stage: str) -> list[tuple[str, Metric]]:
        """The metrics of `stage` with the name they are logged under (without "<stage>/"); a metric whose compute()
        returns a dict is named "<log_prefix>*" (its entries are logged as "<log_prefix><key>"). Reports read each
        metric's `higher_is_better` from here."""
        return [(f"{self._dict_metrics[key]}*" if key in self._dict_metrics else key.removeprefix(f"{stage}_"), metric)
                for key, metric in self.metrics.items() if key.startswith(f"{stage}_")]

    def _log_dict_metrics(self, stage: str) -> None:
        for key, prefix in self._dict_metrics.items():
            metric = self.metrics[key]
            # every rank evaluates at least one batch (`_evaluation_sampler`), and a metric a batch field feeds is
            # updated on every rank or on none: ranks agree on whether to make this collective call
            if key.startswith(f"{stage}_") and metric.update_count:
                for name, value in metric.compute().items():
                    self.log(f"{stage}/{prefix}{name}", value.float() if torch.is_tensor(value) else value,
                             sync_dist=False)  # already synchronised by compute()
            if key.startswith(f"{stage}_"):
                metric.reset()

    # ------------------------------------------------------------------------------------------------ steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _step(self, batch: Any, stage: str, batch_idx: int) -> torch.Tensor | None:
        skip = stage == "train" and self.hparams.nonfinite_loss == "skip"
        if skip:  # what the forward updates in place (BatchNorm statistics, family state), to undo a skipped batch
            self._skipped_step = False
            self._buffers_before = [(module, name, buffer.detach().clone()) for module in self.modules()
                                    for name, buffer in module.named_buffers(recurse=False)]
        out = self.forward_batch(batch, stage)
        if stage == "train":
            self.update_state(out, batch)
        terms = self.compute_loss(out, batch, stage)
        if stage == "train":
            terms = self.schedule.select(terms)
        elif not terms:  # a model whose evaluation output has no loss (torchvision detectors): metrics only
            self.update_metrics(out, batch, stage)
            return None
        # evaluation sums every term, whatever the stage: a scheduler or early stop on val/loss compares like with
        # like across stages (a stage's own sum fell from the local stage's 0.55 to the task's 1.39 and cut the lr)
        stacked = torch.stack([t.float() for t in terms.values()])  # (terms,)
        loss = stacked.sum()
        if stage == "train":
            where = f"global step {self.global_step}, epoch {self.current_epoch}, batch {batch_idx}"
            if skip:
                ranks = self._nonfinite_ranks(loss)  # the one policy that reads the device every step
                if ranks:
                    self._warn_skipped(ranks, where, format_terms(tuple(terms), stacked))
                    self._restore_buffers()
                    self.on_skipped_batch()
                    if not self._distributed():
                        return None  # Lightning skips the optimiser step
                    # Lightning refuses None under DDP and the other ranks would wait in the gradient all-reduce:
                    # every rank backpropagates a zero, and `on_before_optimizer_step` drops the gradients of a
                    # window that kept no batch
                    self._skipped_step = True
                    return self._zero_loss(loss)
                self._window_kept = True
            else:
                self._unchecked.append((loss.detach(), stacked.detach(), tuple(terms), where))
        on_step = stage == "train"
        # a float count: Lightning averages an integer one over the ranks with integer division (37 -> 18, not 18.5)
        log_kw = dict(on_step=on_step, on_epoch=True, batch_size=float(self.batch_size(batch)),
                      sync_dist=not on_step)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, **log_kw)
        self.log(f"{stage}/loss", loss, prog_bar=on_step, **log_kw)
        self.update_metrics(out, batch, stage)
        return loss

    def _distributed(self) -> bool:
        """Whether this run has more than one process, in an initialised process group (the trainer's)."""
        return self._trainer is not None and self.trainer.world_size > 1 and is_distributed()

    def _nonfinite_ranks(self, loss: torch.Tensor) -> list[int]:
        """nonfinite_loss="skip": the ranks whose training loss is NaN/inf at this step ([] where none is), alike on
        every rank, so that every rank skips the batch or none does (a rank alone leaving the step would leave the
        others waiting in DDP's gradient all-reduce). One process reads its own loss; under DDP each rank sets its
        own entry of a (world,) flag vector and one all-reduce (MAX) gives every rank the whole vector."""
        if not self._distributed():
            return [] if bool(torch.isfinite(loss)) else [self.global_rank]
        flags = torch.zeros(self.trainer.world_size, device=loss.device)  # (world,) 1: that rank's loss is NaN/inf
        flags[self.global_rank] = (~torch.isfinite(loss.detach())).float()
        return all_reduce_(flags, "max").nonzero().flatten().tolist()

    def _warn_skipped(self, ranks: list[int], where: str, terms: str) -> None:
        """Say that a batch was skipped: the rank whose loss was NaN/inf names itself and its terms (a warning of
        rank 0 alone never told of a NaN on rank 1), rank 0 names the rank(s) where it did not see one itself."""
        if not self._distributed():
            rank_zero_warn(f"Non-finite training loss at {where}: {terms}; batch skipped (nonfinite_loss='skip').")
            return
        rank = self.global_rank
        if rank in ranks:
            warnings.warn(f"Non-finite training loss on rank {rank} at {where}: {terms}; batch skipped on every rank "
                          f"(nonfinite_loss='skip'; rank(s) {ranks} saw one).", stacklevel=3)
        elif rank == 0:
            warnings.warn(f"Non-finite training loss on rank(s) {ranks} at {where}; batch skipped on every rank "
                          "(nonfinite_loss='skip').", stacklevel=3)

    def _zero_loss(self, like: torch.Tensor) -> torch.Tensor:
        """A finite zero whose backward gives every trainable parameter a zero gradient (a skipped batch under DDP):
        the gradient all-reduce expects every parameter's gradient, and a NaN loss times 0 would still be NaN."""
        zeros = [p.sum().float() * 0 for p in self.parameters() if p.requires_grad]
        return torch.stack(zeros).sum() if zeros else like.detach().new_zeros(()).float()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.forward_batch(batch, "predict")
        probs = out["logits"].float().softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1), **({"index": batch["index"]} if "index" in batch else {}),
                **self.prediction_extras(out, batch)}

    def prediction_extras(self, out: dict[str, Any], batch: Any) -> dict[str, Any]:
        """What a family adds to each predict batch's output: e.g. "columns" ({name: B values}, appended to each
        row of predictions.csv) or its own tensors. None by default."""
        return {}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """nonfinite_loss="skip": a finite loss whose gradients are not (an overflow in the backward) is skipped
        too. The gradients are dropped, so the optimiser leaves every parameter and its state as they were, as AMP's
        GradScaler does, and the buffers go back to where they were before the batch (the last batch of an
        accumulation window). Under DDP, the step of a batch whose loss was NaN/inf on any rank (`_step`: the
        buffers are back and it said so) drops its gradients here on every rank; a skipped batch inside an
        accumulation window adds zeros to the window's gradients, as a skipped batch adds nothing in one process: only
        a window whose every batch was skipped drops them (dropping them for a skipped last batch lost the batches
        the window kept)."""
        if self.hparams.nonfinite_loss != "skip":
            return
        skipped, kept = self._skipped_step, self._window_kept
        self._skipped_step = self._window_kept = False  # the next window starts here
        if skipped and not kept:
            optimizer.zero_grad(set_to_none=True)  # no gradient: the optimiser leaves those parameters alone
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            rank_zero_warn(f"Non-finite gradients at global step {self.global_step}, epoch {self.current_epoch}; "
                           "step skipped (nonfinite_loss='skip').")
            optimizer.zero_grad(set_to_none=True)  # no gradient: the optimiser leaves those parameters alone
            self._restore_buffers()
            self.on_skipped_batch()

    def on_skipped_batch(self) -> None:
        """nonfinite_loss="skip", after a batch was skipped and the buffers restored: a family undoes what it keeps
        outside buffers (ICNN: the balanced assignment queued from the skipped batch's statistics)."""

    def _restore_buffers(self) -> None:
        """Put back the buffers of before the batch, by name: a forward may have replaced a buffer's tensor (ICNN's
        running Z_T) rather than written into it."""
        with torch.no_grad():
            for module, name, before in self._buffers_before:
                now = getattr(module, name)
                if now is not None and now.shape == before.shape and now.dtype == before.dtype:
                    now.copy_(before)  # the tensor registered now, whichever it is
                else:
                    setattr(module, name, before)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._trainer is None or (self.global_step % max(self.trainer.log_every_n_steps, 1)) == 0:
            self.check_finite_losses()  # Lightning reads its logged values at these steps anyway

    def on_train_epoch_end(self) -> None:
        self.check_finite_losses()
        self._log_dict_metrics("train")
        if self.trainer.fit_loop.restarting:  # a resumed fit's first epoch: Lightning skips its plateau steps
            due = due_plateau_steps(self.trainer, self._plateau_taken, at_epoch_end=True)
            take_plateau_steps(self, due, self._plateau_taken)

    def reset_metrics(self, stage: str) -> None:
        """Reset every metric of `stage` as its epoch starts, so that its result counts that epoch's batches alone,
        whatever the states held before. Lightning resets the logged metrics at an epoch's end, but states can
        come from elsewhere: under ddp_spawn on the CPU, torch.multiprocessing hands the spawned ranks the metric
        states in memory shared with the main process (Lightning unshares parameters and buffers only; metric
        states are neither), so the ranks' updates landed in the main process's states and a later `validate`
        started from them (a fit then validate of L2X gave 0.543, then 0.5312, 0.5254, ... for one checkpoint).
        `reset` gives each state a new tensor, which also ends that sharing. Nothing carries a metric's states
        across epochs."""
        for key, metric in self.metrics.items():
            if key.startswith(f"{stage}_"):
                metric.reset()

    def on_validation_epoch_start(self) -> None:
        self.reset_metrics("val")
        self.check_finite_losses()

    def on_test_epoch_start(self) -> None:
        self.reset_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_losses()  # never write the state a non-finite step made
        if self._schedule_epoch is not None:  # what `on_load_checkpoint` puts back (`enter_schedules`)
            checkpoint[SCHEDULE_EPOCH_KEY] = self._schedule_epoch
        if self.model_settings is not None:  # what a resumed fit is held to (`ZooCLI.check_settings_fit_checkpoint`)
            checkpoint[SETTINGS_KEY] = self.model_settings
        hp_metric = self._monitored_value("val") if self._trainer is not None else None
        step = self._validated_step
        if hp_metric is None:
            hp_metric, step = self._hp_metric_restored, self._hp_metric_restored_step
        if hp_metric is not None:  # what a fit resumed into a folder without the run's events writes as hp_metric
            checkpoint[HP_METRIC_KEY] = hp_metric
            if step is not None:
                checkpoint[HP_METRIC_STEP_KEY] = step
        owed = due_plateau_steps(self.trainer, self._plateau_taken) if self._trainer is not None else {}
        if owed:  # the epoch-end ReduceLROnPlateau steps this checkpoint precedes, taken when a fit resumes from it
            checkpoint[PLATEAU_KEY] = owed

    def defer_check(self, ok: torch.Tensor, message: str) -> None:
        """A condition on the batch's device values (`ok`, a bool tensor) that must not make a step wait for the
        device: on the CPU it is read at once, elsewhere with the loss check (`check_finite_losses`: every
        `log_every_n_steps` training steps, at epoch ends, before validation and any checkpoint). False raises
        ValueError(message). Families use it for their batch checks (CBM's 0/1 concept labels)."""
        if ok.device.type == "cpu":
            check_on_host(ok, message)
            return
        self._deferred_checks.append((ok, message))

    def check_finite_losses(self) -> None:
        """nonfinite_loss="raise": read the terms of the steps since the last check (one device read) and raise
        `FloatingPointError` naming the first step whose loss was NaN/inf, its batch and every term. Also reads the
        `defer_check` conditions since the last check (one more device read where there are any)."""
        if self._deferred_checks:
            deferred, self._deferred_checks = self._deferred_checks, []
            passed = torch.stack([ok for ok, _ in deferred]).tolist()  # (checks,)
            if not all(passed):
                raise ValueError(deferred[passed.index(False)][1])
        if not self._unchecked:
            return
        unchecked, self._unchecked = self._unchecked, []
        finite = torch.isfinite(torch.stack([loss for loss, *_ in unchecked])).tolist()  # (steps,)
        if all(finite):
            return
        _, stacked, names, where = unchecked[finite.index(False)]
        spread = (f" on rank {self.global_rank}", " Under DDP the gradient all-reduce spreads one rank's NaN/inf to "
                  "every rank's weights: the first may be another rank's, steps earlier (each rank's error names its "
                  "own first).") if self._distributed() else ("", "")
        trainer = self.trainer
        saved = getattr(trainer, "ckpt_path", None) is not None or any(  # a checkpoint this run restored or wrote
            getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            for callback in getattr(trainer, "checkpoint_callbacks", []))
        raise FloatingPointError(f"Non-finite training loss{spread[0]} at {where}: {format_terms(names, stacked)}. "
                                 + ("The last checkpoint is the last good state." if saved else
                                    "No checkpoint was written yet.")
                                 + " A lower learning rate may help, or --model.init_args.nonfinite_loss=skip, which "
                                   f"skips such steps.{spread[1]}")

    def on_validation_epoch_end(self) -> None:
        self.check_finite_losses()  # the validation batches' deferred checks
        self._log_dict_metrics("val")
        if not self.trainer.sanity_checking:  # where this validation's val/* points and hp_metric go (checkpoints)
            self._validated_step = logged_step(self.trainer)

    def on_test_epoch_end(self) -> None:
        self.check_finite_losses()
        self._log_dict_metrics("test")

    # ------------------------------------------------------------------------------------ TensorBoard's HPARAMS
    # Each run's HPARAMS entry (one per TensorBoard run folder: a fit, <run>/validate, <run>/test) has one metric,
    # hp_metric, for a TensorBoardLogger with default_hp_metric: true (`declare_hp_metric`, from `setup`: the entry
    # declares it, and Lightning's placeholder -1 at step 0 is never logged). hp_metric is the checkpoint monitor's
    # value after every validation (val/acc by default; in a test its test/ counterpart), or, with
    # `checkpoint.monitor: null`, val/acc (test/acc) where the System logs it; at the step of the validation's val/*
    # points. Before the first validation, or without such a metric, the entry shows no value (an empty cell, not a
    # score of -1). A resumed fit adds nothing: its earlier sessions' points are in the run folder's events, at their
    # steps (a checkpoint resumed into another folder writes its last value at its step). A logger with
    # default_hp_metric: false (ablate's point runs: ablate writes their entries; helper runs) gets no hp_metric.
    def hp_metric_name(self, stage: str) -> str | None:
        """The logged metric hp_metric carries after a `stage` ("val", "test") loop: the monitor of the first
        ModelCheckpoint that has one (`checkpoint.monitor`), for a test its test/ counterpart (val/acc ->
        test/acc); without a monitor, `<stage>/acc` (`_monitored_value` gives None when it is not logged); None for
        a test of a monitor that is not a val/ metric."""
        monitor = next((callback.monitor for callback in self.trainer.checkpoint_callbacks
                        if getattr(callback, "monitor", None)), None)
        if monitor is None:
            return f"{stage}/acc"
        if stage == "val":
            return monitor
        return f"{stage}/{monitor.removeprefix('val/')}" if monitor.startswith("val/") else None

    def _monitored_value(self, stage: str) -> float | None:
        name = self.hp_metric_name(stage)
        value = self.trainer.callback_metrics.get(name) if name is not None else None
        return float(value) if value is not None else None

    def _write_hp_metric(self, value: float | None) -> None:
        """Log `value` as hp_metric to every TensorBoardLogger that declares hp_metric (`declares_hp_metric`), rank
        zero only (the logger's `log_metrics`), at the step Lightning logs the epoch's metrics at (its count of
        batches that stepped: the monitor's point and hp_metric's are one step); nothing for None."""
        if value is None:
            return
        step = logged_step(self.trainer)
        for logger in self.loggers:
            if declares_hp_metric(logger):
                logger.log_metrics({HP_METRIC: value}, step=step)

    def write_restored_hp_metric(self) -> None:
        """Once per resumed fit (`on_train_start`, or `on_fit_end` when nothing was left to train): the checkpoint's
        hp_metric, at the step it was logged at, to a declaring TensorBoardLogger whose folder holds no events of
        an earlier session (a checkpoint resumed into another run folder). The run's own folder already holds the
        point: written again, it came after Lightning's placeholder, one step after its validation."""
        if not self._hp_metric_pending:
            return
        self._hp_metric_pending = False
        if self._hp_metric_restored is None or self.global_rank != 0:
            return
        step = self._hp_metric_restored_step
        step = logged_step(self.trainer, at_fit_end=True) if step is None else step  # a checkpoint without it
        for logger in self.loggers:
            if declares_hp_metric(logger) and not _holds_earlier_events(logger):
                logger.log_metrics({HP_METRIC: self._hp_metric_restored}, step=step)

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:  # Lightning drops a sanity check's metrics
            self._write_hp_metric(self._monitored_value("val"))

    def on_test_end(self) -> None:
        self._write_hp_metric(self._monitored_value("test"))

    def on_fit_end(self) -> None:
        """A resumed fit with nothing left to train (no epoch, no validation) still writes its checkpoint's
        hp_metric where its folder lacks it (`write_restored_hp_metric`)."""
        self.write_restored_hp_metric()

    def teardown(self, stage: str) -> None:
        """Lightning's last hook of a run: a spawned process's gloo group ends with it (`end_spawned_process_group`)."""
        if self._trainer is not None:
            end_spawned_process_group(self.trainer)

    # ------------------------------------------------------------------------------- schedules and auxiliaries
    def on_fit_start(self) -> None:
        self._hp_metric_pending = self.trainer.ckpt_path is not None  # a resumed fit (`write_restored_hp_metric`)
        self._validated_step = None
        if self.trainer.ckpt_path is None:  # a new fit of loaded weights: their run's hp_metric is not this run's
            self._hp_metric_restored = self._hp_metric_restored_step = None
        unreached = self.schedule.unreached(self.trainer.max_epochs)
        if unreached and not self.trainer.fast_dev_run:  # a smoke test may stop anywhere
            # the stages entered, by position (the unreached are the last): compared by value, a stage equal to an
            # unreached one (a second, identical push cycle) counted as unreached, its modules as never trained
            reached = self.schedule.stages[:len(self.schedule.stages) - len(unreached)]
            trained = sorted({name for stage in reached
                              for name in stage.train or [n for n, _ in self.model.named_children()]})
            never = sorted({n for stage in unreached for n in stage.train or []} - set(trained))
            rank_zero_warn(f"max_epochs={self.trainer.max_epochs} ends before stage(s) "
                           f"{[stage.name for stage in unreached]} start (stages: "
                           f"{[(stage.name, stage.epochs) for stage in self.schedule.stages]})"
                           + (f"; {never} are never trained" if never else "")
                           + ". Give max_epochs at least the stages' sum, or shorten the stages.")
        unfreeze, max_epochs = self.hparams.get("unfreeze_epoch"), self.trainer.max_epochs
        if (self.hparams.get("freeze_backbone") and unfreeze is not None and max_epochs is not None
                and 0 <= max_epochs <= unfreeze and not self.trainer.fast_dev_run):
            rank_zero_warn(f"max_epochs={max_epochs} ends before unfreeze_epoch={unfreeze} (epochs count from 0): the "
                           f"backbone stays frozen for all of this fit. Give max_epochs more than unfreeze_epoch to "
                           f"fine-tune it, or an earlier unfreeze_epoch.")
        if auxiliaries_pending(self):
            if self.trainer.world_size > 1:
                raise RuntimeError("Auxiliary models must be ready before a distributed fit: call "
                                   "zoo.engine.prepare_auxiliaries(system, trainer, datamodule) first (train.py does).")
            prepare_auxiliaries(self, self.trainer, self.trainer.datamodule)

    def on_train_start(self) -> None:
        """A run resumed from a checkpoint written inside an epoch (or at its end, before the epoch closed) goes on
        without `on_train_epoch_start` (Lightning calls it only when an epoch starts): the epoch's stage, frozen
        modules and epoch schedules are entered here instead, or the rest of the epoch would train stage 0's
        modules on stage 0's loss terms (a pushed prototype drifting off its patch; a sequential CBM's concept
        model trained in its task stage)."""
        loop = self.trainer.fit_loop
        if loop.restarted_mid_epoch or loop.restarted_on_epoch_end:
            self.enter_epoch()
        self.write_restored_hp_metric()  # a resumed fit into a folder without its run's events
        if self.trainer.ckpt_path is not None:  # resumed: the plateau steps Lightning skips (`zoo.engine.plateau`)
            take_plateau_steps(self, self._plateau_owed, self._plateau_taken)
        self._plateau_owed = {}

    def on_train_epoch_start(self) -> None:
        self.reset_metrics("train")
        for name, value in self.enter_epoch().items():
            self.log(f"schedule/{name}", value, on_step=False, on_epoch=True)

    def enter_epoch(self) -> dict[str, float]:
        """Enter the current epoch's stage (trainable and frozen submodules, settings, learning-rate scale), the
        backbone's freezing and every `set_epoch` schedule; returns what to log. Idempotent: a resumed run enters the
        epoch it resumes inside (`on_train_start`) as a run that never stopped entered it."""
        optimizer = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        schedulers = self.lr_schedulers() if self._trainer is not None else None
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        logged = self.schedule.start_epoch(self.model, optimizer, self.current_epoch, schedulers)
        if self.backbone_frozen():
            backbone_of(self.model).requires_grad_(False)
        elif self.hparams.get("freeze_backbone") and self.schedule.current.train is None:
            backbone_of(self.model).requires_grad_(True)  # unfrozen; a stage that names what it trains decides
        logged |= epoch_schedules({"model": self.model, "loss": self.loss}, self.current_epoch)
        self._schedule_epoch = self.current_epoch
        self.train(self.training)  # frozen submodules back to eval mode
        return logged

    def enter_schedules(self, epoch: int) -> None:
        """The values of `epoch`'s `set_epoch` schedules (the loss's weights: rule distillation's pi_t, ICNN's
        lambda), without training anything. What a checkpoint's weights were trained and validated under, put back
        when it is loaded (`on_load_checkpoint`): `validate` / `test` / `predict` of a checkpoint run outside fit,
        where no epoch starts, so they used the schedules' initial values (a distillation run's val/loss_distill 0.0
        instead of the 0.093 fit logged). Trainable parameters, frozen modules, the optimiser and the RNG are left
        alone (the `set_epoch`s only set values); so are a stage's model settings, which a model that reads them
        keeps in its own state (AOG's OR mode), alike for every load path (`zoo.load_checkpoint`, exports); a fit
        resumed from the checkpoint enters its epoch as before (`enter_epoch`)."""
        epoch_schedules({"model": self.model, "loss": self.loss}, epoch)
        self._schedule_epoch = epoch

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "ZooSystem":
        """`nn.Module._apply` (what `.to`, `.cuda`, `.bfloat16`, ... run), then the metrics' floating states back to
        at least float32 (`keep_metric_states_float32`): whatever converts the System, Lightning's precision plugin
        under "bf16-true" (fit, validate, test, predict) or a user's `.to(torch.bfloat16)`, the metrics keep exact
        counts and sums and still take bf16 inputs. Float64 states (64-true) stay."""
        super()._apply(fn, *args, **kwargs)
        keep_metric_states_float32(self)
        return self

    def train(self, mode: bool = True) -> "ZooSystem":
        super().train(mode)
        if mode and hasattr(self, "schedule"):
            for module in self.frozen_modules():
                module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Modules kept in eval mode while training: the current stage's frozen submodules, a frozen backbone and
        the auxiliaries (but those left trainable after preparation, e.g. a fine-tuned encoder)."""
        return self.schedule.frozen(self.model) + ([backbone_of(self.model)] if self.backbone_frozen() else []) + [
            aux.module(self) for aux in self.auxiliaries() if not aux.trainable_after]

    # ------------------------------------------------------------------------------------------------ fine-tuning
    def _check_fine_tuning(self, freeze: bool, unfreeze_epoch: int | None, lr_scale: float) -> None:
        """Clear errors for fine-tuning options a model cannot take (no backbone) or that contradict each other."""
        if not self.fine_tuning:
            return
        if unfreeze_epoch is not None and (not freeze or unfreeze_epoch < 0):
            raise ValueError(f"unfreeze_epoch={unfreeze_epoch} needs freeze_backbone=True and an epoch >= 0.")
        if lr_scale < 0:
            raise ValueError(f"backbone_lr_scale must be >= 0; got {lr_scale}.")
        backbone = backbone_of(self.model)
        if backbone is None:
            raise ValueError(f"freeze_backbone / unfreeze_epoch / backbone_lr_scale need a model with a backbone; "
                             f"{self.hparams.model_name} ({type(self.model).__name__}) has no `backbone` module.")
        params = list(backbone.parameters())
        if unfreeze_epoch is not None and params and not any(p.requires_grad for p in params):
            # the System's unfreezing would train a backbone the model was built to keep frozen for the whole run
            raise ValueError(f"{self.hparams.model_name} is built with its backbone frozen for the whole run "
                             f"(model_kwargs freeze_backbone: true), and unfreeze_epoch={unfreeze_epoch} would train "
                             f"it from epoch {unfreeze_epoch}. Freeze it for a while with the System's options alone "
                             f"(freeze_backbone: true, unfreeze_epoch: {unfreeze_epoch}; no model_kwargs "
                             f"freeze_backbone), or leave out unfreeze_epoch to keep it frozen.")

    @property
    def fine_tuning(self) -> bool:
        """Whether a fine-tuning option is set (then the optimiser has a backbone group and a rest group)."""
        hp = self.hparams
        return bool(hp.get("freeze_backbone") or hp.get("unfreeze_epoch") is not None or
                    hp.get("backbone_lr_scale", 1.0) != 1.0)

    def backbone_frozen(self) -> bool:
        """Whether `freeze_backbone` holds the backbone at the current epoch."""
        hp = self.hparams
        return bool(hp.get("freeze_backbone") and (hp.unfreeze_epoch is None or
                                                   self.current_epoch < hp.unfreeze_epoch))

    # -------------------------------------------------------------------------------- optimiser and checkpoints
    def configure_optimizers(self) -> Any:
        if self.schedule.staged:  # the optimiser holds every parameter of the model; stages switch them on and off
            params = [p for p in self.model.parameters()]
        else:
            params = [p for p in self.parameters() if p.requires_grad]
        if self.fine_tuning:  # two groups: the whole backbone (frozen now or not) at its own learning rate, the rest
            backbone = list(backbone_of(self.model).parameters())
            own = {id(p) for p in backbone}
            params = [{"params": backbone, "name": "backbone"},
                      {"params": [p for p in params if id(p) not in own], "name": "rest"}]
        optimizer = self.optimizer_factory(params)
        scheduler = self.scheduler_factory(optimizer) if self.scheduler_factory is not None else None
        if self.fine_tuning:  # the scaled rate lives in the param group: saved with the optimiser, kept on resume;
            # scaled after the scheduler is built, with what it computes rates from (OneCycleLR / CyclicLR set every
            # group's rate from one max_lr / base_lr as they are built: a rate scaled before was undone)
            schedulers = [scheduler] if scheduler is not None else []
            scale_group_rates(optimizer, 0, self.hparams.backbone_lr_scale, schedulers)
        if scheduler is None:
            return optimizer
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"  # every term, in every stage (`_step`)
        return {"optimizer": optimizer, "lr_scheduler": config}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, with the model built without reading its `pretrained_path` (the checkpoint's weights replace
        them; the file the run started from may be gone): `zoo.weights.checkpoint_replaces_weights`."""
        from zoo.weights import checkpoint_replaces_weights

        with checkpoint_replaces_weights():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, naming the difference, a checkpoint of another model / class count / channel count (before
        Lightning's load_state_dict fails deep inside torch), then one of another System with the same model; then
        tell a datamodule of a checkpoint that holds no state of it (`zoo.weights.restore_datamodule_state`), drop the
        checkpoint's loss tensors the current loss does not hold (`_drop_foreign_loss_state`) and put back the loss
        schedules the weights were trained under (`enter_schedules` at `schedule_epoch(checkpoint)`); under
        `64-true`, convert the System to float64 before Lightning loads the weights (`convert_for_precision`)."""
        saved = checkpoint.get("hyper_parameters")
        if isinstance(saved, dict) and "model_name" in saved:
            # every constructor input: a series' channel count is in data_inputs (`zoo.weights.built_in_chans`)
            check_same_model(model_spec(saved), {k: self.hparams.get(k) for k in MODEL_KEYS}, "the checkpoint")
        held, here = (saved or {}).get("_class_path"), f"{type(self).__module__}.{type(self).__qualname__}"
        if held is not None and resolve_class(held) is not type(self):  # `--ckpt_path last` is not checked by the CLI
            raise CheckpointError(f"the checkpoint was written by {held.rsplit('.', 1)[-1]} ({held}); this run is "
                                  f"{type(self).__name__} ({here}). Resume a run with its own config.")
        check_resume_keys(type(self), saved or {}, self.hparams, "the checkpoint")
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and type(datamodule).__qualname__ not in checkpoint:  # Lightning restores the rest
            restore_datamodule_state(datamodule, checkpoint)  # a checkpoint from before the datamodule saved a state
        self._drop_foreign_loss_state(checkpoint)
        restored, step = checkpoint.get(HP_METRIC_KEY), checkpoint.get(HP_METRIC_STEP_KEY)
        self._hp_metric_restored = float(restored) if isinstance(restored, (int, float)) else None
        self._hp_metric_restored_step = int(step) if isinstance(step, int) else None
        self._plateau_owed = dict(checkpoint.get(PLATEAU_KEY) or {})
        epoch = schedule_epoch(checkpoint)
        if epoch is not None:
            self.enter_schedules(epoch)
        if self._trainer is not None:  # before Lightning loads the weights (outside a trainer: as built)
            convert_for_precision(self, self._trainer)

    def _drop_foreign_loss_state(self, checkpoint: dict[str, Any]) -> None:
        """Remove from `checkpoint["state_dict"]` the "loss.*" tensors this System's loss does not hold, so that
        Lightning's strict load accepts the checkpoint. The loss is not a hyperparameter: `load_from_checkpoint`
        rebuilds the System with its `default_loss()`, and checkpoints written before the losses' config constants
        became non-persistent buffers hold them (ReNN's "loss.pos_weight", the semantic loss's
        "loss.assignments"). State the current loss does hold (the textual REINFORCE baseline) is kept and restored
        on resume; a key outside "loss." is left for the strict load to refuse."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            return
        held = {f"loss.{key}" for key in self.loss.state_dict()}
        for key in [key for key in state if key.startswith("loss.") and key not in held]:
            del state[key]


def _holds_earlier_events(logger: Any) -> bool:
    """Whether a TensorBoardLogger's folder holds an event file besides the one its writer of this session writes
    (made when the trainer started): a run folder an earlier session logged to."""
    folder = logger.experiment.get_logdir()
    return len(list(Path(folder).glob("events.out.tfevents.*"))) > 1


def _same_value(mine: Any, theirs: Any) -> bool:
    """Whether a System's saved setting equals the datamodule's (tuples and lists alike: hparams keep either)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(mine) == plain(theirs)


def schedule_epoch(checkpoint: dict[str, Any]) -> int | None:
    """The epoch whose schedules a checkpoint's weights were trained under: the entry `ZooSystem` writes
    (`SCHEDULE_EPOCH_KEY`), else, for a checkpoint written before it, the last epoch its fit started (Lightning's
    `epoch` is one past it in a checkpoint written when fit ended); None where no epoch started."""
    if SCHEDULE_EPOCH_KEY in checkpoint:
        return int(checkpoint[SCHEDULE_EPOCH_KEY])
    try:
        started = int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["total"]["started"])
    except (KeyError, TypeError, ValueError):
        return None
    return started - 1 if started > 0 else None
