"""Metrics for feature-selection explanations (L2X family, and any attribution turned into a ranking/top-k):
median rank of the true features, TPR/FDR of a selection, and agreement accuracy (post-hoc accuracy, EVAL-X).

Conventions fixed once for every method: features are ranked by |score| descending, ties broken at random; a
sample's median rank is the median (mean of the two middle values for an even count) of its true features' ranks,
rank 1 being the most important; the optimum for k true features is the median of {1, ..., k}.

Ties in `MedianRank` (and wherever `feature_ranks` is given a `seed`) follow a random order of the features that is a
function of the seed and of the sample's own |scores| alone (an integer hash of their bit patterns), so a sample
ranks the same in any batch, position, process or run, and the global random stream is not touched; rows with other
scores get other orders, so no feature is favoured across samples (one fixed order for every sample, as
`zoo.explain.faithfulness.saliency_rank` uses for pixels, would rank a true feature tied with a false one always
first or always last here, where the true features sit at the same positions in every sample). Under DDP the
global stream drew each rank's own tie order (2 processes gave 7.0 where 1 gave 6.0 on tied scores) and validation
consumed the training random stream.

Two rankings (`MedianRank(rank_by=...)`, logged as `median_rank` and `median_rank_selection`):
- "scores" (the zoo's first metric, kept): features ranked by the selector's continuous scores (L2X: softmax(w);
  INVASE: the selection probabilities). It tells the order among the selected features and among the rest, so it
  favours a selector over the authors' protocol: INVASE selecting nothing still ranks the true features first.
- "selection" (the authors' protocol, Jianbo-Lab/L2X `synthetic/explain.py`: the test-time output of the
  Sample_Concrete layer, a hard k-hot mask, through `create_rank`): features ranked by the hard selection, so the
  selected features take a random order among ranks 1..|S| and the rest among |S|+1..d. Ties follow
  `tie_order_keys` of the sample's scores (distinct per sample, while many samples share one selection), so each
  sample draws its own order, as the authors' `np.random.permutation` per sample, yet deterministically.

Both rank the features a selection may keep, given as `selectable` (B, d) (text: the words; `FeatureSelector.
selectable`): the others (padding) rank after every one of them, so a text's true words rank among its words alone.
Padding ranked as features put an unselected true word anywhere in k+1..max_len instead of k+1..(its word count)
(200 texts of about 26 words, max_len 32, k = 3: a 2-epoch L2X's median_rank_selection 15.0, 12.25 among the words).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from zoo.hashing import MASK32, mix32


@functools.lru_cache(maxsize=16)
def _position_and_salt(d: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The hashed feature positions (d,) and hashed seed (): constants of every `tie_order_keys` call, made once."""
    return mix32(torch.arange(d, device=device)), mix32(torch.tensor(seed & MASK32, device=device))


def tie_order_keys(magnitude: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, d) float -> (B, d) int64 keys in [0, 2^32), distinct within a row: a random order of each row's features
    that depends only on `seed` and the row's values (vectorised, on the row's device, global random stream untouched).
    """
    bits = magnitude.float().contiguous().view(torch.int32).long() & MASK32  # (B, d) each value's bit pattern
    position, salt = _position_and_salt(magnitude.shape[-1], seed, magnitude.device)  # (d,), ()
    row = mix32((mix32(bits ^ position).sum(-1, keepdim=True) & MASK32) ^ salt)  # (B, 1) the row's hash
    return mix32(row ^ position)  # (B, d), distinct: row ^ position is distinct per feature, _mix32 a bijection


def feature_ranks(scores: torch.Tensor, generator: torch.Generator | None = None, seed: int | None = None,
                  selectable: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) rank of each feature by |score| descending (1 = top), ties broken uniformly at random: by `seed` when
    given (`tie_order_keys`: each sample's order a function of its scores, the same in every batch and process), else
    by `generator` (default: the global random stream; one process evaluating all samples, as `compare_explainers`).
    `selectable` (B, d) bool: the features not in it (padding) rank after all the others, whatever their score."""
    magnitude = scores.detach().abs().float()
    if seed is None:
        keys = torch.rand(magnitude.shape, generator=generator).to(magnitude.device)
    else:
        keys = tie_order_keys(magnitude, seed)
    if selectable is not None:  # below every |score| (>= 0); the tie order above is the scores' own
        magnitude = magnitude.masked_fill(~selectable.to(magnitude.device), -1.0)
    shuffle = keys.argsort(-1)  # (B, d) a random order of the features
    shuffled = magnitude.gather(-1, shuffle)
    # A stable sort of a randomly permuted row breaks ties at random.
    order_in_shuffled = torch.sort(shuffled, dim=-1, descending=True, stable=True).indices
    return ranks_of(shuffle.gather(-1, order_in_shuffled))


def ranks_of(order: torch.Tensor) -> torch.Tensor:
    """(B, d) feature indices by position -> (B, d) each feature's rank (1 = first)."""
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(1, order.shape[-1] + 1, device=order.device).expand_as(order))


def median_true_rank(scores: torch.Tensor, relevant: torch.Tensor, generator: torch.Generator | None = None,
                     seed: int | None = None, selectable: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) median rank of each sample's relevant features (samples without relevant features give NaN); ties and
    `selectable` (padding after every word) as `feature_ranks`."""
    return median_of_ranks(feature_ranks(scores, generator, seed, selectable).float(), relevant)


def median_of_ranks(ranks: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """(B,) median of each sample's relevant features' `ranks` (B, d) (NaN without relevant features)."""
    relevant = relevant.bool()
    count = relevant.sum(-1)  # (B,)
    true_ranks = torch.where(relevant, ranks, torch.inf).sort(-1).values  # (B, d) true ranks first, ascending
    low = ((count - 1).clamp_min(0) // 2)[:, None]
    high = (count // 2).clamp_max(ranks.shape[-1] - 1)[:, None]
    median = (true_ranks.gather(-1, low) + true_ranks.gather(-1, high)).squeeze(-1) / 2
    return torch.where(count > 0, median, torch.nan)


RANK_BY = ("scores", "selection")


def selection_median_rank(selection: torch.Tensor, scores: torch.Tensor, relevant: torch.Tensor, seed: int = 0,
                          selectable: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the authors' median rank (module docstring): features ranked by the hard selection (`selection` > 0.5:
    kept first), ties, i.e. the order inside the kept and inside the dropped features, broken at random by
    `tie_order_keys` of each sample's `scores` (B, d) with `seed`; the features not `selectable` (B, d) (padding)
    after the dropped ones. Samples without relevant features give NaN."""
    # (B, d) group 0: the kept (INVASE: its own number), 1: the dropped (a NaN entry too), 2: the not selectable
    group = (~(selection.detach() > 0.5)).long()
    if selectable is not None:
        group = group.masked_fill(~selectable.to(group.device), 2)  # padding: after every word, kept or dropped
    keys = tie_order_keys(scores.detach().abs().float(), seed)  # (B, d) distinct in [0, 2^32)
    order = (group << 32 | keys).argsort(-1)  # (B, d) kept first, each group in its random order: one sort
    return median_of_ranks(ranks_of(order).float(), relevant)


class MedianRank(Metric):
    """Per-sample median rank of the true features; `compute` gives the median over samples (the box plot's
    centre line, the paper's Figure 3), `values()` the whole distribution. Ties are broken by `tie_order_keys` with
    `seed`: a sample's median rank does not depend on its batch, position or process.

    `rank_by="scores"` ranks the continuous scores (the zoo's `median_rank`); `rank_by="selection"` ranks the hard
    selection given to `update`, the authors' protocol (`selection_median_rank`, logged as `median_rank_selection`)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, seed: int = 0, rank_by: str = "scores", **kwargs) -> None:
        super().__init__(**kwargs)
        if rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY} (the continuous scores, or the hard selection as the "
                             f"L2X authors rank); got {rank_by!r}.")
        self.seed, self.rank_by = seed, rank_by
        self.add_state("medians", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, relevant: torch.Tensor, selection: torch.Tensor | None = None,
               selectable: torch.Tensor | None = None) -> None:
        """`scores` (B, d), `relevant` (B, d) the true features; `selection` (B, d) the hard selection, needed with
        `rank_by="selection"` (the scores then only key its random tie order); `selectable` (B, d) bool the features
        a selection may keep (text: the words), the others ranked last (None: every feature)."""
        if scores.shape != relevant.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must match.")
        if selectable is not None and selectable.shape != scores.shape:
            raise ValueError(f"selectable {tuple(selectable.shape)} must have the shape of scores "
                             f"{tuple(scores.shape)}.")
        if self.rank_by == "selection":
            if selection is None or selection.shape != scores.shape:
                got = None if selection is None else tuple(selection.shape)
                raise ValueError(f"MedianRank(rank_by='selection') ranks the hard selection: pass it as "
                                 f"update(scores, relevant, selection) with the shape of scores "
                                 f"{tuple(scores.shape)}; got {got}.")
            medians = selection_median_rank(selection, scores, relevant, self.seed, selectable)
        else:
            medians = median_true_rank(scores, relevant, seed=self.seed, selectable=selectable)
        self.medians.append(medians)  # (B,) NaN for samples without true features: dropped by `values`, not here
        # (a boolean index has a data-dependent shape, a host sync inside the step)

    def values(self) -> torch.Tensor:
        """(N,) every sample's median rank (all ranks' samples once synced; samples without true features left out).
        """
        values = dim_zero_cat(self.medians) if len(self.medians) else torch.empty(0, device=self.device)
        return values[~values.isnan()]

    def compute(self) -> torch.Tensor:
        values = self.values().float()
        return values.quantile(0.5) if values.numel() else torch.tensor(torch.nan, device=self.device)


class SelectionRecovery(Metric):
    """The mean hard selection size `num_selected` (instance-wise for INVASE), and against the true sets T where the
    data knows them: true-positive rate |S n T| / |T| and false-discovery rate |S \\ T| / |S| of the selections S,
    averaged over samples. `update(selection, None)` counts the size alone (data without ground truth: INVASE's
    selection size is still what one needs to read its post-hoc accuracy); tpr and fdr are given once a batch
    with ground truth was seen."""

    higher_is_better = None  # mixed: a higher tpr, a lower fdr is better; num_selected is descriptive
    entry_directions: ClassVar[dict[str, bool | None]] = {"tpr": True, "fdr": False, "num_selected": None}
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tpr_sum", "fdr_sum", "size_sum", "count", "truth_count"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, selection: torch.Tensor, relevant: torch.Tensor | None = None) -> None:
        selected = selection.detach() > 0.5  # (B, d)
        size = selected.sum(-1).float()  # (B,)
        self.size_sum += size.sum()
        self.count += len(selected)
        if relevant is None:
            return
        relevant = relevant.bool()
        hits = (selected & relevant).sum(-1).float()  # (B,)
        self.tpr_sum += (hits / relevant.sum(-1).clamp_min(1)).sum()
        self.fdr_sum += ((size - hits) / size.clamp_min(1)).sum()
        self.truth_count += len(selected)

    def compute(self) -> dict[str, torch.Tensor]:
        result = {"num_selected": self.size_sum / self.count}  # NaN with no sample (0 / 0), not a size of 0
        if self.truth_count > 0:  # at the epoch's end (a host read), never in a step
            truth = self.truth_count
            result |= {"tpr": self.tpr_sum / truth, "fdr": self.fdr_sum / truth}
        return result


class AgreementAccuracy(Metric):
    """Fraction of samples whose prediction (argmax of `logits`) equals `target` (class ids, or logits whose
    argmax is taken). Post-hoc accuracy: black box on the selected input vs black box on the full input;
    EVAL-X accuracy: the random-mask evaluator on the selected input vs the label. NaN before any sample."""

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
        return self.correct / self.total  # 0 / 0: NaN with no sample (nothing scored, left out of means), never 0
