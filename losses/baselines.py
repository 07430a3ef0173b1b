"""The task term every classifier shares."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import check_fraction, check_weight


class ClassificationLoss(nn.Module):
    """Cross-entropy of ``out["logits"]`` against ``batch[target_key]`` (default "label"), returned as
    ``{"loss_task": ...}``."""

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0, target_key: str = "label") -> None:
        super().__init__()
        check_weight("ClassificationLoss", "weight", weight, "the task cross-entropy")
        check_fraction("ClassificationLoss", "label_smoothing", label_smoothing, "the share of each target's mass "
                       "spread uniformly over the classes (0: none)")
        self.label_smoothing = label_smoothing
        self.weight, self.target_key = weight, target_key

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out["logits"], batch[self.target_key], label_smoothing=self.label_smoothing)
        return {"loss_task": self.weight * ce}
