"""Losses of the textual explanation heads (Hendricks et al. 2016).

Relevance: per-word cross-entropy under teacher forcing, padding ignored. Discriminative: REINFORCE on sampled
sentences, -(R - b) sum_t log p(w_t), with R the frozen sentence classifier's probability of the true class and b a
moving-average baseline (without one the gradient's variance stalls training, as the public port's issues show);
log-probabilities after the sampled end token are already 0 (`FactoredLSTMGenerator.decode`). `TextualLoss` is
the System's loss: both terms, the discriminative one only when the output holds sampled sentences.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import check_fraction, check_weight
from zoo.distributed import all_reduce_


class RelevanceLoss(nn.Module):
    """{"loss_relevance": weight x CE(logits (B, L-1, V), tokens[:, 1:])}, padding (`pad`) ignored: the sum over
    target words divided by their count. A batch without any target word (every picked reference all padding) gives
    0, still a function of the logits (zero gradient), where the mean over no words was NaN and stopped training
    under nonfinite_loss="raise"."""

    def __init__(self, weight: float = 1.0, pad: int = 0, tokens_key: str = "tokens") -> None:
        super().__init__()
        check_weight("RelevanceLoss", "weight", weight, "the word cross-entropy")
        self.weight, self.pad, self.tokens_key = weight, pad, tokens_key

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, targets = out["word_logits"], batch[self.tokens_key][:, 1:]
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                ignore_index=self.pad, reduction="sum")
        count = (targets != self.pad).sum().clamp(min=1)  # on the device: no sync
        return {"loss_relevance": self.weight * total / count}


class DiscriminativeLoss(nn.Module):
    """{"loss_discriminative": weight x mean over sentences of -(R - b) sum_t log p(w_t)}; b follows the batch mean
    reward with `momentum` (updated in training mode only; under DDP the mean over every rank's batch, so all ranks
    keep one baseline)."""

    def __init__(self, weight: float = 0.2, momentum: float = 0.9) -> None:
        super().__init__()
        check_weight("DiscriminativeLoss", "weight", weight, "the REINFORCE term")
        check_fraction("DiscriminativeLoss", "momentum", momentum, "the previous baseline's share in the moving "
                       "average of the rewards (outside [0, 1] the baseline runs away from them)")
        self.weight, self.momentum = weight, momentum
        self.register_buffer("baseline", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        reward = out["reward"].detach().float()  # (B,)
        if self.training:
            count = reward.new_full((), len(reward))  # filled on the device: no copy from the host
            totals = all_reduce_(torch.stack([reward.sum(), count]))  # (sum, count)
            mean = totals[0] / totals[1]
            self.baseline.copy_(torch.where(self.seen, self.momentum * self.baseline + (1 - self.momentum) * mean,
                                            mean))
            self.seen.fill_(True)
        advantage = reward - self.baseline
        sentence_log_prob = out["sample_log_probs"].sum(1)  # (B,), 0 after each sentence's end token
        return {"loss_discriminative": self.weight * -(advantage * sentence_log_prob).mean()}


class TextualLoss(nn.Module):
    """{"loss_relevance", "loss_discriminative"}: teacher-forced CE on out["tokens"] (the sentence fed to the model),
    plus REINFORCE when `out` holds a sampled sentence's "reward" and "sample_log_probs" (the System samples only
    when `samples_needed` and the current stage sums the term)."""

    def __init__(self, relevance_weight: float = 1.0, discriminative_weight: float = 0.0, momentum: float = 0.9,
                 pad: int = 0) -> None:
        super().__init__()
        check_weight("TextualLoss", "relevance_weight", relevance_weight, "the word cross-entropy")
        check_weight("TextualLoss", "discriminative_weight", discriminative_weight, "the REINFORCE term")
        self.relevance = RelevanceLoss(relevance_weight, pad)
        self.discriminative = DiscriminativeLoss(discriminative_weight, momentum)

    @property
    def samples_needed(self) -> bool:
        return self.discriminative.weight > 0

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = self.relevance(out, out)
        return terms | self.discriminative(out, batch) if "reward" in out else terms
