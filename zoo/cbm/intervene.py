"""Test-time intervention (Koh et al. 2020, Sec. 6): a person corrects the first k concepts, the model re-predicts.

Which concepts come first (`order`): "random", one random order (fixed seed) the same for every image, or the mean
over `trials` random orders (Koh et al.'s tti.py runs 5; it reports their best, here their mean); "uncertainty",
each image's own order, the concepts whose predicted probability is closest to 0.5 first. k = 0 .. K.

A corrected concept's probability becomes the truth: "percentile" (the paper, for sigmoid bottlenecks) sets its
logit to the 5th percentile of that concept's predicted logits when absent and the 95th when present; "hard" sets
the probability to 0 / 1 (CEM's interventions, and Koh et al.'s tti.py for a bottleneck whose f was trained on the
true 0/1 concepts: the independent model). Departs: the percentiles are taken over the evaluated data, not the
training set, unless `percentiles` are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from zoo.checks import check_binary_concepts
from zoo.figures import save_figure

VALUES = ("percentile", "hard")
ORDERS = ("random", "uncertainty")


@torch.no_grad()
def encode_data(model: nn.Module, batches: Iterable[dict[str, Any]], concept_key: str = "attributes",
                input_key: str = "image", target_key: str = "label", device: torch.device | str | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The bottleneck of every batch (model.encode, the feature maps dropped), true concepts (N, K), labels (N,)."""
    device = device or next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    concepts, labels = [], []
    for batch in batches:
        encoded = model.encode(batch[input_key].to(device))
        for key, value in encoded.items():
            if key != "features":
                parts.setdefault(key, []).append(value)
        concepts.append(batch[concept_key].to(device))
        labels.append(batch[target_key].to(device))
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(concepts), torch.cat(labels)


def replacement_values(concept_logits: torch.Tensor, concepts: torch.Tensor, values: str = "percentile",
                       percentiles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The probabilities (N, K) an intervention puts in place of the predicted ones (see the module docstring)."""
    if values not in VALUES:
        raise ValueError(f"values must be one of {VALUES}; got {values!r}.")
    check_binary_concepts(concepts)  # evaluation only: reading the values here costs no training step anything
    truth = concepts.bool()
    if values == "hard":
        return truth.float()
    low, high = percentiles if percentiles is not None else torch.quantile(
        concept_logits.float(), torch.tensor([0.05, 0.95], device=concept_logits.device), dim=0)  # (K,) each
    return torch.sigmoid(torch.where(truth, high, low))  # (N, K)


def check_order(order: str, trials: int) -> None:
    """Refuse an unknown `order` and a `trials` count it cannot take (see `intervention_ranks`)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
    if trials < 1 or (order == "uncertainty" and trials != 1):
        raise ValueError(f"trials averages random orders: >= 1 with order='random', 1 with order='uncertainty' (one "
                         f"order per image, no randomness); got trials={trials}, order={order!r}.")


def intervention_ranks(concept_logits: torch.Tensor, order: str = "random", seed: int = 0, trials: int = 1
                       ) -> torch.Tensor:
    """When each concept is corrected: rank (T, 1, K) of each concept in T random orders (the same for every image;
    trial t is the t-th permutation drawn from `seed`), or (1, N, K) per image for "uncertainty" (|logit| ascending,
    i.e. probability closest to 0.5 first; ties keep concept order). Concept i of image b is corrected at k when
    its rank is below k."""
    check_order(order, trials)
    num_concepts, device = concept_logits.shape[1], concept_logits.device
    if order == "uncertainty":
        orders = concept_logits.float().abs().argsort(dim=1, stable=True)[None]  # (1, N, K)
    else:
        generator = torch.Generator().manual_seed(seed)
        orders = torch.stack([torch.randperm(num_concepts, generator=generator) for _ in range(trials)])
        orders = orders.to(device)[:, None]  # (T, 1, K)
    positions = torch.arange(num_concepts, device=device).expand_as(orders)
    return torch.empty_like(orders).scatter_(-1, orders, positions)  # rank[t, b, order[t, b, j]] = j


@torch.no_grad()
def intervention_curve(model: nn.Module, encoded: dict[str, torch.Tensor], concepts: torch.Tensor,
                       labels: torch.Tensor, ks: Iterable[int] | None = None, seed: int = 0,
                       values: str = "percentile",
                       percentiles: tuple[torch.Tensor, torch.Tensor] | None = None,
                       order: str = "random", trials: int = 1) -> dict[str, Any]:
    """Task accuracy after correcting the first k concepts (see the module docstring), for each k (default 0 .. K).

    Returns {"k": [...], "acc": [...] (the mean over trials), "order": the concept indices in the order they are
    corrected (one random order; None when it varies: several trials, or per image by uncertainty), "trials",
    "values", "order_by" (the `order` argument)}.
    One `decode` per k and trial over all images (vectorised over images and concepts)."""
    num_concepts = concepts.shape[1]
    ranks = intervention_ranks(encoded["concept_logits"], order, seed, trials)  # (T, 1 or N, K)
    replacement = replacement_values(encoded["concept_logits"], concepts, values, percentiles)  # (N, K)
    ks = list(range(num_concepts + 1)) if ks is None else [int(k) for k in ks]
    accuracy = []  # (k, T)
    for k in ks:
        per_trial = []
        for rank in ranks:  # (1 or N, K): a handful of trials at most
            intervene = (rank < k).expand_as(concepts)  # (N, K): the first k concepts of the order
            logits = model.decode(encoded, replacement, intervene)["logits"]
            per_trial.append((logits.argmax(-1) == labels).float().mean())
        accuracy.append(torch.stack(per_trial))
    single = order == "random" and trials == 1
    return {"k": ks, "acc": torch.stack(accuracy).mean(1).tolist(),
            "order": ranks[0, 0].argsort().tolist() if single else None, "trials": trials, "values": values,
            "order_by": order}


def write_intervention_report(curve: dict[str, list], folder: Path, name: str,
                              concept_names: list[str] | None = None) -> tuple[str, Any]:
    """`<name>.md` (k, accuracy, the concept corrected k-th when one order holds for every image) and `<name>.png`
    (accuracy vs k) in `folder`. Returns the markdown and the matplotlib figure (for TensorBoard)."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    order, trials = curve.get("order"), curve.get("trials", 1)
    lines = ["| k | task accuracy | concept corrected k-th |", "| --- | --- | --- |"]
    if "values" in curve:  # what a corrected concept was set to, and in which order concepts were corrected
        how = ("each image's own order, the concepts whose probability is closest to 0.5 first"
               if curve.get("order_by") == "uncertainty" else f"the mean over {trials} random orders" if trials > 1
               else "one random order")
        values = "0 / 1" if curve["values"] == "hard" else "the 5th / 95th percentile logits"
        lines.insert(0, f"Corrected concepts set to {values}; {how}.\n")
    for k, acc in zip(curve["k"], curve["acc"]):
        concept = order[k - 1] if k > 0 and order is not None else None
        label = "-" if concept is None else concept_names[concept] if concept_names else str(concept)
        lines.append(f"| {k} | {acc:.4f} | {label} |")
    markdown = "\n".join(lines) + "\n"
    (folder / f"{name}.md").write_text(markdown)
    figure = Figure(figsize=(4.5, 3.2), dpi=100, layout="constrained")
    ax = figure.subplots()
    ax.plot(curve["k"], curve["acc"], marker=".")
    ax.set_xlabel("concepts corrected (k)")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"test-time intervention ({name})")
    ax.grid(alpha=0.3)
    save_figure(figure, folder / f"{name}.png")
    return markdown, figure
