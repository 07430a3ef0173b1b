"""ZooCLI: LightningCLI with the zoo's defaults (run folders, checkpoints, RNG state, data -> model links)."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.plugins.io import TorchCheckpointIO

from zoo.cli.errors import ZooArgumentParser, configuration_phase
from zoo.engine.callbacks import EVALUATION_LOGS, LatestCheckpoint, RNGStateCallback, log_evaluation_apart

if TYPE_CHECKING:
    from zoo.backbones import Backbone

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "checkpoints",
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "checkpoints", "name": "default", "version": ""},
    },
}


def merge_kwargs_options(args: list[str]) -> list[str]:
    """`--model.init_args.model_kwargs '{a: 1, b: 2}'` (any option ending in `_kwargs` given a mapping) as
    `--model.init_args.model_kwargs.a=1 --model.init_args.model_kwargs.b=2`: the keys given on the command line
    merge into the config's mapping instead of replacing it (jsonargparse replaces a whole dict value)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if name.startswith("--") and name.endswith("_kwargs") and (has_value or i + 1 < len(args)):
            if not has_value:
                value, i = args[i + 1], i + 1
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, dict) and parsed:
                out += [f"{name}.{key}={item if isinstance(item, str) else json.dumps(item)}"
                        for key, item in parsed.items()]
            else:
                out += [name, value]
        else:
            out.append(arg)
        i += 1
    return out


def restore_null_kwargs(config: Any) -> None:
    """`--model.init_args.model_kwargs.pretrained_path=null` removes a key's value (the factory's default applies):
    jsonargparse turns a null given for one entry of an `Any`-valued mapping inside a subclass's init_args into the
    string "None"; put None back in every `*_kwargs` mapping of the parsed config."""
    for key, value in (config.items() if hasattr(config, "items") else []):
        if key.endswith("_kwargs") and isinstance(value, dict):
            value.update({name: None for name, item in value.items() if item == "None"})


def image_backbone(system: Any) -> Backbone | None:
    """The zoo Backbone the images of a System's model go through: its model's `backbone` (the zoo's classifiers,
    ICNN, AOG-RCNN's detector), else its model's `image_encoder`'s (the textual family: the classifier whose pooled
    top map it reads); None when there is neither (L2X's selectors, ReNN)."""
    from zoo.backbones import Backbone
    from zoo.engine.system import backbone_of

    model = getattr(system, "model", system)
    for holder in (model, getattr(model, "image_encoder", None)):
        backbone = backbone_of(holder) if holder is not None else None
        found = next((m for m in backbone.modules() if isinstance(m, Backbone)), None) if backbone is not None else None
        if found is not None:
            return found
    return None


def backbone_name(system: Any) -> str:
    """The timm (or "tinycnn") name of the backbone of a System's model (`image_backbone`), for `mean: pretrained`."""
    found = image_backbone(system)
    if found is None:
        raise ValueError(f"data mean: pretrained needs a model with a zoo Backbone; {type(system).__name__} has none. "
                         "Give the data's mean and std as lists.")
    return found.name


def warn_unnormalised_pretrained(system: Any, datamodule: Any) -> None:
    """Warn (once) when the System's image backbone starts from a weight file and the datamodule, which can
    normalise its images (it takes `mean`), normalises them otherwise than the weights expect: left at [0, 1] pixels
    (mean None) where ImageNet weights expect their mean/std (`mean: pretrained`), or, for a zoo run's checkpoint or
    export (`zoo.checkpoints.trained_normalization`: the mean and std its own data had), normalised with other values
    (`mean: pretrained` gives the backbone's timm values, not that run's). A datamodule without `mean` (detection: the
    detector normalises) is not told; nor a run whose checkpoint replaces the starting weights (the file is not
    read)."""
    import inspect

    from pytorch_lightning.utilities import rank_zero_warn

    from zoo.checkpoints import trained_normalization

    backbone = image_backbone(system)
    report = getattr(backbone, "load_report", None)
    if report is None or not getattr(report, "read", True) or "mean" not in inspect.signature(
            type(datamodule)).parameters:
        return
    mean, std = getattr(datamodule, "mean", ""), getattr(datamodule, "std", None)
    trained = trained_normalization(report.path)
    if mean is None:
        if trained is not None and _same_normalization(trained, ([0.0], [1.0])):
            return  # a zoo run on [0, 1] pixels: as it was trained
        unnormalised = (f"Backbone {backbone.name!r} starts from pretrained weights {report.path!r}, but the "
                        f"data's images are not normalised ({type(datamodule).__name__} mean: None, pixels in [0, 1])")
        rank_zero_warn(f"{unnormalised}. Weights trained on ImageNet expect its mean and std: set --data.init_args.mean "
                       f"pretrained (the backbone's pretrained mean/std), or the mean and std the weights were trained "
                       f"with (nothing to do for weights trained on [0, 1] pixels)." if trained is None else
                       f"{unnormalised}; they are a zoo run's, trained on images normalised with mean {trained[0]}, "
                       f"std {trained[1]}: give --data.init_args.mean {trained[0]} --data.init_args.std {trained[1]}.")
    elif trained is not None and isinstance(mean, (list, tuple)) and not _same_normalization(trained, (mean, std)):
        rank_zero_warn(f"Backbone {backbone.name!r} starts from {report.path!r}, a zoo run trained on images "
                       f"normalised with mean {trained[0]}, std {trained[1]}; this data's are mean {list(mean)}, std "
                       f"{list(std)}" + (" (`mean: pretrained`: the backbone's timm values, not that run's)"
                                         if getattr(datamodule, "hparams", {}).get("mean") == "pretrained" else "")
                       + f". Give --data.init_args.mean {trained[0]} --data.init_args.std {trained[1]} to feed it "
                         f"what it learnt from" + (" (null, null: [0, 1] pixels)."
                                                   if _same_normalization(trained, ([0.0], [1.0])) else "."))


def refuse_empty_budget(trainer: Any) -> None:
    """Refuse a new fit that would train nothing (`max_epochs` 0, `max_steps` 0 or `limit_train_batches` 0): it moved
    the run folder's trained run to stale/ and left a folder with a config.yaml and no checkpoint, exiting 0 (a
    compare reported untrained weights). `trainer`: a Trainer, or a config's trainer settings (an ablate point's,
    which builds none). A resumed fit may end at once (its checkpoint already holds the budget): not asked."""
    from zoo.cli.errors import mark

    def read(key: str) -> Any:
        return trainer.get(key) if hasattr(trainer, "get") else getattr(trainer, key, None)

    if read("fast_dev_run"):
        return
    overfit = read("overfit_batches")  # Lightning trains these batches in place of limit_train_batches
    budget = ("max_epochs", "max_steps", "overfit_batches" if overfit else "limit_train_batches")
    empty = [f"{key}={read(key)}" for key in budget if read(key) == 0 and not isinstance(read(key), bool)]
    if empty:
        raise mark(ValueError(f"fit: --trainer.{empty[0]} trains nothing (no step, no checkpoint); nothing was moved "
                              f"or written. Give it a budget of at least one step, or evaluate a run with validate / "
                              f"test --ckpt_path."))


def _same_normalization(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    """Two (mean, std) pairs alike, one value standing for every channel, as a checkpoint's data settings are
    compared (`zoo.weights._same_setting`)."""
    from zoo.weights import _same_setting

    return _same_setting("mean", a[0], b[0]) and _same_setting("std", a[1], b[1])


CKPT_PATH_KEYWORDS = ("last", "best", "hpc")  # Lightning's own --ckpt_path names, not files
EVALUATIONS = ("validate", "test", "predict")  # the commands that evaluate a trained model
EVALUATION_VERBS = {"validate": "validated", "test": "tested", "predict": "run"}
# The model settings that give a model weights of its own (a backbone's or an export's file, a textual stage-1
# checkpoint): with one, validate / test / predict may run the model as built, without a checkpoint
STARTING_WEIGHTS = ("model.init_args.model_kwargs.pretrained_path", "model.init_args.init_checkpoint")


def last_checkpoint(trainer: pl.Trainer, subcommand: str | None) -> str | None:
    """The file `--ckpt_path last` restores for `trainer` running `subcommand` (Lightning's own resolution: the
    newest last checkpoint of its checkpoint callbacks' folders), None where there is none: the run then starts
    afresh, which Lightning warns about when the command runs (not here as well)."""
    from pytorch_lightning.trainer.states import TrainerFn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn(subcommand or "fit"), "last",
                                                               model_provided=True, model_connected=False)
    return None if found is None else str(found)


def prepare_fit_auxiliaries(system: Any, trainer: pl.Trainer, datamodule: Any, restores_checkpoint: bool) -> None:
    """`zoo.engine.prepare_auxiliaries` before a fit. A fit that restores a checkpoint takes every prepared auxiliary's
    weights and ready flag from it: those it would load or train are marked ready first, so that none reads its own
    file (a sentence_classifier_checkpoint that may have moved) or is trained only to be overwritten; preparation
    then only freezes them, as it did in the run that wrote the checkpoint."""
    from zoo.engine import prepare_auxiliaries

    if not hasattr(system, "auxiliaries"):
        return
    if restores_checkpoint:
        for aux in system.auxiliaries():
            if aux.checkpoint is not None or aux.epochs > 0:  # one never loaded nor trained stays unprepared
                aux.ready_flag(system).fill_(True)
    prepare_auxiliaries(system, trainer, datamodule)


def ckpt_path_reset_by_config(args: list[str]) -> tuple[str, list[str]] | None:
    """(the value, the configs read after it) of the last `--ckpt_path` of `args` (the command line) that a later
    `--config` (`-c`) may have reset: jsonargparse applies the options in order, so a run's config.yaml (which holds
    `ckpt_path: null`, or a resumed run's `last` or file) given after `--ckpt_path FILE` replaces it. None where no
    `--ckpt_path` with a value has a config after it."""
    given: str | None = None
    configs: list[str] = []
    for i, arg in enumerate(args):
        name, has_value, value = arg.partition("=")
        if not has_value:
            value = args[i + 1] if i + 1 < len(args) else ""
        if name == "--ckpt_path":
            given, configs = (value if value.lower() not in ("", "null", "none") else None), []
        elif name in ("--config", "-c") and given is not None:
            configs.append(value)
    return (given, configs) if given is not None and configs else None


def reset_ckpt_path_words(given: str, configs: list[str], used: Any = None) -> tuple[str, str]:
    """(why, what to give) for a `--ckpt_path` that a later `--config` reset (`ckpt_path_reset_by_config`'s pair) to
    `used` (the parsed value: None, or a resumed run's `last` or file)."""
    held = ("`ckpt_path: null` (a run's config.yaml holds one)" if used is None else
            f"`ckpt_path: {used}` (the config.yaml of a run resumed from it holds one)")
    why = (f"--ckpt_path {given} is given before --config {' '.join(configs)}, whose {held}, read after it, "
           f"replaced it")
    return why, f"--ckpt_path after --config: --config {configs[-1]} --ckpt_path {given}"


def saved_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a checkpoint's System and datamodule (empty where it saved none), and its model
    settings (`zoo.weights.SETTINGS_KEY`: None where it kept none)."""
    from zoo.weights import SETTINGS_KEY

    held: dict[str, Any] = {key: dict(checkpoint.get(key) or {})
                            for key in ("hyper_parameters", "datamodule_hyper_parameters")}
    held[SETTINGS_KEY] = checkpoint.get(SETTINGS_KEY)
    return held


def with_model_defaults(held: dict[str, Any] | None, given: dict[str, Any] | None
                        ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Two runs' model settings (`zoo.weights.model_settings`) with each `model_kwargs` entry that only one gives
    filled in on the other with the model's default (`zoo.registry.argument_default`), where it declares one: a run
    resumed with `model_kwargs.masks: true`, ICNN's default, builds the same model as its run without it. Also
    returns what was filled in, {"held" / "given": {key: default}}: the model's default today, which a checkpoint
    written before the entry existed (or before its default changed) did not necessarily train with, so an error
    says it as a default, not as the checkpoint's."""
    import inspect

    from zoo.registry import argument_default

    filled: dict[str, dict[str, Any]] = {"held": {}, "given": {}}
    if held is None or given is None:
        return held, given, filled
    held, given = dict(held), dict(given)
    name = given.get("model.init_args.model_name") or held.get("model.init_args.model_name")
    prefix = "model.init_args.model_kwargs."
    for key in {k for k in [*held, *given] if k.startswith(prefix) and (k in held) != (k in given)}:
        try:
            default = argument_default(str(name), key.removeprefix(prefix))
        except ValueError:  # an unknown model name: the settings check says what differs
            continue
        if default is not inspect.Parameter.empty:
            side = "given" if key in held else "held"
            (given if side == "given" else held)[key] = filled[side][key] = default
    return held, given, filled


def drop_instantiator(datamodule: Any) -> None:
    """Leave LightningCLI's internal `_instantiator` out of what a datamodule's loggers record (its
    `hparams_initial`: TensorBoard's HPARAMS showed it as a column); its checkpoint hyperparameters keep it. A
    System leaves it out of its own (`ZooSystem.logged_hparams`)."""
    logged = getattr(datamodule, "_hparams_initial", None)
    if logged is not None and hasattr(logged, "pop"):
        logged.pop("_instantiator", None)


def remember_model_settings(cli: LightningCLI) -> None:
    """Give a CLI's System its model settings as given (`zoo.weights.model_settings`), which it writes into every
    checkpoint (`ZooSystem.on_save_checkpoint`) for a resumed fit to be held to."""
    settings = getattr(cli, "given_model_settings", None)
    if settings is not None and hasattr(cli.model, "model_settings"):
        cli.model.model_settings = settings


def run_config_hint(ckpt_path: str, settings: str = "data") -> str:
    """What to run instead of a config whose `settings` ("data", "model") do not fit checkpoint `ckpt_path`: its
    run's config.yaml (a run folder's checkpoints are in <run>/checkpoints/)."""
    path = Path(ckpt_path)
    config = path.parent.parent / "config.yaml" if path.parent.name == "checkpoints" else None
    return (f"Use the config it was trained with: --config {config}" if config is not None and config.is_file() else
            "Use the config it was trained with: --config <the run folder>/config.yaml") + \
        f" (its {settings} settings)."


class ReadableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader with a clear error: a file it cannot read (cut short by a full disk or an
    interrupted copy) raises a CheckpointError naming the file and what to do. `--ckpt_path last` / `best` are
    resolved to a file inside Lightning, after the CLI has checked any path given by name, so this is where such a
    file is first read."""

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        from zoo.weights import CheckpointError

        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # noqa: BLE001 - every reader error means the same thing to the user
            raise CheckpointError(f"Could not read checkpoint {str(path)!r} ({type(err).__name__}: {err}). Resume from "
                                  "another checkpoint of the run (--ckpt_path <run>/checkpoints/best-*.ckpt) or "
                                  "start the run again.") from err


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: any LightningModule/DataModule by class_path, the datamodule's
    `num_classes`, `num_channels`, `image_size` and `class_names` linked into the model, a best+last
    ModelCheckpoint, seed 0. Also: `*_kwargs` mappings given on the command line merge with the config's; a
    datamodule's `mean: pretrained` takes the model's backbone's pretrained mean/std; `predict` writes
    predictions.csv and explanation pictures (`zoo.cli.predict.PredictionWriter`) unless another writer is set."""

    restores_checkpoint = False  # whether the command's --ckpt_path replaces every weight (`instantiate_classes`)
    checkpoint_file: str | None = None  # the file it names (`last` resolved), where it is one
    checkpoint_hparams: dict[str, Any] | None = None  # its model's and datamodule's hyperparameters, once read
    given_model_settings: dict[str, Any] | None = None  # the model settings as given (`zoo.weights.model_settings`)
    command_args: list[str] = []  # the arguments as given (sys.argv[1:] or `args`): `ckpt_path_reset_by_config`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", ZooArgumentParser)  # short errors with a did-you-mean (zoo.cli.errors)
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
        from zoo.weights import DATA_LINKS

        for source, target in DATA_LINKS.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse with `*_kwargs` mappings from the command line merged into the config's (`merge_kwargs_options`)."""
        self.command_args = [str(arg) for arg in (sys.argv[1:] if args is None else args if isinstance(args, list)
                                                  else [])]
        if args is None:  # from the command line (Lightning warns when given both argv and args)
            self.config = parser.parse_args(merge_kwargs_options(sys.argv[1:]))
        else:
            super().parse_arguments(parser, merge_kwargs_options(list(args)) if isinstance(args, list) else args)
        restore_null_kwargs(self.config)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        """With `enable_progress_bar: false` the zoo's RichProgressBar (the `progress_bar` options) is left out:
        Lightning refuses a progress bar callback that the Trainer is told not to show."""
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """`predict` gets the zoo's PredictionWriter unless the config names a prediction writer; the default
        checkpoint reader is `ReadableCheckpointIO`. Only training
        writes the run's config.yaml: validate, test and predict of a run leave the config that trained it, which
        every command then takes back (their own options, such as validate's `verbose`, would make fit refuse it).
        validate and test log to TensorBoard in <run>/validate, <run>/test (`log_evaluation_apart`). A run folder at
        or below a file is refused here, before anything is written (`zoo.cli.runs.check_run_folders`)."""
        from zoo.cli.runs import check_run_folders

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a plugin the config chose
            trainer.strategy.checkpoint_io = ReadableCheckpointIO()
        if self.subcommand in ("validate", "test", "predict"):  # fit, and compare / ablate runs, write it
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
        if self.subcommand in EVALUATION_LOGS:  # TensorBoard: <run>/validate, not points at step 0 of the fit's curves
            log_evaluation_apart(trainer, self.subcommand)
        if self.subcommand == "fit" and trainer.logger is None and not trainer.fast_dev_run:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"--trainer.logger=false: this run has no run folder of its own; its checkpoints go to "
                           f"{Path(trainer.default_root_dir) / 'checkpoints'}, which every run without a logger "
                           "shares (a later one overwrites last.ckpt, and `--ckpt_path last` there may be another "
                           "run's). Keep the logger (it names the run folder) to keep this run's checkpoints.")
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            from zoo.cli.predict import PredictionWriter

            trainer.callbacks.append(PredictionWriter())
        check_run_folders(trainer)  # a save_dir that is a file: said now, not as makedirs' traceback mid-run
        return trainer

    def instantiate_classes(self) -> None:
        """A class refusing its arguments (a data folder that does not exist) raises its own error, marked as a
        configuration error, instead of jsonargparse's wrapper that repeats it inside a union-type message. Then a
        datamodule's `mean: pretrained` is resolved with the model's backbone (its pretrained mean and std), and a
        backbone loaded from a weight file fed unnormalised images is warned about (`warn_unnormalised_pretrained`).

        A checkpoint that replaces every weight (`--ckpt_path FILE`, or `last` where a last checkpoint exists) is
        restored into models built inside `checkpoint_replaces_weights`: the files that only give starting weights
        (a backbone's pretrained_path, a textual stage-1 init_checkpoint) are not read, so a run resumes after they
        have moved. Lightning resolves `last` with the Trainer, which is built after the model: the classes are built
        as for a checkpoint, and built again, from the same random state, where `last` finds none (a fit starts
        afresh, from its starting weights).

        validate / test / predict restoring no checkpoint are refused (`refuse_untrained_evaluation`: they scored and
        predicted with random weights, exit 0), but for a model that starts from weights of its own
        (`starts_from_weights`: an exported or pretrained model evaluated as built); a `last` that finds none is
        refused whatever the model."""
        from zoo.cli.errors import mark
        from zoo.weights import checkpoint_replaces_weights

        _, ckpt_path = self._subcommand_and_ckpt_path()
        reset = ckpt_path_reset_by_config(self.command_args)
        if reset is not None and self.subcommand == "fit" and ckpt_path is None:
            why, give = reset_ckpt_path_words(*reset, ckpt_path)  # (an evaluation of none: refuse_untrained_evaluation)
            raise mark(ValueError(f"fit: {why}, so the fit would start afresh and move the earlier run to stale/. "
                                  f"Give {give}."))
        if str(ckpt_path) != "last":
            self.restores_checkpoint = bool(ckpt_path) and Path(str(ckpt_path)).is_file()
            self.checkpoint_file = str(ckpt_path) if self.restores_checkpoint else None
            self._instantiate(checkpoint_replaces_weights() if self.restores_checkpoint else nullcontext())
            self.refuse_replaced_ckpt_path(reset)
        else:
            random_state = _collect_rng_states(include_cuda=torch.cuda.is_initialized())  # never starts CUDA
            self._instantiate(checkpoint_replaces_weights())
            self.checkpoint_file = last_checkpoint(self.trainer, self.subcommand)
            self.restores_checkpoint = self.checkpoint_file is not None
            self.refuse_replaced_ckpt_path(reset)  # before the checkpoint is read
            if not self.restores_checkpoint and self.subcommand in EVALUATIONS:
                self.refuse_untrained_evaluation("last")
            if not self.restores_checkpoint:
                _set_rng_states(random_state)
                self._instantiate(nullcontext())
            elif self.subcommand in EVALUATIONS:  # the checkpoint's settings, as for --ckpt_path FILE
                self.take_settings_of(self.checkpoint_file)
                _set_rng_states(random_state)
                self._instantiate(checkpoint_replaces_weights())
        if self.subcommand in ("fit", None):  # None: a compare run's or ablate point's CLI (run=False)
            self.refuse_settings_the_data_replaces()
        if self.subcommand in EVALUATIONS and str(ckpt_path) == "best":
            self.refuse_best_outside_fit()
        if self.subcommand in EVALUATIONS and ckpt_path is None and not self.starts_from_weights():
            self.refuse_untrained_evaluation(None)
        if self.subcommand in ("fit", "validate", "test", "predict") and self.checkpoint_file is not None:
            with configuration_phase():  # fit: a resumed run would go on learning from other inputs
                self.check_data_fits_checkpoint(self.checkpoint_file)
                if self.subcommand == "fit":  # ... or with another loss, optimiser or System setting
                    self.check_settings_fit_checkpoint(self.checkpoint_file)
        remember_model_settings(self)
        warn_unnormalised_pretrained(self.model, self.datamodule)

    def refuse_best_outside_fit(self) -> None:
        """`--ckpt_path best` outside fit, refused in one line (a configuration error) naming the run's best-*.ckpt
        files to give instead: Lightning's `best` is the best checkpoint of the fit running in the same process, so
        validate / test / predict found none ("ModelCheckpoint is not configured to save the best model", with a
        traceback, though it is)."""
        from zoo.cli.errors import mark

        checkpoints = self.checkpoints_folder()
        found = self.run_checkpoints("best-*.ckpt")
        files = (f"this run's: {', '.join(str(p) for p in found)}" if found else
                 f"{checkpoints} holds no best-*.ckpt" if checkpoints is not None else "this run has no run folder")
        raise mark(ValueError(f"{self.subcommand} --ckpt_path best: `best` is the best checkpoint of a fit running "
                              f"in the same process, so it names none outside fit. Give the file, "
                              f"--ckpt_path <run>/checkpoints/best-*.ckpt ({files})."))

    def checkpoints_folder(self) -> Path | None:
        """Where this run's checkpoints are, as Lightning's ModelCheckpoint places them: the config's
        `checkpoint.dirpath`, else <run folder>/checkpoints, else, without a logger, <default_root_dir>/checkpoints;
        None with a logger of another kind (its folder is not known here)."""
        from zoo.engine.callbacks import logger_folder

        dirpath = self.config[self.subcommand].get("checkpoint", {}).get("dirpath")
        if dirpath:
            return Path(dirpath)
        if self.trainer.logger is None:
            return Path(self.trainer.default_root_dir) / "checkpoints"
        folder = logger_folder(self.trainer.logger)
        return folder / "checkpoints" if folder is not None else None

    def run_checkpoints(self, pattern: str = "*.ckpt") -> list[Path]:
        """This run's checkpoint files matching `pattern` (`checkpoints_folder`), oldest first; [] without one."""
        checkpoints = self.checkpoints_folder()
        return sorted(checkpoints.glob(pattern), key=lambda p: p.stat().st_mtime) if checkpoints else []

    def starts_from_weights(self) -> bool:
        """Whether the model as built holds weights of its own, which validate / test / predict may evaluate without
        a checkpoint: a weight file it starts from (`STARTING_WEIGHTS`: a backbone's or an export's pretrained_path,
        a textual stage-1 init_checkpoint), as the settings give it, in a run that has trained no checkpoint of its
        own. A run that holds checkpoints was trained from that file: its config evaluated the file's weights (a
        backbone's, with a random head) in place of the run's, silently."""
        settings = self.given_model_settings or {}
        return any(settings.get(key) not in (None, "") for key in STARTING_WEIGHTS) and not self.run_checkpoints()

    def refuse_untrained_evaluation(self, ckpt_path: str | None) -> None:
        """validate / test / predict that restore no checkpoint (none given, or a `last` that finds none: a mistyped
        run name), refused in one paragraph (a configuration error) before anything runs or is written: they ran the
        model as built, its random weights, and wrote untrained metrics and predictions into the run folder, exit 0
        (predict first removed the run's earlier predictions). Names the run's checkpoint files and how to give one;
        a model given starting weights (`starts_from_weights`) is evaluated as built without a checkpoint."""
        from zoo.cli.errors import mark

        checkpoints, found = self.checkpoints_folder(), self.run_checkpoints()
        ignored_last = ckpt_path == "last" and bool(self.trainer.fast_dev_run)  # Lightning resolves no `last` there
        if ignored_last:  # the file may well be there
            files = ""
        elif found:
            files = f"This run's checkpoints: {', '.join(str(p) for p in found)}."
        elif checkpoints is not None and self.trainer.logger is None:
            files = f"{checkpoints} (where the runs without a logger keep theirs) holds no checkpoint."
        elif checkpoints is not None:
            runs = checkpoints.parent.parent  # <save_dir>: the other runs' folders
            others = sorted({p.parent.parent.name for p in runs.glob("*/checkpoints/*.ckpt")})
            files = f"{checkpoints} holds no checkpoint: " + (
                f"runs beside it that hold some: {', '.join(others[:8])}{' ...' if len(others) > 8 else ''} "
                f"(--config {runs}/<run>/config.yaml)." if others else
                "is the run's name right (--trainer.logger.init_args.name)?")
        else:
            files = "This run's logger names no run folder: give the checkpoint's file."
        if ignored_last:
            why, give = ("fast_dev_run resolves no `--ckpt_path last`", "the file, --ckpt_path <run>/checkpoints/"
                                                                         "last.ckpt")
        elif ckpt_path == "last":
            why, give = ("`last` finds no last.ckpt", "--ckpt_path <run>/checkpoints/FILE.ckpt of a run that holds one")
        elif (reset := ckpt_path_reset_by_config(self.command_args)) is not None:  # the config's null, read after it
            why, give = reset_ckpt_path_words(*reset)
        else:
            why, give = ("no --ckpt_path is given", "--ckpt_path <run>/checkpoints/FILE.ckpt, or --ckpt_path last (the "
                                                    "run's last.ckpt)")
        raise mark(ValueError(
            f"{self.subcommand}: {why}, so the model would be {EVALUATION_VERBS[self.subcommand]} with untrained "
            f"weights (random, or the file it started from). Give the checkpoint to evaluate: {give}. "
            f"{files}{' ' if files else ''}A model that starts from weights of its own "
            f"(--model.init_args.model_kwargs.pretrained_path=FILE, a textual init_checkpoint) is evaluated as built "
            f"without --ckpt_path, unless its run holds checkpoints."))

    def refuse_replaced_ckpt_path(self, reset: tuple[str, list[str]] | None) -> None:
        """Refuse a command whose `--ckpt_path` a later config replaced (`reset`: `ckpt_path_reset_by_config`) with
        another checkpoint than the one given (a resumed run's config.yaml holds the `last` or file it resumed from:
        `validate --ckpt_path <run>/checkpoints/best-*.ckpt --config <run>/config.yaml` validated last.ckpt, a fit
        resumed another file, silently). Replaced by null: the fit's refusal above, an evaluation's
        `refuse_untrained_evaluation`."""
        from zoo.cli.errors import mark

        ckpt_path = self._subcommand_and_ckpt_path()[1]
        if reset is None or ckpt_path is None or self.restores_same_checkpoint(reset[0]):
            return
        why, give = reset_ckpt_path_words(*reset, ckpt_path)
        raise mark(ValueError(f"{self.subcommand}: {why}, so the {self.subcommand} would restore {ckpt_path} instead. "
                              f"Give {give}."))

    def restores_same_checkpoint(self, given: str) -> bool:
        """Whether `given` (the `--ckpt_path` a later config replaced) names the checkpoint this command restores
        (`checkpoint_file`, `last` resolved): a resumed run's config.yaml holds the `last` or file it resumed from,
        which may name the same file otherwise written (relative, absolute, `last`). Keywords Lightning resolves
        elsewhere (`best`, `hpc`, `registry:...`) are compared as written."""
        parsed = str(self._subcommand_and_ckpt_path()[1])
        if parsed == given:
            return True
        if any(text in ("best", "hpc") or text.startswith("registry") for text in (parsed, given)):
            return False
        file = last_checkpoint(self.trainer, self.subcommand) if given == "last" else given
        return (file is not None and self.checkpoint_file is not None
                and Path(file).resolve() == Path(self.checkpoint_file).resolve())

    def refuse_settings_the_data_replaces(self) -> None:
        """A fit (a compare run's, an ablate point's) given a model setting that the data sets
        (`zoo.weights.DATA_LINKS`: num_classes, in_chans, image_size, data_inputs, class_names) with another value
        than the data's is refused, naming both: the link replaced it silently (`--model.init_args.num_classes=10`
        trained the data's 6 classes; an ablate grid over it trained one setting as several rows). A value equal to
        the data's, or one not given (`given_explicitly`: the parser's default), is not said."""
        from zoo.cli.errors import mark
        from zoo.weights import DATA_LINKS, _same_setting

        parsed = self.config[self.subcommand] if self.subcommand else self.config
        init_args = parsed["model"].get("init_args") or {}
        hparams = getattr(self.model, "hparams", {})
        for source, target in DATA_LINKS.items():
            key = f"model.init_args.{target}"
            given = init_args.get(target)
            if given is None or target not in hparams or not given_explicitly(key, self.command_args):
                continue
            if not _same_setting(key, hparams[target], given):
                command = f"{self.subcommand}: " if self.subcommand else ""  # compare / ablate name the run
                raise mark(ValueError(
                    f"{command}--{key}={_as_option(given)} would be ignored: the model's {target} "
                    f"comes from the data (its datamodule's {source}: {_as_option(hparams[target])}). Give the data "
                    f"setting that decides it (such as --data.init_args.{source}, where the datamodule takes one), or "
                    f"drop the option."))

    def take_settings_of(self, path: str) -> None:
        """validate / test / predict with `--ckpt_path last`, resolved to `path`: the model settings are taken from
        the checkpoint's hyperparameters and checked as for `--ckpt_path FILE` (`_parse_ckpt_path`: another model
        refused by name, the System's `EVALUATION_FREE` settings kept only where given, others given warned about),
        where Lightning copies none for `last` (a textual run trained with max_len 6 decoded with the config's 18,
        silently; a size left out of the config ended in load_state_dict's size mismatch). The command's ckpt_path
        stays `last` (Lightning resolves it to the same file)."""
        section = self.config[self.subcommand]
        section["ckpt_path"] = path
        try:
            self._parse_ckpt_path()
        finally:
            self.config[self.subcommand]["ckpt_path"] = "last"  # _parse_ckpt_path may replace the section
        vars(self).pop("config_dump", None)  # Lightning's instantiator gives the model hparams of its dump, once made

    def check_data_fits_checkpoint(self, path: str) -> None:
        """validate / test / predict of checkpoint `path`, or a fit resumed from it, with data that gives its model
        other inputs than it was trained on are refused, and a fit resumed with any other data setting but those
        `zoo.weights.DATA_RESUME_FREE` names, naming the setting and both values (Lightning copies the
        checkpoint's model hyperparameters over the config, but the data's, and the class names and image size the
        CLI links from the data, are this run's): an `INPUT_SETTINGS` value of the checkpoint's saved datamodule
        (normalisation, image size, ...; `mean: pretrained` resolved with the model's backbone, as in training), the
        class names in class-id order, and the image size a model is built for (ICNN). Without a saved datamodule (a
        model trained from Python without one) only the model's are compared."""
        from zoo.registry import check_same_model
        from zoo.weights import (MODEL_KEYS, check_class_names, check_data_fit_resumes, check_data_fits_checkpoint,
                                 model_spec, read_checkpoint)

        held = self.checkpoint_hparams if self.checkpoint_hparams is not None else saved_hparams(read_checkpoint(path))
        saved, data = held["hyper_parameters"], held["datamodule_hyper_parameters"]
        source, hint = f"--ckpt_path {path!r}", run_config_hint(path)
        if data:
            data, given = self.saved_data_settings(data, saved), self.data_settings()
            check_data_fits_checkpoint(data, given, source, hint)
        hparams = getattr(self.model, "hparams", {})
        if "model_name" in saved:
            # every constructor input: a series' channel count is in data_inputs, not in_chans (`built_in_chans`)
            check_same_model(model_spec(saved), {k: hparams.get(k) for k in MODEL_KEYS}, source)
        check_class_names(saved.get("class_names"), hparams.get("class_names"), source,
                          "Give it data of those classes, in that order (their class ids).",
                          renumbered=type(self.datamodule).__name__ == "CUB200DataModule")  # CUB's old "0".."C-1"
        if data and self.subcommand == "fit":  # a resumed fit goes on with the same samples in the same batches
            check_data_fit_resumes(data, given, source, hint)

    def check_settings_fit_checkpoint(self, path: str) -> None:
        """A fit resumed from checkpoint `path` (a file or `last`) with other model settings than its run was
        trained with (another learning rate, loss weight, stage list, ...) is refused, naming each
        (`zoo.weights.check_settings_fit_checkpoint`; the settings as given, before Lightning puts the checkpoint's
        hyperparameters over them)."""
        from zoo.weights import SETTINGS_KEY, check_settings_fit_checkpoint, read_checkpoint

        held = self.checkpoint_hparams if self.checkpoint_hparams is not None else saved_hparams(read_checkpoint(path))
        saved, given, defaulted = with_model_defaults(held.get(SETTINGS_KEY), self.given_model_settings)
        check_settings_fit_checkpoint(saved, given, f"--ckpt_path {path!r}", run_config_hint(path, "model"),
                                      defaulted)

    def saved_data_settings(self, data: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's datamodule hyperparameters with `mean: pretrained` resolved as training resolved it, with
        the model's backbone (`zoo.weights.resolved_normalization`)."""
        from zoo.weights import built_in_chans, resolved_normalization

        backbone = image_backbone(self.model)
        return resolved_normalization(data, getattr(backbone, "name", None), built_in_chans(saved))

    def data_settings(self) -> dict[str, Any]:
        """This run's datamodule's settings (its saved init arguments), its mean and std as it normalises."""
        settings = dict(getattr(self.datamodule, "hparams", None) or {})
        for key in ("mean", "std"):
            if hasattr(self.datamodule, key):
                settings[key] = getattr(self.datamodule, key)
        return settings

    def _instantiate(self, weights: AbstractContextManager) -> None:
        """LightningCLI's model, data and trainer, built inside `weights` (a `checkpoint_replaces_weights` or not)."""
        with configuration_phase(), weights:
            super().instantiate_classes()
            self.resolve_pretrained_mean()
        drop_instantiator(self.datamodule)

    def resolve_pretrained_mean(self) -> None:
        """A datamodule's `mean: pretrained` resolved with the model's backbone (a backbone without a timm config:
        said once)."""
        if getattr(self.datamodule, "mean", None) == "pretrained":
            self.datamodule.use_pretrained_normalization(backbone_name(self.model))

    def _subcommand_and_ckpt_path(self) -> tuple[str | None, Any]:
        subcommand = self.config.get("subcommand")
        return subcommand, self.config[subcommand].get("ckpt_path") if subcommand else None

    def before_fit(self) -> None:
        """Auxiliary models (L2X's black box, the textual sentence classifier) are trained before the fit is
        launched, so a distributed run trains them with its own strategy; a resumed fit takes them from its checkpoint
        (`prepare_fit_auxiliaries`). First, a fit that restores no checkpoint moves an earlier run out of its run
        folder (`zoo.cli.runs.move_earlier_run`: to <parent>/stale/, its auxiliary/ cache kept), so the folder holds
        this run's checkpoints, curves and pictures only. Before anything moves, `zoo.cli.preflight.preflight` checks
        the optimiser's values, the stages' loss terms and the monitors (they failed epochs into the fit)."""
        from zoo.cli.preflight import preflight
        from zoo.cli.runs import move_earlier_run

        preflight(self.model, self.trainer.callbacks, self.datamodule)  # before the earlier run moves to stale/
        if not self.restores_checkpoint:
            refuse_empty_budget(self.trainer)
        move_earlier_run(self.trainer, "fit", self.restores_checkpoint, self.config["fit"].as_dict())
        prepare_fit_auxiliaries(self.model, self.trainer, self.datamodule, self.restores_checkpoint)

    def _parse_ckpt_path(self) -> None:
        """Lightning copies a `--ckpt_path` checkpoint's hyperparameters over the config; refuse first, naming both,
        a checkpoint of another System or model (else the run would silently rebuild the checkpoint's model and
        pair it with this config's loss). Then put back the settings as given that the command may change: a
        resumed fit's `zoo.weights.resume_free` ones; validate / test / predict's those too and the System's
        `EVALUATION_FREE` ones (decoding options: the textual `max_len`) where the user gives them
        (`given_explicitly`: on the command line or in a --config file; a parser default, such as the family
        config's unset max_len 18, replaced the checkpoint's 6 silently), as `load_from_checkpoint(path,
        max_len=4)` honours them. Any other setting of the model given for validate / test / predict that the
        checkpoint's replaced is warned about (`warn_ignored_settings`), where it was dropped silently."""
        from zoo.weights import model_settings, resume_free

        subcommand, ckpt_path = self._subcommand_and_ckpt_path()
        parsed = self.config[subcommand] if subcommand else self.config
        self.given_model_settings = model_settings(parsed.get("model"))
        if ckpt_path and str(ckpt_path) not in CKPT_PATH_KEYWORDS and not str(ckpt_path).startswith("registry"):
            from zoo.weights import check_config_fits_checkpoint, read_checkpoint

            with configuration_phase():  # a missing file or folder is named here, not by Lightning's traceback
                checkpoint = read_checkpoint(ckpt_path)
                check_config_fits_checkpoint(self.config[subcommand].get("model"), checkpoint,
                                             f"--ckpt_path {ckpt_path!r}", resuming=subcommand == "fit",
                                             hint=None if subcommand == "fit" else run_config_hint(ckpt_path, "model"))
            self.checkpoint_hparams = saved_hparams(checkpoint)  # for `check_data_fits_checkpoint`: read once
        super()._parse_ckpt_path()
        if self.checkpoint_hparams is None or self.given_model_settings is None:
            return
        model = self.config[subcommand].get("model")
        if subcommand == "fit":
            self.keep_given_settings(model, resume_free)
        elif subcommand in EVALUATIONS:
            self.keep_given_settings(model, evaluation_free(model, self.command_args))
            self.warn_ignored_settings(subcommand, model, evaluation_free(model))

    def keep_given_settings(self, model: Any, free: Callable[[str], bool]) -> None:
        """The model settings the command may change (`free` of their dotted key: for a resumed fit
        `zoo.weights.resume_free`, torch.compile, the non-finite loss policy, to skip the batch a run died on, and the
        files that only give starting weights or helpers, which may have moved; for an evaluation `evaluation_free`)
        as this run gives them, not as Lightning copied them from the `--ckpt_path` file's hyperparameters
        (`--ckpt_path last` copies none). A `model_kwargs` entry that recorded the checkpoint's value of a System
        argument put back (the textual model's `max_len`) follows it."""
        init_args = getattr(model, "init_args", None)
        prefix = "model.init_args."
        for key, value in self.given_model_settings.items():
            if init_args is None or not key.startswith(prefix) or not free(key):
                continue
            *parents, leaf = key.removeprefix(prefix).split(".")  # model_kwargs.pretrained_path: a dict entry
            holder = init_args
            for parent in parents:  # through Namespaces and plain dicts alike
                holder = holder.get(parent) if hasattr(holder, "get") else None
            if holder is None or not hasattr(holder, "__setitem__"):
                continue
            recorded = init_args.get("model_kwargs") if not parents else None
            if hasattr(recorded, "__setitem__") and leaf in recorded and recorded[leaf] == holder.get(leaf):
                recorded[leaf] = value  # the checkpoint's copy of the argument, not a size of the user's
            holder[leaf] = value

    def warn_ignored_settings(self, subcommand: str, model: Any, free: Callable[[str], bool]) -> None:
        """One warning naming each setting of the model this validate / test / predict gives (the config's or the
        command line's, as `given_explicitly` tells: a family config's unset hidden, the parser's default 256, is
        not said) whose value the `--ckpt_path` checkpoint's hyperparameters replaced: "--model.init_args
        .hidden=16 is ignored: the checkpoint's 64 is used", and each `model_kwargs` entry given that the
        checkpoint's model_kwargs lack (Lightning's copy replaces the whole mapping), unless it is the model's
        default. Only settings that decide the model evaluated are said (`ignored_model_settings` gives the rule):
        the others (helper epochs, the optimiser, scheduler, loss, stages) change nothing in an evaluation. Not
        said either: `free` ones (the System's `EVALUATION_FREE`: kept where given, else the checkpoint's), unset
        ones (None: the checkpoint's fills them), the ones the data links (`zoo.weights.DATA_LINKS`: the data checks
        compare them) and the model's name (`check_config_fits_checkpoint` refuses another)."""
        from pytorch_lightning.utilities import rank_zero_warn

        from zoo.weights import model_settings, resolve_class

        system = resolve_class(str(model.get("class_path")))
        given = {key: value for key, value in (self.given_model_settings or {}).items()
                 if given_explicitly(key, self.command_args)}  # not a parser default the user never gave
        ignored = ignored_model_settings(given, model_settings(model) or {}, system, free)
        if ignored:
            kept = ", ".join(getattr(system, "EVALUATION_FREE", ()))
            kept = f" ({system.__name__}'s {kept}, which change no weight, are taken where given)" if kept else ""
            rank_zero_warn(f"{subcommand} --ckpt_path: {'; '.join(ignored)}. The model is built with the "
                           f"checkpoint's hyperparameters, which its weights were trained with{kept}. Drop those "
                           f"options, or train a run with them.")


def ignored_model_settings(given: dict[str, Any], used: dict[str, Any], system: type | None,
                           free: Callable[[str], bool]) -> list[str]:
    """"--<key>=<given> is ignored: ..." for each setting of `given` (`zoo.weights.model_settings` as the command
    gave them) that the checkpoint's hyperparameters replaced in `used` (the same after Lightning's copy) and that
    decides the model evaluated (`system`: the System's class).

    The rule, one for every family: a setting decides the model evaluated when it is one the model is built from
    (`zoo.weights.MODEL_KEYS`, `model_spec`'s; `model_kwargs` entry by entry), a System argument the System passes
    to its model (which `build_model` records in the model's `model_kwargs`, so `used` holds it there: the
    textual `LINKED_ARGUMENTS`, hidden, max_len, ...), or one of the System's `RESUME_KEYS` (what its weights were
    trained to mean: CBM's mode). Any other System argument (helper models' epochs: textual `encoder_epochs`, L2X
    `black_box_epochs`; the optimiser, scheduler, loss and stages) only matters for training. Values are compared
    as written (`_same_setting`: 1 and 1.0; `model_kwargs` {} and None are the same empty mapping). A `model_kwargs`
    entry given that `used` lacks was dropped (Lightning's copy replaces the whole mapping): said unless it is the
    model's default (`zoo.registry.argument_default`), as the model is then built the same."""
    import inspect

    from zoo.registry import argument_default
    from zoo.weights import DATA_LINKS, IDENTITY_KEYS, MODEL_KEYS, _empty_kwargs, _same_setting

    prefix, kwargs_prefix = "model.init_args.", "model.init_args.model_kwargs."
    skipped = {f"{prefix}{key}" for key in (*DATA_LINKS.values(), *IDENTITY_KEYS)}
    resume_keys = set(getattr(system, "RESUME_KEYS", ()))

    def decides_model(key: str) -> bool:
        top = key.removeprefix(prefix).split(".", 1)[0]
        recorded = f"{kwargs_prefix}{top}"
        return key.startswith(prefix) and (top in MODEL_KEYS or top in resume_keys or any(
            other == recorded or other.startswith(recorded + ".") for other in used))

    out = []
    for key, value in given.items():
        if value is None or key in skipped or free(key) or not decides_model(key):
            continue
        if _empty_kwargs(key, given) and _empty_kwargs(key, used):  # {} and None: no entry either way
            continue
        if key in used:
            if not _same_setting(key, used[key], value):
                out.append(f"--{key}={_as_option(value)} is ignored: the checkpoint's {_as_option(used[key])} is used")
        elif key.startswith(kwargs_prefix):  # an entry the checkpoint's mapping lacks: dropped
            entry = key.removeprefix(kwargs_prefix)
            try:
                default = argument_default(str(used.get(f"{prefix}model_name")), entry)
            except ValueError:  # an unknown model name: its default is not known here
                default = inspect.Parameter.empty
            if default is inspect.Parameter.empty:
                out.append(f"--{key}={_as_option(value)} is ignored: the checkpoint's model_kwargs give no {entry}, "
                           f"so the model's default is used")
            elif not _same_setting(key, default, value):
                out.append(f"--{key}={_as_option(value)} is ignored: the checkpoint's model_kwargs give no {entry}, "
                           f"so the model's default {_as_option(default)} is used")
    return out


def evaluation_free(model: Any, args: list[str] | None = None) -> Callable[[str], bool]:
    """Whether validate / test / predict of a checkpoint may change model setting `key` (dotted) from the value the
    checkpoint was trained with: what a resumed fit may (`zoo.weights.resume_free`: files that only give starting
    weights, torch.compile, ...) and the System's own `EVALUATION_FREE` arguments (the textual `max_len`: a decoding
    length, no weight's shape), for the System class of `model` (the parsed model config). With `args` (the
    arguments as given: `ZooCLI.command_args`) an `EVALUATION_FREE` argument only where they give it
    (`given_explicitly`): else the parsed value is the parser's default (a family config that sets no max_len
    holds the class default 18), and the checkpoint's (the trained 6) stands."""
    from zoo.weights import resolve_class, resume_free

    system = resolve_class(str(model.get("class_path"))) if hasattr(model, "get") else None
    own = {f"model.init_args.{key}" for key in getattr(system, "EVALUATION_FREE", ())}
    if args is not None:
        own = {key for key in own if given_explicitly(key, args)}
    return lambda key: key in own or resume_free(key)


def given_explicitly(key: str, args: list[str]) -> bool:
    """Whether the arguments as given (`ZooCLI.command_args`) set model setting `key` ("model.init_args.max_len"),
    rather than leaving it at the parser's default: as an option (`--model.init_args.max_len=3`,
    `--model.init_args.max_len 3`, jsonargparse's `--model.max_len 3`; an entry in a mapping option,
    `--model.init_args.model_kwargs '{drop_rate: 0.1}'`), in a `--model` mapping (YAML text or file)
    or in a YAML file given with `--config` / `-c` that sets `model.init_args.max_len`. The files are read here for
    this question only (yaml.safe_load; the parser has read them already). A run's own config.yaml sets every
    setting: its values are the ones the run trained with."""
    rest = key.removeprefix("model.init_args.").split(".")
    # the option of the setting or of a mapping above it ({option: the keys below it}): --model.init_args.model_kwargs
    # '{drop_rate: 0.1}' gives model_kwargs.drop_rate
    options = {f"--model.{prefix}{'.'.join(rest[:k])}": rest[k:] for k in range(len(rest), 0, -1)
               for prefix in ("init_args.", "")} | {"--model.init_args": rest}
    for i, arg in enumerate(args):
        name, has_value, value = arg.partition("=")
        if name in options:
            below = options[name]
            if not below or _sets(_read_yaml(value if has_value else args[i + 1] if i + 1 < len(args) else ""),
                                  below):
                return True
            continue
        if name not in ("--config", "-c", "--model"):
            continue
        tree = _read_yaml(value if has_value else args[i + 1] if i + 1 < len(args) else "")
        model = tree.get("model") if name != "--model" and isinstance(tree, dict) else tree
        if isinstance(model, dict) and any(_sets(holder, rest) for holder in (model.get("init_args"), model)):
            return True
    return False


def _read_yaml(value: str) -> Any:
    """The YAML file `value` names, or `value` as YAML text (`--model '{init_args: {max_len: 3}}'`), parsed; None
    where it is neither (the parser has said so already)."""
    try:
        path = Path(value)
        return yaml.safe_load(path.read_text() if value and path.is_file() else value)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _sets(tree: Any, keys: list[str]) -> bool:
    """Whether nested mapping `tree` holds a value under the path `keys`."""
    for part in keys:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _as_option(value: Any) -> str:
    """A setting as the command line gives it: a list or mapping as YAML flow, anything else as it prints."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class ParsedCLI(ZooCLI):
    """A ZooCLI that parses its arguments only: nothing is seeded (LightningCLI seeds after parsing; a run seeds
    itself when it is built) or built. Subclasses build what they need in `instantiate_classes`."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def fit(cli: LightningCLI, ckpt_path: str | None = None) -> None:
    """`trainer.fit` of a CLI's model and data, its auxiliary models prepared first (with the run's strategy)."""
    restores = ckpt_path is not None and Path(ckpt_path).is_file()
    remember_model_settings(cli)
    prepare_fit_auxiliaries(cli.model, cli.trainer, cli.datamodule, restores)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
