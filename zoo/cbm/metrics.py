"""How well the bottleneck predicts the concepts: concept accuracy, concept F1 and concept AUROC (torchmetrics,
DDP-safe).

All read concept logits (B, K) and true concepts (B, K) in {0, 1}; a concept is predicted present where its logit
is above `threshold` (0: probability 0.5). The math is in functional helpers, as torchmetrics' regression/mae.py.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from zoo.checks import check_binary_concepts
from zoo.distributed import CatStateMetric


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
    concepts (B, K)). NaN before any update (nothing scored is no score; 0 would read as all wrong)."""

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
        accuracy = self.correct.float() / self.total.clamp(min=1)
        return torch.where(self.total > 0, accuracy, torch.full_like(accuracy, float("nan")))


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


def concept_auroc(logits: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """The exact AUROC of each concept from logits (N, K) and concepts (N, K) in {0, 1}: (K,), NaN for a concept
    whose truth holds one value (no positive or no negative sample).

    The Mann-Whitney statistic on the raw logits, the probability that a positive sample scores above a negative
    one, ties counted half: AUROC_k = (sum of the positives' ranks - P (P + 1) / 2) / (P N), with 1-based ranks
    averaged over tied logits (the positions of a value between searchsorted left and right of the sorted column).
    No sigmoid: in exact arithmetic it changes no ranking, but in float32 it rounds logits above ~16.6 to 1.0 and
    close logits to one value, which would tie them.
    Vectorised over concepts: one batched sort and two batched searchsorted, (K, N) each.
    """
    scores = logits.detach().t().float().contiguous()  # (K, N)
    truth = concepts.t().bool()  # (K, N)
    ordered = scores.sort(dim=1).values  # (K, N)
    below = torch.searchsorted(ordered, scores, right=False)  # (K, N) values strictly below each logit
    up_to = torch.searchsorted(ordered, scores, right=True)  # (K, N) values below or equal
    ranks = (below + up_to + 1).double() / 2  # (K, N) mean 1-based rank of the tied block
    positives = truth.sum(1).double()  # (K,)
    negatives = truth.shape[1] - positives  # (K,)
    rank_sum = (ranks * truth).sum(1)  # (K,)
    auroc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives).clamp(min=1)
    defined = (positives > 0) & (negatives > 0)
    return torch.where(defined, auroc, torch.full_like(auroc, float("nan"))).float()


class ConceptAUROC(CatStateMetric):
    """Concept AUROC: the exact AUROC of each of the K concepts (`concept_auroc`), macro (the mean over concepts).
    A concept whose truth holds one value over the evaluated data (never present, or always present) has no AUROC:
    it is NaN in `per_concept()` and left out of the mean, as `concept_f1` leaves out concepts never present nor
    predicted; NaN before any update.

    update(logits (B, K), concepts (B, K) in {0, 1}): AUROC reads only the ranking, so the raw logits are the
    scores, ties counted half. Why not torchmetrics' MultilabelAUROC: it applies the sigmoid per batch, only when a
    value of that batch lies outside [0, 1], so batches were scored on different scales (the result depended on the
    batching and the DDP split), and logits above ~16.6 all became 1.0 in float32 and tied. Keeps every logit and
    concept ("cat" states, exact curves): N x K of each per stage, gathered under DDP at the epoch's end.

    A `zoo.distributed.CatStateMetric` (as the ICNN metrics): an unrepeated evaluation sampler can leave a rank
    without samples, whose empty state torchmetrics sends as a 1-D `tensor([])` against the others' (n, K), and
    the gather aborted (gloo: "Received data size doesn't match expected size").
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_concepts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_concepts = num_concepts
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("concepts", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, concepts: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape != concepts.shape or logits.shape[1] != self.num_concepts:
            raise ValueError(f"Expected concept logits and concepts of the same shape (B, {self.num_concepts}); got "
                             f"{tuple(logits.shape)} and {tuple(concepts.shape)}.")
        self.logits.append(logits.detach().float())
        self.concepts.append(concepts.detach().long())

    def per_concept(self) -> torch.Tensor:
        """The AUROC of each concept (K,), NaN for a concept with a single truth value (or before any update, on
        every rank)."""
        nan = torch.full((self.num_concepts,), float("nan"), device=self.device)
        if isinstance(self.logits, list) and not self.logits:  # a list until synchronised, then one tensor
            return nan
        logits = dim_zero_cat(self.logits)  # (N, K); (0,) once synchronised when no rank held a sample
        return concept_auroc(logits, dim_zero_cat(self.concepts)) if logits.numel() else nan  # (K,)

    def compute(self) -> torch.Tensor:
        return self.per_concept().nanmean()
