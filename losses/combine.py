"""Several loss modules as one: their named terms merged into one dict (names must not clash)."""

from __future__ import annotations

import torch
import torch.nn as nn


class SumOfLosses(nn.Module):
    """Runs each loss module on (out, batch) and merges the returned terms; `set_epoch` reaches every member."""

    def __init__(self, losses: list[nn.Module]) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def set_epoch(self, epoch: int) -> dict[str, float]:
        logged: dict[str, float] = {}
        for loss in self.losses:
            if hasattr(loss, "set_epoch"):
                logged.update(loss.set_epoch(epoch))
        return logged

    def forward(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            new = loss(out, batch)
            clash = set(new) & set(terms)
            if clash:
                raise ValueError(f"Loss terms {sorted(clash)} are returned by two losses; rename one.")
            terms.update(new)
        return terms
