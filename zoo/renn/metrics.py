"""Does a rule map fire where the ground-truth rule events are? Step-level precision and recall with a tolerance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def dilate(flags: torch.Tensor, tolerance: int) -> torch.Tensor:
    """(B, R, T) bool -> True within `tolerance` steps of a True."""
    if tolerance == 0:
        return flags
    return F.max_pool1d(flags.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0


def _rule_firing_update(rule_map: torch.Tensor, events: torch.Tensor, threshold: float, tolerance: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rule (R,): fired steps near a true event, fired steps, true events near a fired step, true events."""
    if rule_map.shape != events.shape:
        raise ValueError(f"rule_map {tuple(rule_map.shape)} and events {tuple(events.shape)} must match.")
    fired, truth = rule_map.detach() > threshold, events > 0.5  # (B, R, T)
    return ((fired & dilate(truth, tolerance)).sum((0, 2)).float(), fired.sum((0, 2)).float(),
            (truth & dilate(fired, tolerance)).sum((0, 2)).float(), truth.sum((0, 2)).float())


def _rule_firing_compute(fired_correct: torch.Tensor, fired: torch.Tensor, events_found: torch.Tensor,
                         events: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision and recall (R,) from the per-rule counts (summed over every batch and, under DDP, every rank before
    this division): precision NaN for a rule that never fired (it claimed nothing, so there is nothing to score; 1
    rated a map that fires nowhere, an untrained model's, as perfect), recall NaN for a rule without true events."""
    nan = torch.full_like(fired, float("nan"))
    return {"precision": torch.where(fired > 0, fired_correct / fired.clamp_min(1), nan),
            "recall": torch.where(events > 0, events_found / events.clamp_min(1), nan)}


class RuleFiring(Metric):
    """Per rule: precision = share of fired steps (map > threshold) within `tolerance` steps of a true event,
    recall = share of true event steps within `tolerance` steps of a fired step. `compute` -> {"precision": (R,),
    "recall": (R,)}; a rule that never fires has precision NaN (it claimed nothing: 1 would rate a rule map that
    fires nowhere, e.g. an untrained model's, as perfect), a rule without any true event has recall NaN (nothing to
    find: 0 would read as every event missed), and before any update both are NaN (nothing scored)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_rules: int, threshold: float = 0.5, tolerance: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold, self.tolerance = threshold, tolerance
        for name in ("fired_correct", "fired", "events_found", "events"):
            self.add_state(name, default=torch.zeros(num_rules), dist_reduce_fx="sum")  # (R,) counts

    def update(self, rule_map: torch.Tensor, events: torch.Tensor) -> None:
        counts = _rule_firing_update(rule_map, events, self.threshold, self.tolerance)
        self.fired_correct += counts[0]
        self.fired += counts[1]
        self.events_found += counts[2]
        self.events += counts[3]

    def compute(self) -> dict[str, torch.Tensor]:
        return _rule_firing_compute(self.fired_correct, self.fired, self.events_found, self.events)


class NamedRuleFiring(RuleFiring):
    """`RuleFiring` with scalar entries, for logging with `ZooSystem.add_metric(..., log_prefix=...)`: `compute` ->
    {"precision": mean over rules, "precision/<rule name>": that rule's, the same for "recall"}. The means leave out
    the rules whose value is NaN (a rule that never fired has no precision, a rule without true events no recall),
    as ConceptF1 leaves out undefined concepts; NaN when no rule has a value (a model that fires nowhere)."""

    def __init__(self, rule_names: Sequence[str], threshold: float = 0.5, tolerance: int = 2, **kwargs) -> None:
        super().__init__(len(rule_names), threshold, tolerance, **kwargs)
        self.rule_names = list(rule_names)

    def compute(self) -> dict[str, torch.Tensor]:
        named: dict[str, torch.Tensor] = {}
        for key, values in super().compute().items():  # values: (R,)
            named[key] = values.nanmean()
            named |= {f"{key}/{name}": value for name, value in zip(self.rule_names, values)}
        return named
