"""Concept bottleneck losses (Koh et al., ICML 2020): the task term and the concept term, kept apart so that stages
and modes choose what each part of the model learns from."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import check_weight, check_weights


class ConceptBottleneckLoss(nn.Module):
    """``{"loss_task": CE(logits, label), "loss_concept": weight * mean_i BCE(concept_logits_i, c_i)}``.

    Joint training sums both (the paper's L_y + lambda * sum_i L_ci, with the concept term averaged over concepts
    instead of summed, so lambda does not scale with K); independent and sequential training narrow the terms by
    what the System feeds f and by stages. `weight` 0 leaves the concept term out of the graph (a zero).

    Args:
        weight: lambda, the concept term's weight.
        concept_key: the batch field holding the true concepts (B, K) in {0, 1}; target_key: the labels' field.
        pos_weight: optional per-concept weight of positives (as `binary_cross_entropy_with_logits`'s), for rare
            concepts.
    """

    def __init__(self, weight: float = 1.0, concept_key: str = "attributes",
                 pos_weight: list[float] | None = None, target_key: str = "label") -> None:
        super().__init__()
        check_weight("ConceptBottleneckLoss", "weight", weight, "the concept BCE")
        check_weights("ConceptBottleneckLoss", "pos_weight", pos_weight, "the positives of its concept's BCE",
                      zero_off=False)  # one per concept (a list, tensor or array), or one for all
        self.weight, self.concept_key, self.target_key = weight, concept_key, target_key
        self.register_buffer("pos_weight", None if pos_weight is None else  # a copy: never the caller's tensor
                             torch.as_tensor(pos_weight, dtype=torch.float32).clone(), persistent=False)

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = {"loss_task": F.cross_entropy(out["logits"], batch[self.target_key])}
        if self.weight == 0:
            terms["loss_concept"] = out["logits"].new_zeros(())
        else:
            logits = out["concept_logits"].float()  # (B, K)
            bce = F.binary_cross_entropy_with_logits(logits, batch[self.concept_key].to(logits.dtype),
                                                     pos_weight=self.pos_weight)
            terms["loss_concept"] = self.weight * bce
        return terms
