"""How well the bottleneck predicts the concepts: concept accuracy, concept F1 and concept AUROC (torchmetrics,
DDP-safe).

All read concept logits (B, K) and true concepts (B, K) in {0, 1}; a concept is predicted present where its logit
is above `threshold` (0: probability 0.5). The math is in functional helpers, as torchmetrics' regression/mae.py.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAUROC
from torchmetrics.functional.classification import multilabel_auroc
from torchmetrics.utilities import dim_zero_cat

from zoo.checks import check_binary_concepts


def _concept_counts(logits: torch.Tensor, concepts: torch.Tensor, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-concept true positives, false positives, false negatives, true negatives, each (K,)."""
    if logits.ndim != 2 or logits.shape != concepts.shape:
        raise ValueError(f"Expected concept logits and concepts of the same shape (B, K); got {tuple(logits.shape)} "
                         f"and {tuple(concepts.shape)}.")
    check_binary_concepts(concepts)  # CPU tensors only; on an accelerator the System defers its own check
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


class ConceptAUROC(MultilabelAUROC):
    """Concept AUROC: torchmetrics' exact `MultilabelAUROC` over the K concepts, macro (the mean over concepts) by
    default. A concept whose truth holds one value over the evaluated data (never present, or always present) has
    no AUROC: torchmetrics scores it 0, which would pull the mean down, so here it is NaN in `per_concept()` and
    left out of the mean, as `concept_f1` leaves out concepts never present nor predicted.

    update(logits (B, K), concepts (B, K) in {0, 1}): AUROC reads only the ranking, so the logits are the scores
    (torchmetrics applies the sigmoid, which changes no ranking; no saturated ties). Keeps every score (exact
    curves): N x K floats per stage, gathered under DDP at the epoch's end.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_concepts: int, **kwargs) -> None:
        # torchmetrics' argument check refuses a single label; one concept is the same computation (update checks
        # the shapes, the System the 0/1 values)
        kwargs.setdefault("validate_args", num_concepts > 1)
        super().__init__(num_labels=num_concepts, average="none", thresholds=None, **kwargs)

    def update(self, logits: torch.Tensor, concepts: torch.Tensor) -> None:  # type: ignore[override]
        if logits.ndim != 2 or logits.shape != concepts.shape:
            raise ValueError(f"Expected concept logits and concepts of the same shape (B, K); got "
                             f"{tuple(logits.shape)} and {tuple(concepts.shape)}.")
        super().update(logits.detach().float(), concepts.long())

    def per_concept(self) -> torch.Tensor:
        """The AUROC of each concept (K,), NaN for a concept with a single truth value (or before any update)."""
        if isinstance(self.preds, list) and not self.preds:  # a list until synchronised, then one tensor
            return torch.full((self.num_labels,), float("nan"), device=self.device)
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)  # (N, K) each
        with warnings.catch_warnings():  # torchmetrics warns of a concept with one truth value: left out below
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            auroc = multilabel_auroc(preds, target, self.num_labels, average="none", validate_args=False)  # (K,)
        positives = target.sum(0)  # (K,)
        defined = (positives > 0) & (positives < len(target))
        return torch.where(defined, auroc, torch.full_like(auroc, float("nan")))

    def compute(self) -> torch.Tensor:
        return self.per_concept().nanmean()
