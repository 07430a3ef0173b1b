"""The task term every classifier shares."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassificationLoss(nn.Module):
    """Cross-entropy of ``out["logits"]`` against ``batch["label"]``, returned as ``{"loss_task": ...}``."""

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.weight = weight

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out["logits"], batch["label"], label_smoothing=self.label_smoothing)
        return {"loss_task": self.weight * ce}
