"""Metrics for feature-selection explanations (L2X family, and any attribution turned into a ranking/top-k):
median rank of the true features, TPR/FDR of a selection, and agreement accuracy (post-hoc accuracy, EVAL-X).

Conventions fixed once for every method: features are ranked by |score| descending, ties broken at random; a
sample's median rank is the median (mean of the two middle values for an even count) of its true features' ranks,
rank 1 being the most important; the optimum for k true features is the median of {1, ..., k}.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def feature_ranks(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, d) rank of each feature by |score| descending (1 = top), ties broken uniformly at random."""
    magnitude = scores.detach().abs().float()
    shuffle = torch.rand(magnitude.shape, generator=generator).argsort(-1).to(magnitude.device)  # random order
    shuffled = magnitude.gather(-1, shuffle)
    # A stable sort of a randomly permuted row breaks ties at random.
    order_in_shuffled = torch.sort(shuffled, dim=-1, descending=True, stable=True).indices
    order = shuffle.gather(-1, order_in_shuffled)  # (B, d) feature index by position
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, scores.shape[-1] + 1, device=order.device).expand_as(order))
    return ranks


def median_true_rank(scores: torch.Tensor, relevant: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """(B,) median rank of each sample's relevant features (samples without relevant features give NaN)."""
    ranks = feature_ranks(scores, generator).float()
    relevant = relevant.bool()
    count = relevant.sum(-1)  # (B,)
    true_ranks = torch.where(relevant, ranks, torch.inf).sort(-1).values  # (B, d) true ranks first, ascending
    low = ((count - 1).clamp_min(0) // 2)[:, None]
    high = (count // 2).clamp_max(scores.shape[-1] - 1)[:, None]
    median = (true_ranks.gather(-1, low) + true_ranks.gather(-1, high)).squeeze(-1) / 2
    return torch.where(count > 0, median, torch.nan)


class MedianRank(Metric):
    """Per-sample median rank of the true features; `compute` gives the median over samples (the box plot's
    centre line, the paper's Figure 3), `values()` the whole distribution."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("medians", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, relevant: torch.Tensor) -> None:
        if scores.shape != relevant.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must match.")
        medians = median_true_rank(scores, relevant)
        self.medians.append(medians[~medians.isnan()])

    def values(self) -> torch.Tensor:
        """(N,) every sample's median rank (all ranks' samples once synced)."""
        return dim_zero_cat(self.medians) if len(self.medians) else torch.empty(0, device=self.device)

    def compute(self) -> torch.Tensor:
        values = self.values().float()
        return values.quantile(0.5) if values.numel() else torch.tensor(torch.nan, device=self.device)


class SelectionRecovery(Metric):
    """True-positive rate |S n T| / |T| and false-discovery rate |S \\ T| / |S| of hard selections S against the
    true sets T, averaged over samples; also the mean selection size (instance-wise for INVASE)."""

    higher_is_better = None  # mixed: a higher tpr, a lower fdr is better; num_selected is descriptive
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tpr_sum", "fdr_sum", "size_sum", "count"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, selection: torch.Tensor, relevant: torch.Tensor) -> None:
        selected, relevant = selection.detach() > 0.5, relevant.bool()
        hits = (selected & relevant).sum(-1).float()  # (B,)
        size = selected.sum(-1).float()
        self.tpr_sum += (hits / relevant.sum(-1).clamp_min(1)).sum()
        self.fdr_sum += ((size - hits) / size.clamp_min(1)).sum()
        self.size_sum += size.sum()
        self.count += len(selected)

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp_min(1)
        return {"tpr": self.tpr_sum / count, "fdr": self.fdr_sum / count, "num_selected": self.size_sum / count}


class AgreementAccuracy(Metric):
    """Fraction of samples whose prediction (argmax of `logits`) equals `target` (class ids, or logits whose
    argmax is taken). Post-hoc accuracy: black box on the selected input vs black box on the full input;
    EVAL-X accuracy: the random-mask evaluator on the selected input vs the label."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if target.ndim == logits.ndim:
            target = target.argmax(-1)
        self.correct += (logits.argmax(-1) == target).sum()
        self.total += len(target)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp_min(1)
