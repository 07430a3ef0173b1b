"""Test-time intervention (Koh et al. 2020, Sec. 6): a person corrects the first k concepts, the model re-predicts.

Which concepts come first (`order`): "random", one random order (fixed seed) the same for every image, or the mean
over `trials` random orders (Koh et al.'s tti.py runs 5; it reports their best, here their mean); "uncertainty",
each image's own order, the concepts whose predicted probability is closest to 0.5 first. k = 0 .. K.

By groups (`groups`, Koh et al.'s CUB interventions): a person corrects a whole group of concepts in one step, e.g.
every "has_bill_shape::*" attribute at once (`concept_groups`: the name's part before "::"; the 112 CUB attributes
fall into 28 groups). The random order permutes groups, "uncertainty" ranks a group by the mean |logit| of its
concepts, and k counts groups, 0 .. G. Without groups each concept is its own group (the same curve, bit for bit).
Departs: Koh et al.'s tti.py groups consecutive attributes sharing their name's first 10 characters (the same 28
groups on CUB's attributes.txt) and draws each image's groups at random afresh for each k; here one order holds for
every image and the groups corrected at k include those corrected at k - 1.

A corrected concept's probability becomes the truth: "percentile" sets its logit to the 5th percentile of that
concept's predicted logits when absent and the 95th when present (Koh et al.'s values for an f that reads the concept
logits; the zoo's f reads their sigmoid, for which the authors' tti.py sets 0 / 1: the percentiles carried through
the sigmoid are the zoo's choice, the default for joint and sequential models); "hard" sets the probability to 0 / 1
(CEM's interventions, tti.py for a sigmoid bottleneck, and for one whose f was trained on the true 0/1 concepts: the
independent model). Departs: the percentiles are taken over the evaluated data, not the
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


def concept_groups(names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Each concept's group id (K,) and the G group names, in order of first appearance: the name's part before "::"
    (CUB: "has_bill_shape::dagger" -> "has_bill_shape"); a name without "::" is its own group."""
    keys = [name.split("::", 1)[0] for name in names]
    group_names = list(dict.fromkeys(keys))
    index = {key: i for i, key in enumerate(group_names)}
    return torch.tensor([index[key] for key in keys], dtype=torch.long), group_names


def check_groups(groups: torch.Tensor | None, num_concepts: int, device: torch.device) -> torch.Tensor:
    """The group id (K,) of each concept on `device` (None: concept i is group i); refuses ids that are not 0 .. G-1,
    each used (an empty group would make an intervention step that corrects nothing)."""
    if groups is None:
        return torch.arange(num_concepts, device=device)
    groups = torch.as_tensor(groups, device=device)
    if groups.shape != (num_concepts,) or groups.dtype != torch.long or not torch.equal(
            groups.unique(), torch.arange(int(groups.max()) + 1 if len(groups) else 0, device=device)):
        raise ValueError(f"groups must be a (K,) = ({num_concepts},) long tensor of group ids 0 .. G-1, each used "
                         f"(see concept_groups); got {tuple(groups.shape)} {groups.dtype} {groups.tolist()[:20]}.")
    return groups


def check_order(order: str, trials: int) -> None:
    """Refuse an unknown `order` and a `trials` count it cannot take (see `intervention_ranks`)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
    if trials < 1 or (order == "uncertainty" and trials != 1):
        raise ValueError(f"trials averages random orders: >= 1 with order='random', 1 with order='uncertainty' (one "
                         f"order per image, no randomness); got trials={trials}, order={order!r}.")


def group_ranks(concept_logits: torch.Tensor, groups: torch.Tensor, order: str = "random", seed: int = 0,
                trials: int = 1) -> torch.Tensor:
    """When each group is corrected: rank (T, 1, G) of each group in T random orders (the same for every image;
    trial t is the t-th permutation of the G groups drawn from `seed`), or (1, N, G) per image for "uncertainty"
    (mean |logit| of the group's concepts ascending, i.e. probability closest to 0.5 first; ties keep group order).
    `groups`: (K,) ids 0 .. G-1 (`check_groups`)."""
    check_order(order, trials)
    num_groups, device = int(groups.max()) + 1, concept_logits.device
    if order == "uncertainty":
        size = torch.bincount(groups, minlength=num_groups)  # (G,)
        total = concept_logits.float().abs().new_zeros(len(concept_logits), num_groups)  # (N, G)
        score = total.index_add_(1, groups, concept_logits.float().abs()) / size  # (N, G): one concept each: |logit|
        orders = score.argsort(dim=1, stable=True)[None]  # (1, N, G)
    else:
        generator = torch.Generator().manual_seed(seed)
        orders = torch.stack([torch.randperm(num_groups, generator=generator) for _ in range(trials)])
        orders = orders.to(device)[:, None]  # (T, 1, G)
    positions = torch.arange(num_groups, device=device).expand_as(orders)
    return torch.empty_like(orders).scatter_(-1, orders, positions)  # rank[t, b, order[t, b, j]] = j


def intervention_ranks(concept_logits: torch.Tensor, order: str = "random", seed: int = 0, trials: int = 1,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
    """When each concept is corrected: its group's rank (`group_ranks`), (T, 1, K) for T random orders or (1, N, K)
    per image for "uncertainty"; without `groups` each concept is its own group (rank of the concept itself). Concept
    i of image b is corrected at k when its rank is below k: every concept of a group in the same step."""
    groups = check_groups(groups, concept_logits.shape[1], concept_logits.device)
    return group_ranks(concept_logits, groups, order, seed, trials)[..., groups]  # (T or 1, 1 or N, K)


@torch.no_grad()
def intervention_curve(model: nn.Module, encoded: dict[str, torch.Tensor], concepts: torch.Tensor,
                       labels: torch.Tensor, ks: Iterable[int] | None = None, seed: int = 0,
                       values: str = "percentile",
                       percentiles: tuple[torch.Tensor, torch.Tensor] | None = None,
                       order: str = "random", trials: int = 1, groups: torch.Tensor | None = None
                       ) -> dict[str, Any]:
    """Task accuracy after correcting the first k concepts, or the first k groups of concepts given `groups` (K,)
    (see the module docstring), for each k (default 0 .. K, or 0 .. G).

    Returns {"k": [...], "acc": [...] (the mean over trials), "order": the concept indices (group ids with `groups`)
    in the order they are corrected (one random order; None when it varies: several trials, or per image by
    uncertainty), "trials", "values", "order_by" (the `order` argument), "groups": G, or None without `groups`}.
    One `decode` per k and trial over all images (vectorised over images and concepts)."""
    concept_logits = encoded["concept_logits"]  # (N, K)
    group_of = check_groups(groups, concepts.shape[1], concept_logits.device)  # (K,)
    by_group = group_ranks(concept_logits, group_of, order, seed, trials)  # (T, 1 or N, G)
    ranks = by_group[..., group_of]  # (T, 1 or N, K): each concept its group's rank
    replacement = replacement_values(concept_logits, concepts, values, percentiles)  # (N, K)
    ks = list(range(by_group.shape[-1] + 1)) if ks is None else [int(k) for k in ks]
    accuracy = []  # (k, T)
    for k in ks:
        per_trial = []
        for rank in ranks:  # (1 or N, K): a handful of trials at most
            intervene = (rank < k).expand_as(concepts)  # (N, K): the concepts of the first k groups of the order
            logits = model.decode(encoded, replacement, intervene)["logits"]
            per_trial.append((logits.argmax(-1) == labels).float().mean())
        accuracy.append(torch.stack(per_trial))
    single = order == "random" and trials == 1
    return {"k": ks, "acc": torch.stack(accuracy).mean(1).tolist(),
            "order": by_group[0, 0].argsort().tolist() if single else None, "trials": trials, "values": values,
            "order_by": order, "groups": None if groups is None else by_group.shape[-1]}


def write_intervention_report(curve: dict[str, list], folder: Path, name: str,
                              concept_names: list[str] | None = None) -> tuple[str, Any]:
    """`<name>.md` (k, accuracy, the concept, or the group for a curve by groups, corrected k-th when one order holds
    for every image) and `<name>.png` (accuracy vs k) in `folder`. `concept_names`: the names `order` indexes, the
    group names for a curve by groups (`concept_groups`). Returns the markdown and the matplotlib figure (for
    TensorBoard)."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    order, trials, num_groups = curve.get("order"), curve.get("trials", 1), curve.get("groups")
    unit = "concept" if num_groups is None else "group"
    lines = [f"| k | task accuracy | {unit} corrected k-th |", "| --- | --- | --- |"]
    if "values" in curve:  # what a corrected concept was set to, and in which order concepts were corrected
        closest = ("the concepts whose probability is closest to 0.5 first" if num_groups is None else
                   "the groups whose concepts' mean |logit| is smallest (probability closest to 0.5) first")
        how = (f"each image's own order, {closest}" if curve.get("order_by") == "uncertainty"
               else f"the mean over {trials} random orders" if trials > 1 else "one random order")
        values = "0 / 1" if curve["values"] == "hard" else "the 5th / 95th percentile logits"
        grouped = "" if num_groups is None else f"; k counts groups of concepts ({num_groups}), each corrected whole"
        lines.insert(0, f"Corrected concepts set to {values}; {how}{grouped}.\n")
    for k, acc in zip(curve["k"], curve["acc"]):
        item = order[k - 1] if k > 0 and order is not None else None  # a concept, or a group
        label = "-" if item is None else concept_names[item] if concept_names else str(item)
        lines.append(f"| {k} | {acc:.4f} | {label} |")
    markdown = "\n".join(lines) + "\n"
    (folder / f"{name}.md").write_text(markdown)
    figure = Figure(figsize=(4.5, 3.2), dpi=100, layout="constrained")
    ax = figure.subplots()
    ax.plot(curve["k"], curve["acc"], marker=".")
    ax.set_xlabel("concepts corrected (k)" if num_groups is None else "concept groups corrected (k)")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"test-time intervention ({name})")
    ax.grid(alpha=0.3)
    save_figure(figure, folder / f"{name}.png")
    return markdown, figure
