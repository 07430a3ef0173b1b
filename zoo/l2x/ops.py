"""L2X sampling math shared by the selector's forward pass and its loss (Chen et al., ICML 2018)."""

from __future__ import annotations

import math

import torch

_TINY = torch.finfo(torch.float32).tiny


def check_tau(tau: float) -> None:
    """Refuse a Concrete temperature that is not a finite number > 0 (0 divides by zero, NaN selects nothing)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau (the Concrete temperature) must be a finite number > 0; got {tau!r}.")


def concrete_k_subset(logits: torch.Tensor, k: int, tau: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Relaxed k-hot sample: V_i = max_j softmax((w + G_j) / tau)_i over k independent Gumbel draws G_j.

    Noise is drawn afresh on every call (every training step). As tau -> 0 each softmax is one-hot, so V is the
    indicator of up to k distinct features (k-hot when the draws pick distinct features), and each draw picks
    feature i with probability softmax(w)_i.

    Args:
        logits: (B, d) explainer scores w.
        k: number of draws (features to select).
        tau: Concrete temperature (0.1 tabular / images, 0.5 text in the authors' code).
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}] (the number of features); got {k}.")
    check_tau(tau)
    # torch.rand's own op, written as empty + uniform_ (the same numbers): dynamo cannot trace torch.rand of a
    # symbolic batch size, so a compiled step failed on the first batch of another size (an epoch's last).
    # Always float32, whatever the logits' dtype: under bf16 autocast the scorer's logits are bf16, and U drawn in
    # bf16 took ~1,400 distinct values (the largest Gumbel draw 5.5 instead of ~13), so the sample lost its tails.
    uniform = logits.new_empty((logits.shape[0], k, logits.shape[-1]), dtype=torch.float32).uniform_(
        generator=generator).clamp_min(_TINY)  # (B, k, d)
    neg_gumbel = torch.log(-torch.log(uniform))  # -G, G = -log(-log U) standard Gumbel noise
    samples = torch.softmax((logits.float().unsqueeze(1) - neg_gumbel) / tau, dim=-1)  # (B, k, d) w + G, float32
    return samples.amax(dim=1)  # (B, d)


def top_k_mask(scores: torch.Tensor, k: int, selectable: torch.Tensor | None = None) -> torch.Tensor:
    """Hard mask with exactly k ones per row at the k largest scores; ties go to the lower index. `selectable`
    (same shape, bool): only those features may be kept; a row with fewer than k of them (a text shorter than k
    words) keeps all of them and nothing else (never padding)."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in [1, {scores.shape[-1]}] (the number of features); got {k}.")
    if selectable is not None:
        scores = scores.masked_fill(~selectable, -torch.inf)
    # A stable descending sort keeps tied scores in index order, so exactly k are taken and deterministically.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores).scatter_(-1, order, 1.0)
    return mask if selectable is None else mask * selectable
