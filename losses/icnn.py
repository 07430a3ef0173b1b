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

from losses import check_weight
from losses.baselines import ClassificationLoss
from zoo.layers import cached_constant


def log_template_prior(num_positions: int, alpha: float | None = None, device: torch.device | None = None
                       ) -> torch.Tensor:
    """log p(T): alpha / n^2 for each positive template, 1 - alpha for T-; alpha defaults to n^2 / (1 + n^2).
    Built on `device` (no host tensor copied in every step)."""
    alpha = num_positions / (1 + num_positions) if alpha is None else alpha
    return torch.cat([torch.full((num_positions,), math.log(alpha / num_positions), device=device),
                      torch.full((1,), math.log(1 - alpha), device=device)])


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
    shift = log_prior - math.log(scores.shape[0]) - log_mean_z  # (F, T): log p(T) - log Z_T
    log_joint = scores + shift  # log p(T) p(x|T), (B, F, T)
    log_posterior = torch.log_softmax(log_joint, -1)  # log p(T|x) = log p(T) p(x|T) - log p(x): one fused kernel
    terms = log_joint.exp() * (log_posterior - log_prior)  # p(T) p(x|T) log(p(x|T) / p(x))
    support = positives[..., None] != _is_negative_template(scores.shape[-1], scores.device)  # (B, F, T): S(x)
    return (terms * support).sum((0, 2))


@cached_constant
def _is_negative_template(num_templates: int, device: torch.device) -> torch.Tensor:
    """(T,) bool, True at T- (the last template). Once per template count and device."""
    return torch.arange(num_templates, device=device) == num_templates - 1


class FilterPartLoss(nn.Module):
    """The ICNN objective: the task term plus lambda * mean over interpretable filters of -MI(X; T).

    The MI is taken on the maps *before* the part mask. Reads from the model output (see `zoo.icnn`), one entry per
    interpretable layer: "template_scores" (B, F, T), "log_mean_z" (F, T, the online Z_T blended with this batch)
    and "filter_category" (F,).

    The categories and the running Z_T are the model's statistics, which this loss only reads: they move only when
    `model.update_statistics(out, batch)` is called after each training forward (`ICNNSystem` does; the forward
    and this loss never do). A plain PyTorch loop must call it itself, before the loss, or every filter is scored
    as a part detector of class 0 and Z_T is only the current batch's (an eager model warns once if it never is)::

        loss_fn = FilterPartLoss()
        for epoch in range(epochs):
            loss_fn.set_epoch(epoch)  # the lambda schedule
            for batch in loader:
                out = model(batch["image"])
                model.update_statistics(out, batch)  # categories and Z_T; `target_key` if the labels are not "label"
                loss = sum(loss_fn(out, batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    Args:
        weight: lambda at epoch 0; 0 turns the filter term off, which is exactly the opaque twin's objective.
        schedule: "inverse_epoch" (paper: lambda / (epoch + 1)) or "constant".
        alpha: prior mass of the positive templates, in (0, 1) (default n^2 / (1 + n^2)); checked here, not when
            the first step takes its log.
        task_loss: the task term (default cross-entropy, "loss_task").
        target_key: the batch field of the labels (the default task term reads it too).
    """

    def __init__(self, weight: float = 1.0, schedule: str = "inverse_epoch", alpha: float | None = None,
                 task_loss: nn.Module | None = None, target_key: str = "label") -> None:
        super().__init__()
        if schedule not in ("inverse_epoch", "constant"):
            raise ValueError(f"schedule must be 'inverse_epoch' or 'constant'; got {schedule!r}.")
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha < 1):  # NaN fails too
            raise ValueError(f"FilterPartLoss alpha (the prior mass of the positive templates; T- gets 1 - alpha, "
                             f"and the loss takes the log of both) must be strictly between 0 and 1; got "
                             f"alpha={alpha!r}. Leave it unset for the paper's n^2 / (1 + n^2), or give a value in "
                             f"(0, 1) such as 0.5.")
        check_weight("FilterPartLoss", "weight", weight, "the filter loss -MI(X; T)")
        self.base_weight, self.schedule, self.alpha = weight, schedule, alpha
        self.weight = weight
        self._priors: dict[tuple[int, torch.device], torch.Tensor] = {}  # log p(T) per (templates, device)
        self.task_loss = task_loss if task_loss is not None else ClassificationLoss(target_key=target_key)
        self.target_key = target_key

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """Apply the lambda schedule; returns what to log."""
        self.weight = self.base_weight / (epoch + 1) if self.schedule == "inverse_epoch" else self.base_weight
        return {"lambda_filter": self.weight}

    def mutual_information(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        """MI per interpretable filter, all layers concatenated: (sum F_l,)."""
        per_layer = []
        for scores, log_mean_z, category in zip(out["template_scores"], out["log_mean_z"], out["filter_category"]):
            key = (scores.shape[-1] - 1, scores.device)
            if key not in self._priors:  # built once per template count and device, not in every step
                self._priors[key] = log_template_prior(*key[:1], self.alpha, scores.device)
            prior = self._priors[key]
            positives = labels[:, None] == category[None, :]  # (B, F)
            per_layer.append(filter_mutual_information(scores, positives, prior, log_mean_z))
        return torch.cat(per_layer)

    def forward(self, out: dict, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = dict(self.task_loss(out, batch))
        if self.weight == 0:  # the opaque twin: no filter term in the graph
            terms["loss_filter"] = out["logits"].new_zeros(())
        else:
            terms["loss_filter"] = -self.weight * self.mutual_information(out, batch[self.target_key]).mean()
        return terms
