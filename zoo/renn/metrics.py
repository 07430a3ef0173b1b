"""Does a rule map fire where the ground-truth rule events are? Step-level precision and recall with a tolerance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def dilate(flags: torch.Tensor, tolerance: int) -> torch.Tensor:
    """(B, R, T) bool -> True within `tolerance` steps of a True."""
    if tolerance == 0:
        return flags
    return F.max_pool1d(flags.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0


class RuleFiring(Metric):
    """Per rule: precision = share of fired steps (map > threshold) within `tolerance` steps of a true event,
    recall = share of true event steps within `tolerance` steps of a fired step. `compute` -> {"precision": (R,),
    "recall": (R,)}; a rule that never fires has precision 1 (nothing wrong was claimed) and recall 0."""

    full_state_update = False

    def __init__(self, num_rules: int, threshold: float = 0.5, tolerance: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold, self.tolerance = threshold, tolerance
        for name in ("fired_correct", "fired", "events_found", "events"):
            self.add_state(name, default=torch.zeros(num_rules), dist_reduce_fx="sum")

    def update(self, rule_map: torch.Tensor, events: torch.Tensor) -> None:
        if rule_map.shape != events.shape:
            raise ValueError(f"rule_map {tuple(rule_map.shape)} and events {tuple(events.shape)} must match.")
        fired, truth = rule_map.detach() > self.threshold, events > 0.5  # (B, R, T)
        self.fired_correct += (fired & dilate(truth, self.tolerance)).sum((0, 2)).float()
        self.fired += fired.sum((0, 2)).float()
        self.events_found += (truth & dilate(fired, self.tolerance)).sum((0, 2)).float()
        self.events += truth.sum((0, 2)).float()

    def compute(self) -> dict[str, torch.Tensor]:
        precision = torch.where(self.fired > 0, self.fired_correct / self.fired.clamp_min(1), torch.ones_like(self.fired))
        return {"precision": precision, "recall": self.events_found / self.events.clamp_min(1)}
