"""Amortised feature selection: L2X's Concrete k-subset relaxation and exact top-k, and the losses of the
L2X and INVASE selectors.

L2X (Chen et al., ICML 2018) maximises a variational lower bound on I(X_S; Y): the approximator's cross-entropy
against the *black box's* class probabilities on the relaxed-selected input. INVASE (Yoon et al., ICLR 2019)
samples a Bernoulli selection per feature and trains the selector by REINFORCE with the critic-minus-baseline
cross-entropy as reward, so the number of selected features varies per instance. The frozen helpers are trained
first (`zoo.engine.Auxiliary`): the black box by `LabelCrossEntropy`, the EVAL-X evaluator (Jethani et al. 2021)
by `RandomMaskCrossEntropy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import check_weight


def soft_target_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over samples of -sum_y p(y) log softmax(logits)_y."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


class L2XLoss(nn.Module):
    """L2X's variational objective: cross-entropy of the approximator on the selected input against the frozen
    black box's probabilities (batch key `teacher_probs`), not the labels. Returns {"loss_l2x"}."""

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss_l2x": soft_target_cross_entropy(out["logits"], batch["teacher_probs"])}


class INVASELoss(nn.Module):
    """INVASE's three terms against the black box's probabilities (batch key `teacher_probs`).

    critic: CE of the critic on x * s; baseline: CE of the baseline on x; actor: REINFORCE with reward
    -(CE_critic - CE_baseline) per sample, plus `sparsity` * mean selection probability (lambda = 0.1 in the paper).
    """

    def __init__(self, sparsity: float = 0.1) -> None:
        super().__init__()
        self.sparsity = check_weight("INVASELoss", "sparsity", sparsity, "the mean selection probability")

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = batch["teacher_probs"]
        critic_ce = -(target * F.log_softmax(out["logits"], -1)).sum(-1)  # (B,)
        baseline_ce = -(target * F.log_softmax(out["baseline_logits"], -1)).sum(-1)  # (B,)
        reward = -(critic_ce - baseline_ce).detach()  # (B,) higher when the selection keeps the information
        probs, selection = out["selection_probs"], out["selection"].detach()
        log_likelihood = (selection * torch.log(probs + 1e-8) + (1 - selection) * torch.log(1 - probs + 1e-8)).sum(-1)
        return {
            "loss_critic": critic_ce.mean(),
            "loss_baseline": baseline_ce.mean(),
            "loss_actor": -(reward * log_likelihood).mean() + self.sparsity * probs.mean(),
        }


@dataclass
class LabelCrossEntropy:
    """An auxiliary's batch loss (`zoo.engine.Auxiliary.loss`): cross-entropy of `module(batch[input_key])` against
    the labels. Trains the black box."""

    input_key: str
    target_key: str

    def __call__(self, module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(module(batch[self.input_key])["logits"], batch[self.target_key])


@dataclass
class RandomMaskCrossEntropy(LabelCrossEntropy):
    """Cross-entropy on inputs whose features are each kept with probability 0.5 (`mask_input(x, keep)`, keep
    (B, num_features) in {0, 1}): trains the EVAL-X evaluator, which then scores any selection without having
    co-adapted with the selector."""

    mask_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_features: int

    def __call__(self, module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        x = batch[self.input_key]
        keep = torch.rand(len(x), self.num_features, device=x.device).round()  # (B, d) Bernoulli(0.5)
        return super().__call__(module, {**batch, self.input_key: self.mask_input(x, keep)})
