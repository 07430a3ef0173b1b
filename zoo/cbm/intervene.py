"""Test-time intervention (Koh et al. 2020, Sec. 6): a person corrects the first k concepts, the model re-predicts.

The concepts are corrected in one random order (fixed seed), the same for every image, k = 0 .. K. A corrected
concept's probability becomes the truth: "percentile" (the paper, for sigmoid bottlenecks) sets its logit to the
5th percentile of that concept's predicted logits when absent and the 95th when present; "hard" sets the
probability to 0 / 1 (CEM's interventions). Departs: the percentiles are taken over the evaluated data, not the
training set, unless `percentiles` are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from zoo.figures import save_figure

VALUES = ("percentile", "hard")


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
    truth = concepts.bool()
    if values == "hard":
        return truth.float()
    low, high = percentiles if percentiles is not None else torch.quantile(
        concept_logits.float(), torch.tensor([0.05, 0.95], device=concept_logits.device), dim=0)  # (K,) each
    return torch.sigmoid(torch.where(truth, high, low))  # (N, K)


@torch.no_grad()
def intervention_curve(model: nn.Module, encoded: dict[str, torch.Tensor], concepts: torch.Tensor,
                       labels: torch.Tensor, ks: Iterable[int] | None = None, seed: int = 0,
                       values: str = "percentile",
                       percentiles: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, list]:
    """Task accuracy after correcting the first k concepts of one random order, for each k (default 0 .. K).

    Returns {"k": [...], "acc": [...], "order": concept indices in the order they are corrected}. One `decode`
    per k over all images (a loop over k, vectorised over images and concepts)."""
    num_concepts = concepts.shape[1]
    order = torch.randperm(num_concepts, generator=torch.Generator().manual_seed(seed)).to(concepts.device)  # (K,)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(num_concepts, device=concepts.device))
    replacement = replacement_values(encoded["concept_logits"], concepts, values, percentiles)  # (N, K)
    ks = list(range(num_concepts + 1)) if ks is None else [int(k) for k in ks]
    accuracy = []
    for k in ks:
        intervene = (rank < k)[None].expand_as(concepts)  # (N, K): the first k concepts of the order
        logits = model.decode(encoded, replacement, intervene)["logits"]
        accuracy.append((logits.argmax(-1) == labels).float().mean())
    return {"k": ks, "acc": torch.stack(accuracy).tolist(), "order": order.tolist()}


def write_intervention_report(curve: dict[str, list], folder: Path, name: str,
                              concept_names: list[str] | None = None) -> tuple[str, Any]:
    """`<name>.md` (k, accuracy, the concept corrected k-th) and `<name>.png` (accuracy vs k) in `folder`.
    Returns the markdown and the matplotlib figure (for TensorBoard)."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["| k | task accuracy | concept corrected k-th |", "| --- | --- | --- |"]
    for k, acc in zip(curve["k"], curve["acc"]):
        concept = curve["order"][k - 1] if k > 0 else None
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
