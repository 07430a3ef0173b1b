"""How well the bottleneck predicts the concepts: concept accuracy and concept F1 (torchmetrics, DDP-safe).

Both read concept logits (B, K) and true concepts (B, K) in {0, 1}; a concept is predicted present where its logit
is above `threshold` (0: probability 0.5). The math is in functional helpers, as torchmetrics' regression/mae.py.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def _concept_counts(logits: torch.Tensor, concepts: torch.Tensor, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-concept true positives, false positives, false negatives, true negatives, each (K,)."""
    if logits.ndim != 2 or logits.shape != concepts.shape:
        raise ValueError(f"Expected concept logits and concepts of the same shape (B, K); got {tuple(logits.shape)} "
                         f"and {tuple(concepts.shape)}.")
    predicted, truth = logits.detach() > threshold, concepts.bool()
    tp = (predicted & truth).sum(0)
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    return tp, fp, fn, len(logits) - tp - fp - fn


def concept_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, average: str = "macro") -> torch.Tensor:
    """F1 from per-concept counts (K,): "macro" is the mean over the concepts present in the truth or the
    predictions (a concept never present and never predicted has no F1 and is left out), "micro" pools the counts,
    "none" returns (K,) with NaN for those concepts."""
    if average == "micro":
        tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
    denominator = (2 * tp + fp + fn).float()
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.full_like(denominator, float("nan")))
    return f1.nanmean() if average == "macro" else f1


class ConceptAccuracy(Metric):
    """Mean over concepts (and samples) of whether the concept is predicted right. update(logits (B, K),
    concepts (B, K))."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, concepts: torch.Tensor) -> None:
        tp, _, _, tn = _concept_counts(logits, concepts, self.threshold)
        self.correct += (tp + tn).sum()
        self.total += logits.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class ConceptF1(Metric):
    """Concept F1 (macro over concepts by default, see `concept_f1`). update(logits (B, K), concepts (B, K));
    `per_concept()` gives the F1 of each concept (K,)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_concepts: int, threshold: float = 0.0, average: str = "macro", **kwargs) -> None:
        super().__init__(**kwargs)
        if average not in ("macro", "micro"):
            raise ValueError(f"average must be 'macro' or 'micro'; got {average!r}.")
        self.threshold, self.average = threshold, average
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(num_concepts, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, concepts: torch.Tensor) -> None:
        tp, fp, fn, _ = _concept_counts(logits, concepts, self.threshold)
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def per_concept(self) -> torch.Tensor:
        return concept_f1(self.tp, self.fp, self.fn, "none")

    def compute(self) -> torch.Tensor:
        return concept_f1(self.tp, self.fp, self.fn, self.average)
