"""One mechanism for every training schedule, applied at each training epoch's start and logged as schedule/<name>.

- **Stages** (ReNN's local -> global -> joint, AOG's folding -> unfolding, a textual chain's relevance -> relevance
  + discriminative): each names the model submodules it trains, the loss terms it sums, a learning-rate scale and
  model attributes it sets (e.g. ``{or_mode: max}``). Frozen submodules get no update (requires_grad off) and stay
  in eval mode (BatchNorm statistics too).
- **Epoch schedules** (ICNN's lambda / (epoch + 1), rule distillation's pi_t): any module of the System (model or
  loss) with ``set_epoch(epoch) -> {name: value}`` is called and its values are logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from zoo.checks import close_names


@dataclass
class Stage:
    """One stage of training, `epochs` long; epochs past the last stage stay in the last stage.

    Args:
        name: logged as schedule/stage (its index) and shown in messages.
        epochs: how many epochs it lasts.
        train: submodules of the model it trains, each as the model was built (a backbone built with
            `freeze_backbone`, a fixed ICNN beta stay frozen, their BatchNorm statistics too); None: all, as built (a
            stage after one that froze some submodules trains them again).
        losses: loss terms it sums (None: all).
        lr_scale: multiplies every parameter group's learning rate.
        settings: model attributes set when the stage starts, e.g. ``{"or_mode": "max"}``.
    """

    name: str
    epochs: int = 1
    train: list[str] | None = None
    losses: list[str] | None = None
    lr_scale: float = 1.0
    settings: dict[str, Any] = field(default_factory=dict)


def stage_of(settings: dict[str, Any]) -> Stage:
    """A `Stage` from a config's mapping; a key it does not take (`epoch:` for `epochs:`) is refused with the
    closest key (`Stage(**settings)` said only "unexpected keyword argument 'epoch'")."""
    keys = [f.name for f in fields(Stage)]
    for key in settings:
        if key not in keys:
            close = close_names(str(key), keys, n=1, cutoff=0.6)
            raise ValueError(f"stage {settings.get('name', '?')!r} has no key {key!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; a stage's keys are {', '.join(keys)} (model.init_args.stages).")
    return Stage(**settings)


class Schedule:
    """The stages of a run (an empty list is one stage that trains everything with every term)."""

    def __init__(self, stages: list[dict[str, Any] | Stage] | None, model: nn.Module) -> None:
        self.stages = [s if isinstance(s, Stage) else stage_of(s) for s in (stages or [])] or [Stage("all")]
        children = [name for name, _ in model.named_children()]
        for stage in self.stages:
            unknown = set(stage.train or []) - set(children)
            if unknown:
                raise ValueError(f"stage {stage.name!r} trains {sorted(unknown)}, which {type(model).__name__} does "
                                 f"not have; it has {children}.")
            missing = [key for key in stage.settings if not hasattr(model, key)]
            if missing:
                raise ValueError(f"stage {stage.name!r} sets {missing}, which {type(model).__name__} does not have.")
        self.index = 0
        self._trainable: dict[str, bool] | None = None  # each parameter's requires_grad as built (`as_built`)

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1 or self.stages[0].train is not None or bool(self.stages[0].settings)

    @property
    def current(self) -> Stage:
        return self.stages[self.index]

    def stage_at(self, epoch: int) -> int:
        end = 0
        for index, stage in enumerate(self.stages):
            end += int(stage.epochs)
            if epoch < end:
                return index
        return len(self.stages) - 1

    def unreached(self, max_epochs: int | None) -> list[Stage]:
        """The stages a run of `max_epochs` epochs never enters (none when the budget is open: None or -1)."""
        if max_epochs is None or max_epochs < 0:
            return []
        starts = [sum(int(s.epochs) for s in self.stages[:i]) for i in range(len(self.stages))]
        return [stage for stage, start in zip(self.stages, starts) if start >= max_epochs]

    def start_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int,
                    schedulers: list[Any] = ()) -> dict[str, float]:
        """Enter the stage of `epoch`: trainable submodules, model settings, learning rates. Returns what to log.

        A learning-rate scale applies to the group's rate and to what `schedulers` (of `optimizer`) compute rates
        from: their `base_lrs` / `max_lrs` and the group's `initial_lr` / `max_lr` / `min_lr` (LambdaLR, OneCycleLR,
        CyclicLR, CosineAnnealingWarmRestarts recompute the rate from those every step, which undid the scale after
        the stage's first epoch)."""
        self.index = self.stage_at(epoch)
        stage = self.current
        trainable = self.as_built(model)
        if stage.train is not None:  # a stage trains what it names, of what the model was built to train: a
            # backbone built frozen (`freeze_backbone`), ICNN's fixed beta, ... stay frozen in a stage that names them
            for child, module in model.named_children():
                for name, parameter in module.named_parameters(prefix=child, remove_duplicate=False):
                    parameter.requires_grad_(child in stage.train and trainable.get(name, True))
        elif any(s.train is not None for s in self.stages):  # "all" after a stage that froze some: as built again
            for name, parameter in model.named_parameters(remove_duplicate=False):
                parameter.requires_grad_(trainable.get(name, True))
        for key, value in stage.settings.items():
            setattr(model, key, value)
        for group in optimizer.param_groups if optimizer is not None else []:
            # rescaled only when the scale changes, so an LR scheduler's decay is kept; the scale in force lives in
            # the param group, so it is saved with the optimiser and a run resumed inside a scaled stage knows it
            scale, applied = float(stage.lr_scale), group.get("lr_scale", 1.0)
            if scale != applied:
                scale_group_rates(optimizer, optimizer.param_groups.index(group), scale / applied, schedulers)
                group["lr_scale"] = scale
        return {"stage": float(self.index)} if len(self.stages) > 1 else {}

    def as_built(self, model: nn.Module) -> dict[str, bool]:
        """Each parameter's requires_grad as the model was built (by every name it has), read once, before any stage
        changed it: a resumed run's first epoch sees the same as the first run's."""
        if self._trainable is None:
            self._trainable = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
        return self._trainable

    def frozen(self, model: nn.Module) -> list[nn.Module]:
        """Submodules the current stage does not train, kept in eval mode (BatchNorm statistics too): those it does
        not name and those it names that the model was built with nothing to train (`freeze_backbone`)."""
        trained = self.current.train
        if trained is None:
            return []
        trainable = self.as_built(model)

        def built_frozen(child: str, module: nn.Module) -> bool:
            names = [name for name, _ in module.named_parameters(prefix=child, remove_duplicate=False)]
            return bool(names) and not any(trainable.get(name, True) for name in names)

        return [m for n, m in model.named_children() if n not in trained or built_frozen(n, m)]

    def select(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss terms summed in the current stage."""
        wanted = self.current.losses
        if wanted is None:
            return terms
        unknown = set(wanted) - set(terms)
        if unknown:
            close = {name: close_names(name, sorted(terms), n=1, cutoff=0.6) for name in sorted(unknown)}
            meant = [f"{name!r} -> {found[0]!r}" for name, found in close.items() if found]
            raise StageLossError(f"stage {self.current.name!r} sums {sorted(unknown)}, which the loss does not return; "
                                 f"it returns {sorted(terms)}" + (f" (did you mean {', '.join(meant)}?)" if meant
                                                                  else "") + ". Fix the stage's losses.")
        return {k: v for k, v in terms.items() if k in wanted}


class StageLossError(KeyError):
    """A stage sums a loss term the loss does not return: a configuration error (printed once, without a traceback,
    by train.py: it carries the mark of `zoo.cli.errors.mark`, set here by name since the engine imports nothing of
    the CLI). Its message is shown as given (a KeyError's str() quotes it)."""

    zoo_configuration_error = True

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def epoch_schedules(modules: dict[str, nn.Module], epoch: int) -> dict[str, float]:
    """Call ``set_epoch(epoch)`` on every module that has one, submodules included (a loss that wraps a scheduled
    loss: the inner one's schedule still runs), each once; the values they return, to be logged."""
    logged: dict[str, float] = {}
    seen: set[int] = set()
    for root in modules.values():
        for module in root.modules():
            if id(module) not in seen and callable(getattr(module, "set_epoch", None)):
                seen.add(id(module))
                logged |= {k: float(v) for k, v in (module.set_epoch(epoch) or {}).items()}
    return logged


def scale_group_rates(optimizer: torch.optim.Optimizer, index: int, factor: float, schedulers: Any = ()) -> None:
    """Multiply param group `index`'s learning rate by `factor`, with everything `schedulers` (of `optimizer`)
    compute its rate from: the group's `initial_lr` / `max_lr` / `min_lr` and their `base_lrs` / `max_lrs` entry
    (LambdaLR, OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts recompute the rate from those every step, and
    OneCycleLR / CyclicLR set every group's from one `max_lr` / `base_lr` as they are built: a scale of the rate
    alone was undone). The schedulers a SequentialLR / ChainedScheduler holds are scaled too. A stage's `lr_scale`
    and the System's `backbone_lr_scale` scale this way."""
    group = optimizer.param_groups[index]
    for key in ("lr", "initial_lr", "max_lr", "min_lr"):
        if isinstance(group.get(key), (int, float)):
            group[key] = group[key] * factor
    scaled: set[int] = set()  # a SequentialLR shares its _last_lr list with the scheduler it runs: scale it once
    for scheduler in schedulers:
        for each in [scheduler, *getattr(scheduler, "_schedulers", [])]:
            for name in ("base_lrs", "max_lrs", "_last_lr"):  # (_last_lr: what get_last_lr() says until a step)
                rates = getattr(each, name, None)
                ours = getattr(each, "optimizer", None) is optimizer and isinstance(rates, list)
                if ours and id(rates) not in scaled:
                    rates[index] = rates[index] * factor
                    scaled.add(id(rates))
