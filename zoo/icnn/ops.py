"""Interpretable CNN math shared by the model's forward pass and the filter loss: part templates, the part mask and
template scores (Zhang, Wu & Zhu, CVPR 2018). See `losses.icnn` for the loss and the paper's definitions."""

from __future__ import annotations

import math

import torch

MU_MODES = ("argmax", "centroid")


def template_shapes(height: int, width: int, beta: float | torch.Tensor = 4.0) -> torch.Tensor:
    """Unscaled positive templates max(1 - beta * L1 / n, -1) for every position mu: (h*w, h, w).

    `beta` may be a tensor of shape (F,) (learned per filter); the result is then (F, h*w, h, w).
    """
    n = max(height, width)
    device = beta.device if isinstance(beta, torch.Tensor) else None
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    mu_r, mu_c = torch.meshgrid(rows, cols, indexing="ij")
    distance = ((rows[None, :, None] - mu_r.reshape(-1, 1, 1)).abs()
                + (cols[None, None, :] - mu_c.reshape(-1, 1, 1)).abs())  # (h*w, h, w)
    beta = torch.as_tensor(beta, dtype=torch.float32, device=device)
    if beta.ndim == 1:
        return (1 - beta[:, None, None, None] * distance / n).clamp(min=-1)  # (F, h*w, h, w)
    return (1 - beta * distance / n).clamp(min=-1)


def template_bank(height: int, width: int, beta: float = 4.0, tau_scale: float = 1.0) -> torch.Tensor:
    """All n^2 + 1 templates scaled by tau = tau_scale * 0.5 / n^2, positives first then T-: (h*w + 1, h*w).

    tau_scale = 1 is the paper. tau sets how sharply p(x|T) separates images; the paper's value suits VGG conv5
    activations (tens to hundreds), while batch-normalised maps peak around 1-5 and need tau_scale ~ 10-100 for
    the MI to be more than ~1e-4 nats.
    """
    tau = tau_scale * 0.5 / max(height, width) ** 2
    positives = tau * template_shapes(height, width, beta).flatten(1)  # (h*w, h*w)
    return torch.cat([positives, torch.full((1, height * width), -tau)])


def part_mask(x: torch.Tensor, beta: float | torch.Tensor = 4.0, mu: str = "argmax",
              table: torch.Tensor | None = None) -> torch.Tensor:
    """The mask max(1 - beta * ||[i,j] - mu_hat||_1 / n, -1) around each map's peak: (B, F, h, w).

    mu = "argmax" (paper) takes the strongest unit; "centroid" (authors' code) the activation-weighted centre.
    `beta` is a float or a per-filter tensor (F,). `table` (h*w, h*w), a row per peak position computed once for
    one beta shared by every filter (`template_shapes(h, w, beta).flatten(1)`, the same values, or its non-negative
    part), makes the argmax mask one row lookup per map.
    """
    batch, filters, height, width = x.shape
    n = max(height, width)
    if mu == "argmax" and table is not None:
        return table[x.detach().flatten(2).argmax(-1)].view(x.shape).to(x.dtype)  # (B, F, h*w) rows -> (B, F, h, w)
    if mu == "argmax":
        peak = x.detach().flatten(2).argmax(-1)  # (B, F)
        mu_r, mu_c = (peak // width).float(), (peak % width).float()
    elif mu == "centroid":
        weights = x.detach().clamp(min=0)
        total = weights.sum((2, 3)).clamp(min=1e-12)  # (B, F)
        rows = torch.arange(height, dtype=x.dtype, device=x.device)
        cols = torch.arange(width, dtype=x.dtype, device=x.device)
        mu_r = (weights.sum(3) * rows).sum(-1) / total
        mu_c = (weights.sum(2) * cols).sum(-1) / total
    else:
        raise ValueError(f"mu must be one of {MU_MODES}; got {mu!r}.")
    rows = torch.arange(height, device=x.device, dtype=torch.float32)
    cols = torch.arange(width, device=x.device, dtype=torch.float32)
    distance = ((rows[:, None] - mu_r[..., None, None]).abs()
                + (cols[None, :] - mu_c[..., None, None]).abs())  # (B, F, h, w)
    beta = torch.as_tensor(beta, device=x.device, dtype=torch.float32)
    beta = beta[:, None, None] if beta.ndim == 1 else beta
    return (1 - beta * distance / n).clamp(min=-1).to(x.dtype)


def template_scores(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """tr(x . T) for every image, filter and template: x (B, F, h, w), bank (T, h*w) -> (B, F, T).

    Always at least float32, also under bf16/fp16 autocast: the scores feed exponentials.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.flatten(2).to(dtype) @ bank.t().to(dtype)


def log_mean_exp_over_batch(scores: torch.Tensor) -> torch.Tensor:
    """log mean_x exp(tr(x.T)) over the batch: (B, F, T) -> (F, T)."""
    return torch.logsumexp(scores, 0) - math.log(scores.shape[0])
