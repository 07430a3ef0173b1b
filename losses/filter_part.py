"""Interpretable CNN filter loss (Zhang, Wu & Zhu, CVPR 2018): part templates, the part mask, and -MI(X; T).

Templates (per n x n map, n = max(h, w)): one positive template per position mu,
``T_mu[i, j] = tau * max(1 - beta * ||[i, j] - mu||_1 / n, -1)``, and one negative ``T- = -tau``;
tau = 0.5 / n^2, beta = 4, priors p(T_mu) = alpha / n^2, p(T-) = 1 - alpha with alpha = n^2 / (1 + n^2).

The loss is the *exact* minus mutual information over the batch, differentiated by autograd (the paper's Eq. 4
is an approximation of this gradient; a test checks the two agree in direction). Labels enter as in the paper:
for filter f of category c_f, images of c_f are explained by the positive templates and all other images by T-,
i.e. ``Loss_f = -sum_x sum_{T in S(x)} p(T) p(x|T) log(p(x|T) / p(x))`` with S(x) = {T_mu} for positives and
{T-} for negatives, while ``p(x) = sum_T p(T) p(x|T)`` runs over every template. ``p(x|T) = exp(tr(x.T)) / Z_T``
with Z_T a data-set sum estimated online: ``Z_T = B * M_T``, M_T an exponential moving mean of exp(tr(x.T))
kept in log space (the current batch enters with its gradient, the running part detached). Everything is in log
space: no raw exp of a score, so large activations cannot overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from losses.classification import ClassificationLoss

MU_MODES = ("argmax", "centroid")


def template_shapes(height: int, width: int, beta: float | torch.Tensor = 4.0) -> torch.Tensor:
    """Unscaled positive templates max(1 - beta * L1 / n, -1) for every position mu: (h*w, h, w).

    `beta` may be a tensor of shape (F,) (learned per filter); the result is then (F, h*w, h, w).
    """
    n = max(height, width)
    rows = torch.arange(height, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32)
    mu_r, mu_c = torch.meshgrid(rows, cols, indexing="ij")
    distance = ((rows[None, :, None] - mu_r.reshape(-1, 1, 1)).abs()
                + (cols[None, None, :] - mu_c.reshape(-1, 1, 1)).abs())  # (h*w, h, w)
    beta = torch.as_tensor(beta, dtype=torch.float32)
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


def log_template_prior(num_positions: int, alpha: float | None = None) -> torch.Tensor:
    """log p(T): alpha / n^2 for each positive template, 1 - alpha for T-; alpha defaults to n^2 / (1 + n^2)."""
    alpha = num_positions / (1 + num_positions) if alpha is None else alpha
    return torch.tensor([math.log(alpha / num_positions)] * num_positions + [math.log(1 - alpha)])


def part_mask(x: torch.Tensor, beta: float | torch.Tensor = 4.0, mu: str = "argmax") -> torch.Tensor:
    """The mask max(1 - beta * ||[i,j] - mu_hat||_1 / n, -1) around each map's peak: (B, F, h, w).

    mu = "argmax" (paper) takes the strongest unit; "centroid" (authors' code) the activation-weighted centre.
    `beta` is a float or a per-filter tensor (F,).
    """
    batch, filters, height, width = x.shape
    n = max(height, width)
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


def filter_mutual_information(
    scores: torch.Tensor,
    positives: torch.Tensor,
    log_prior: torch.Tensor,
    log_mean_z: torch.Tensor,
) -> torch.Tensor:
    """Per-filter MI(X; T) of one batch, label-aware as in the module docstring.

    Args:
        scores: tr(x . T), (B, F, T) with T- last.
        positives: (B, F) bool, image b belongs to filter f's category.
        log_prior: log p(T), (T,).
        log_mean_z: log M_T with Z_T = B * M_T, (F, T).

    Returns:
        MI per filter, (F,).
    """
    log_p_x_given_t = scores - math.log(scores.shape[0]) - log_mean_z  # (B, F, T)
    log_joint = log_prior + log_p_x_given_t  # log p(T) p(x|T)
    log_p_x = torch.logsumexp(log_joint, -1, keepdim=True)  # (B, F, 1)
    support = torch.cat([positives[..., None].expand(*positives.shape, scores.shape[-1] - 1),
                         ~positives[..., None]], -1)  # (B, F, T)
    terms = log_joint.exp() * (log_p_x_given_t - log_p_x)  # p(T) p(x|T) log(p(x|T) / p(x))
    return (terms * support).sum((0, 2))


class FilterPartLoss(nn.Module):
    """The ICNN objective: the task term plus lambda * mean over interpretable filters of -MI(X; T).

    The MI is taken on the maps *before* the part mask. Reads from the model output (see `zoo.icnn`), one entry per
    interpretable layer: "template_scores" (B, F, T), "log_mean_z" (F, T, the online Z_T blended with this batch)
    and "filter_category" (F,).

    Args:
        weight: lambda at epoch 0; 0 turns the filter term off, which is exactly the opaque twin's objective.
        schedule: "inverse_epoch" (paper: lambda / (epoch + 1)) or "constant".
        alpha: prior mass of the positive templates (default n^2 / (1 + n^2)).
        task_loss: the task term (default cross-entropy, "loss_task").
    """

    def __init__(self, weight: float = 1.0, schedule: str = "inverse_epoch", alpha: float | None = None,
                 task_loss: nn.Module | None = None) -> None:
        super().__init__()
        if schedule not in ("inverse_epoch", "constant"):
            raise ValueError(f"schedule must be 'inverse_epoch' or 'constant'; got {schedule!r}.")
        self.base_weight, self.schedule, self.alpha = weight, schedule, alpha
        self.weight = weight
        self.task_loss = task_loss if task_loss is not None else ClassificationLoss()

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """Apply the lambda schedule; returns what to log."""
        self.weight = self.base_weight / (epoch + 1) if self.schedule == "inverse_epoch" else self.base_weight
        return {"lambda_filter": self.weight}

    def mutual_information(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        """MI per interpretable filter, all layers concatenated: (sum F_l,)."""
        per_layer = []
        for scores, log_mean_z, category in zip(out["template_scores"], out["log_mean_z"], out["filter_category"]):
            prior = log_template_prior(scores.shape[-1] - 1, self.alpha).to(scores.device)
            positives = labels[:, None] == category[None, :]  # (B, F)
            per_layer.append(filter_mutual_information(scores, positives, prior, log_mean_z))
        return torch.cat(per_layer)

    def forward(self, out: dict, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = dict(self.task_loss(out, batch))
        if self.weight == 0:  # the opaque twin: no filter term in the graph
            terms["loss_filter"] = out["logits"].new_zeros(())
        else:
            terms["loss_filter"] = -self.weight * self.mutual_information(out, batch["label"]).mean()
        return terms
