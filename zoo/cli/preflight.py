"""Checks of a built run before anything trains or moves: `fit` (before an earlier run goes to stale/), every grid
point of `ablate` and every run of `compare` (before the first trains).

Some mistakes surface only inside training otherwise, after epochs or whole runs: a learning rate torch refuses
(`configure_optimizers` runs at the fit's start), a stage summing a loss term the loss does not give (KeyError at
that stage's first batch, epochs in, its run not resumable with the corrected stages), a checkpoint or
EarlyStopping `monitor` the System never logs (Lightning's MisconfigurationException after a whole epoch). Each is
raised here as a marked configuration error (`zoo.cli.errors.mark`): printed once, no traceback, exit status 2.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn

from zoo.checks import close_names
from zoo.cli.errors import mark
from zoo.cli.report import metric_directions

TERM = re.compile(r"""["'](loss_\w+)["']""")  # a loss term's name as the code writes it: "loss_task"
DYNAMIC_TERM = re.compile(r"""f["']loss_\{|["']loss_["']\s*\+""")  # a name the code builds: f"loss_{name}"
LOGGED = re.compile(r"""\.log\(\s*(f?)["']([^"']+)["']""")  # self.log("push/distance", ...), f"{stage}/x"
LOGGED_ANYHOW = re.compile(r"""\.log\(\s*(?!f?["'])""")  # self.log(name, ...): a name the code computes
PREFIX = re.compile(r"""log_prefix=["']([^"']+)["']""")  # add_metric(..., log_prefix="rule_"), in setup too
FRAMEWORK_PACKAGES = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics")  # no terms
KNOWN_PACKAGES = ("zoo", "losses", "torchvision", "timm")  # whose code names its loss terms as "loss_<term>"
OWN_LOGS = ("epoch", "step")  # what Lightning adds to the names a ModelCheckpoint may monitor
# What LearningRateMonitor writes into trainer.callback_metrics (its `_find_names_from_optimizers`): "lr-Adam",
# "lr-Adam-1" (a second Adam), "lr-Adam/backbone" (a named parameter group), "lr-Adam/pg1-momentum", ...
LR_MONITOR_LOGS = re.compile(r"(lr|momentum|weight_decay)-.+")
# a callback that sets trainer.callback_metrics itself: trainer.callback_metrics["val/x"] = ..., .update({...})
WRITES_METRICS = re.compile(r"""callback_metrics\s*(\[[^\]]*\]\s*=(?!=)|\.(update|setdefault)\()""")


def preflight(system: nn.Module, callbacks: Iterable[Any] = (), datamodule: Any = None) -> None:
    """Check `system` (a ZooSystem, built), the run's `callbacks` and its `datamodule` before anything trains: the
    System's settings against the data (`check_data_settings`, which its setup runs again: a CBM's concept count
    against CUB's attributes failed after the fit had moved the earlier run to stale/), its optimiser and scheduler
    built once and dropped (`check_optimizer`), every stage's `losses` terms its loss gives (`check_stage_losses`),
    every checkpoint and EarlyStopping `monitor` a name it logs (`check_monitors`)."""
    if datamodule is not None and hasattr(system, "check_data_settings"):  # what the datamodule tells when built
        system.check_data_settings(datamodule)
    check_optimizer(system)
    check_stage_losses(system)
    check_monitors(system, callbacks)


def is_users(cls: type) -> bool:
    """Whether `cls` is a user's class (defined outside the zoo's packages): its code is left to the run itself."""
    return cls.__module__.split(".")[0] != "zoo"


def check_optimizer(system: nn.Module) -> None:
    """Build the System's optimiser and scheduler as the fit will (`configure_optimizers`, which reads the model's
    parameters and hyperparameters, no trainer) and drop them: torch's refusal of a value (a negative learning rate,
    a scheduler argument) is said now, naming the options. Nothing of the System changes (a new optimiser holds
    the parameters, it does not change them). Only the zoo's own `configure_optimizers` (the optimizer and
    scheduler factories) is checked: a user's System may build its optimiser from layers it makes in `setup` /
    `configure_model`, which Lightning runs later (an AttributeError here, for a valid run)."""
    configure = getattr(system, "configure_optimizers", None)
    owner = next((cls for cls in type(system).__mro__ if "configure_optimizers" in vars(cls)), None)
    if configure is None or owner is None or is_users(owner):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            configure()
    except RuntimeError:  # one that needs the trainer (a System's own `configure_optimizers`): the fit says it
        return
    except (ValueError, TypeError, KeyError) as error:
        raise mark(ValueError(f"the optimizer or scheduler refuses its settings: {error} (model.init_args.optimizer, "
                              f"model.init_args.scheduler; checked before training, nothing trained or moved). Fix "
                              f"the value (e.g. --model.init_args.optimizer.init_args.lr=0.001).")) from None


@lru_cache(maxsize=None)
def _source(cls: type) -> str:
    """The source of the module that defines `cls` ("" where Python cannot read it)."""
    try:
        return inspect.getsource(inspect.getmodule(cls))
    except (OSError, TypeError):
        return ""


@lru_cache(maxsize=None)
def _class_source(cls: type) -> str:
    """The source of `cls` alone ("" where Python cannot read it): a callback's logs are in its methods."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def known_terms(system: nn.Module) -> set[str] | None:
    """The loss term names the System's loss and model can give: every "loss_<term>" the code of their classes
    writes (the loss's modules, the model's, torchvision's detectors, the System's own `compute_loss`). None where
    that cannot be told: a class of the user's (outside `KNOWN_PACKAGES`), a source that cannot be read, or one that
    builds a term's name (f"loss_{name}")."""
    names: set[str] = set()
    classes = {cls for module in system.modules() for cls in type(module).__mro__
               if issubclass(cls, nn.Module) and cls.__module__.split(".")[0] not in FRAMEWORK_PACKAGES}
    if any(cls.__module__.split(".")[0] not in KNOWN_PACKAGES for cls in classes):
        return None  # a user's loss or model may name its terms any way (a keyword, a constant, an argument)
    for cls in classes:
        source = _source(cls)
        if not source or DYNAMIC_TERM.search(source):
            return None
        names |= set(TERM.findall(source))
    return names or None


def check_stage_losses(system: nn.Module) -> None:
    """Every stage's `losses` against the terms the loss can give (`known_terms`), all stages at once, with the
    closest names: a stage naming a term no code gives would stop training at that stage's first batch."""
    schedule = getattr(system, "schedule", None)
    wanted = [(stage.name, term) for stage in getattr(schedule, "stages", []) for term in stage.losses or []]
    terms = known_terms(system) if wanted else None
    if terms is None:
        return
    unknown = [(stage, term) for stage, term in wanted if term not in terms]
    if unknown:
        raise mark(ValueError(unknown_terms_message(unknown, terms, type(system.loss).__name__)))


def unknown_terms_message(unknown: list[tuple[str, str]], terms: Iterable[str], loss: str) -> str:
    """"stage 'joint' sums 'loss_locl' (did you mean 'loss_local'?), ..." for each (stage, term) of `unknown`."""
    said = []
    for stage, term in unknown:
        close = close_names(term, sorted(terms), n=1, cutoff=0.6)
        said.append(f"stage {stage!r} sums {term!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"{'; '.join(said)}: neither {loss} nor the model gives such a term (the terms their code names: "
            f"{sorted(terms)}). Fix the stage's losses (model.init_args.stages); checked before training, nothing "
            f"trained or moved.")


def logged_names(system: nn.Module, callbacks: Iterable[Any] = ()) -> tuple[set[str], list[re.Pattern[str]]] | None:
    """What the System logs, as exact names and patterns: "<stage>/<metric>" for its metrics
    (`metric_directions`; a dict metric's entries "<stage>/<prefix>*"), "<stage>/loss*" (the sum, each term, their
    _step / _epoch forms), "schedule/*", what its family's code and the run's own callbacks log
    (`self.log("push/distance")`, "train/reward", a user's `pl_module.log("val/mine")`), Lightning's "epoch" /
    "step", and with a LearningRateMonitor its "lr-<Optimizer>..." names (`LR_MONITOR_LOGS`). None where that cannot
    be told: a System of the user's (metrics it adds in `setup`), code that logs a dict of names (`log_dict`) or a
    name it computes (`self.log(name, ...)`), a callback that writes `trainer.callback_metrics` itself, or a source
    that cannot be read."""
    exact, patterns = set(OWN_LOGS), [re.compile(r"(train|val|test)/loss.*"), re.compile(r"schedule/.*")]
    for stage in ("train", "val", "test"):
        for name in metric_directions(system, stage):
            if name.endswith("*"):
                patterns.append(re.compile(re.escape(f"{stage}/{name[:-1]}") + ".*"))
            else:
                exact.add(f"{stage}/{name}")
    from zoo.engine.system import ZooSystem

    own = [cls for cls in type(system).__mro__ if isinstance(cls, type) and issubclass(cls, ZooSystem)
           and cls is not ZooSystem]  # the engine's own logs are the ones above
    if any(is_users(cls) for cls in own):
        return None  # a user's System may add metrics in `setup` or log names its code computes
    callbacks = list(callbacks)
    if any(cls.__name__ == "LearningRateMonitor" for callback in callbacks for cls in type(callback).__mro__):
        patterns.append(LR_MONITOR_LOGS)  # pytorch_lightning's or lightning's: EarlyStopping may watch "lr-Adam"
    sources = [_source(cls) for cls in own]
    sources += [_class_source(cls) for callback in callbacks for cls in type(callback).__mro__
                if cls.__module__.split(".")[0] not in ("pytorch_lightning", "lightning", "builtins")]
    for source in sources:
        if not source or "log_dict(" in source or LOGGED_ANYHOW.search(source) or WRITES_METRICS.search(source):
            return None
        for f_string, name in LOGGED.findall(source):
            if f_string:  # f"{stage}/{x}": a pattern, each {...} any text
                patterns.append(re.compile(".*".join(re.escape(part) for part in re.split(r"\{[^}]*\}", name))))
            else:
                patterns.append(re.compile(re.escape(name) + r"(_step|_epoch)?"))
        patterns += [re.compile(r"(train|val|test)/" + re.escape(prefix) + ".*") for prefix in PREFIX.findall(
            source)]  # a dict metric some Systems add only in `setup`, once the data names its entries
    return exact, patterns


def monitored(callbacks: Iterable[Any]) -> list[tuple[str, str]]:
    """(what, monitor) of each ModelCheckpoint and strict EarlyStopping with a monitor (a non-strict EarlyStopping
    only warns where its monitor is missing)."""
    found = []
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(callback, ModelCheckpoint) and monitor:
            found.append(("the checkpoint's monitor (checkpoint.monitor)", monitor))
        elif isinstance(callback, EarlyStopping) and monitor and callback.strict:
            found.append(("EarlyStopping's monitor", monitor))
    return found


def check_monitors(system: nn.Module, callbacks: Iterable[Any]) -> None:
    """Every checkpoint and EarlyStopping `monitor` of `callbacks` is a name the System logs (`logged_names`), with
    the closest logged names: Lightning refuses a missing one only after the first epoch's validation."""
    watched = monitored(callbacks)
    if not watched:
        return
    names = logged_names(system, callbacks)
    if names is None:
        return
    exact, patterns = names
    for what, monitor in watched:
        if monitor in exact or any(pattern.fullmatch(monitor) for pattern in patterns):
            continue
        names = sorted(exact | {"val/loss", "train/loss"})
        close = close_names(monitor, names, n=1, cutoff=0.6)
        raise mark(ValueError(
            f"{what} is {monitor!r}, which {type(system).__name__} does not log"
            f"{f' (did you mean {close[0]!r}?)' if close else ''}; it logs {', '.join(names)}, "
            f"val/loss_<term>, train/loss_<term>. Give one of those (checked before training, nothing trained or "
            f"moved)."))


def cli_callbacks(cli: Any) -> list[Any]:
    """The callbacks a CLI's fit runs with: its trainer's, or for a CLI that built no trainer (`ablate`'s point
    checks) those its config builds (`checkpoint`, ..., and trainer.callbacks)."""
    trainer = getattr(cli, "trainer", None)
    if trainer is not None:
        return list(trainer.callbacks)
    config = cli.config_init[cli.subcommand] if getattr(cli, "subcommand", None) else cli.config_init
    own = [cli._get(cli.config_init, key) for key in cli._parser(cli.subcommand).callback_keys]
    given = config.get("trainer.callbacks") if hasattr(config, "get") else None
    return [*own, *(given or [])]


def check_no_print_config(command: str, config: str, extra: list[str]) -> None:
    """Refuse `--print_config` for compare and ablate: they build several runs, and LightningCLI printed the first
    one's config and exited with status 0, as if that were the whole command's."""
    if any(arg.split("=", 1)[0] == "--print_config" for arg in extra):
        runs = "a compare's runs" if command == "compare" else "an ablation's grid points"
        raise mark(ValueError(f"{command}: --print_config prints one run's config, but {runs} each have their own. "
                              f"Print a run's config with fit: python train.py fit --config <that run's config> "
                              f"[its options] --print_config (e.g. python train.py fit --config {config} "
                              f"--print_config)."))
