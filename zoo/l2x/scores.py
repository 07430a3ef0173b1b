"""Amortised selectors against Captum's post-hoc explainers on one frozen black box, scored the same way (the L2X
paper's Figures 2 and 3): what `L2XSystem.explanation_report` (`train.py compare`) and `benchmarks/l2x_race.py`
both report.

Every method explains the same samples for the black box's predicted class: a selector (L2X, INVASE) by one forward
pass, a Captum method (`zoo.explain.captum.FEATURE_METHODS`) by attribution on the black box. Attributions become a
top-k selection (k = the true set size; INVASE selects its own number; text: among the words, never padding);
then every method gets the median rank of the true features (by its scores, and by its selection as the L2X
authors rank, `zoo.l2x.metrics`; text: among the words, padding ranked after them) and TPR/FDR (where ground truth
is known), post-hoc accuracy (the black box on the selection agrees with the black box) and EVAL-X accuracy (the
random-mask evaluator on the selection vs the label).
Timing: batched methods are timed `repeats` times over all samples after one warm-up call (median); KernelShap and
Lime explain one sample at a time (Captum fits one surrogate per sample), timed per sample (median).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from zoo.explain.captum import PERTURBATION_METHODS, attribute_features, perturbation_samples
from zoo.explain.scores import EXPLANATION_DIRECTIONS as IMAGE_DIRECTIONS
from zoo.explain.scores import ExplanationRows, wall_time
from zoo.l2x.metrics import (AgreementAccuracy, MedianRank, SelectionRecovery, median_true_rank,
                             selection_median_rank)
from zoo.l2x.ops import top_k_mask

RANDOM = "random"  # the floor every explainer must clear: k features drawn uniformly (text: among the words)
# what a report says under the table of `compare_explainers`' rows (`train.py compare`), instead of the image
# families' note (`zoo.explain.scores.EXPLANATION_NOTE`: the true class, deletion, ROAD), which does not hold here
EXPLANATION_NOTE = (
    "Every method explains the black box's predicted class (not the label), on the same samples: a selector (L2X, "
    "INVASE) by its own selection, a Captum method by its k highest attributions on the black box (text: among the "
    "words); num_selected: the mean selection size. median_rank / mean_rank: the median / mean over samples of the "
    "median rank of the true features in the method's scores (1 = ranked first; lower is better; text: ranked "
    "among the words, padding after them); "
    "median_rank_selection: the same with features ranked by the method's selection, random order inside the "
    "selected and inside the rest (the L2X authors' protocol: a selector gains nothing from how it orders the "
    "features it keeps or drops); tpr / fdr: the "
    "fraction of the true features selected / of the selected features not true (where the data knows the true "
    "features). posthoc_acc: the black box on the selected features alone agrees with its prediction on the full "
    "input; evalx_acc: the EVAL-X evaluator (trained on randomly masked inputs) on the selection gives the true "
    "label. n: the samples explained (KernelShap and Lime at most num_perturbed, timed per sample); random: k "
    "features drawn uniformly, the floor, not timed.")

# which direction of each column of `compare_explainers`' rows is better (a report's legend: `train.py compare`
# through the rows' `directions`, the race's race.md), from the metrics themselves: every rank column is a median
# rank of the true features (mean_rank: the mean of the same per-sample medians); tpr / fdr / num_selected as
# SelectionRecovery's entries (num_selected a count: none); n: none
EXPLANATION_DIRECTIONS: dict[str, bool | None] = {
    "median_rank": MedianRank.higher_is_better, "median_rank_selection": MedianRank.higher_is_better,
    "mean_rank": MedianRank.higher_is_better, **SelectionRecovery.entry_directions,
    "posthoc_acc": AgreementAccuracy.higher_is_better, "evalx_acc": AgreementAccuracy.higher_is_better,
    **{column: IMAGE_DIRECTIONS[column] for column in ("ms_per_sample", "samples_per_s")},
}


class Explained(NamedTuple):
    """What `compare_explainers` returns: one row per method (`ExplanationRows` noted `EXPLANATION_NOTE`, what a
    report says under them, with `EXPLANATION_DIRECTIONS`, its legend), each method's per-sample median ranks of
    the true features (where known) and its hard selections (N, d)."""

    rows: ExplanationRows
    ranks: dict[str, torch.Tensor]
    selections: dict[str, torch.Tensor]


Timer = Callable[[Callable[[], Any], int, int], tuple[Any, float]]
"""`timer(function, repeats, warmup) -> (the last result, median seconds per call)`."""


def explain_features(method: str, selectors: dict[str, nn.Module], black_box: nn.Module, x: torch.Tensor,
                     target: torch.Tensor, k: int, repeats: int, timer: Timer, n_samples: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(scores (N, d), hard selection (N, d), seconds per sample) of one method on all of `x`: a selector named in
    `selectors`, or a Captum method on `black_box` (features as the first selector defines them). Batched methods:
    one warm-up call, the median of `repeats`; KernelShap and Lime: one call per sample, the median per sample."""
    selector = next(iter(selectors.values()))
    selectable = selector.selectable(x)  # (N, d) token ids: the words, never padding; None: every feature
    if method == RANDOM:  # seeded, not timed: a reference for the scores, not a method
        generator = torch.Generator().manual_seed(0)
        scores = torch.rand(len(x), selector.num_features, generator=generator).to(x.device)  # (N, d)
        if selectable is not None:  # padding is never a word: no score (-1.0 was |score| 1, above every word)
            scores = scores.masked_fill(~selectable, 0.0)
        return scores, top_k_mask(scores, k, selectable), float("nan")
    if method in selectors:
        selector = selectors[method]

        def forward() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return selector(x)

        out, seconds = timer(forward, repeats, 1)
        return out["scores"], out["selection"], seconds / len(x)  # the selector leaves padding out itself
    feature_ids = selector.feature_ids()
    feature_ids = None if feature_ids is None else feature_ids.to(x.device)
    attribute = functools.partial(attribute_features, black_box, method=method, feature_mask=feature_ids,
                                  num_features=selector.num_features,
                                  n_samples=n_samples if method in PERTURBATION_METHODS else None)
    if method in PERTURBATION_METHODS:  # one surrogate per sample: timed per sample, median
        timed = [timer(functools.partial(attribute, x[i: i + 1], target[i: i + 1]), 1, 0) for i in range(len(x))]
        scores, per_sample = torch.cat([score for score, _ in timed]), statistics.median(s for _, s in timed)
    else:
        scores, seconds = timer(functools.partial(attribute, x, target), repeats, 1)
        per_sample = seconds / len(x)
    return scores, top_k_mask(scores, k, selectable), per_sample


def compare_explainers(selectors: dict[str, nn.Module], black_box: nn.Module, evaluator: nn.Module | None,
                       x: torch.Tensor, label: torch.Tensor, relevant: torch.Tensor | None, k: int,
                       methods: Sequence[str], num_perturbed: int | None = None, repeats: int = 1,
                       timer: Timer | None = None) -> Explained:
    """Explain `x` with every method (selector names and Captum methods) and score each (module docstring).

    Args:
        selectors: eval-mode selectors by name; the first defines the features (`mask_input`, `feature_ids`).
        black_box / evaluator: the frozen black box explained, and the EVAL-X evaluator (None: no evalx_acc).
        x, label, relevant: the samples (N, ...), their labels (N,) and true features (N, d) or None.
        k: the number of features a post-hoc method keeps.
            KernelShap and Lime may carry their sample count, "lime:5000" (default: Captum's); "random" is
            the floor: k features drawn uniformly (seeded; text: among the words), scored but not timed.
        num_perturbed: at most this many samples for KernelShap and Lime (default: all).
        repeats / timer: timed calls of the batched methods; the timer (default `wall_time` on x's device).
    """
    timer = timer or functools.partial(wall_time, device=x.device)
    mask_input = next(iter(selectors.values())).mask_input
    with torch.no_grad():
        target = black_box(x)["logits"].argmax(-1)  # explain the black box's decision
    rows, ranks, selections = [], {}, {}
    selectable = next(iter(selectors.values())).selectable(x)  # (N, d) text: the words, ranked before padding
    for method in methods:
        name, n_samples = perturbation_samples(method)
        n = min(len(x), num_perturbed or len(x)) if name in PERTURBATION_METHODS else len(x)
        scores, selection, seconds = explain_features(name, selectors, black_box, x[:n], target[:n], k, repeats,
                                                      timer, n_samples)
        masked = mask_input(x[:n], selection)
        row = {"method": method, "n": n, "num_selected": round(selection.sum(-1).mean().item(), 2)}
        if relevant is not None:
            words = None if selectable is None else selectable[:n]  # padding ranked after the words, in both
            medians = median_true_rank(scores, relevant[:n], selectable=words)
            recovery = SelectionRecovery()
            recovery.update(selection, relevant[:n])
            ranks[method] = medians.cpu()  # for plots
            by_selection = selection_median_rank(selection, scores, relevant[:n], selectable=words)  # the authors'
            row |= {"median_rank": round(medians.quantile(0.5).item(), 2),
                    "median_rank_selection": round(by_selection.nanquantile(0.5).item(), 2),
                    "mean_rank": round(medians.mean().item(), 3),
                    **{name: round(value.item(), 3) for name, value in recovery.compute().items()
                       if name != "num_selected"}}
        posthoc = AgreementAccuracy()
        with torch.no_grad():
            posthoc.update(black_box(masked)["logits"], target[:n])
            row["posthoc_acc"] = round(posthoc.compute().item(), 3)
            if evaluator is not None:
                evalx = AgreementAccuracy()
                evalx.update(evaluator(masked)["logits"], label[:n])
                row["evalx_acc"] = round(evalx.compute().item(), 3)
        if name != RANDOM:
            row |= {"ms_per_sample": round(1000 * seconds, 5), "samples_per_s": round(1 / seconds, 1)}
        rows.append(row)
        selections[method] = selection
    return Explained(ExplanationRows(rows, EXPLANATION_NOTE, EXPLANATION_DIRECTIONS), ranks, selections)
