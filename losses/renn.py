"""Losses that embed rules: ReNN's task + local pattern loss, logic-rule distillation (Hu et al., ACL 2016) and the
semantic loss (Xu et al., ICML 2018). The last two work with any classifier in the zoo.

Distillation: the teacher q(y|x) ∝ p(y|x) exp(-C sum_l lambda_l (1 - r_l(x, y))) projects the student's
distribution onto the rules (r_l in [0, 1], soft logic), and the student learns from both the labels and the
teacher: (1 - pi_t) CE(y, p) + pi_t CE(q, p), pi_t = min(pi_max, 1 - k^t) with t the epoch. Unlike the public
code, every rule is counted once (the authors' loop adds the last rule's distribution a second time).

Semantic loss: -log P(constraint holds) for independent Bernoulli outputs p_i = sigmoid(logit_i), i.e.
-log sum over satisfying assignments s of prod_i p_i^{s_i} (1 - p_i)^{1 - s_i}; for "exactly one":
-log sum_i p_i prod_{j != i} (1 - p_j). Computed in log space from the logits (log p_i = logsigmoid(logit_i),
log(1 - p_i) = logsigmoid(-logit_i), a logsumexp over the assignments): from probabilities, sigmoid saturates to
exactly 0 or 1 in float32 once |logit| > ~17, and the loss would be wrong there with a zero gradient.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = dict[str, Any]


class ClassRule:
    """A rule for distillation: (batch, model output) -> (B, num_classes) truth of the rule for each candidate
    class y, in [0, 1]. Subclass it (so configs can name it by class_path) or pass any such callable in Python."""

    def __call__(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ReNNLoss(nn.Module):
    """ReNN's terms: `loss_task` (cross-entropy) and `loss_local` (per-step BCE of the pattern detectors against
    the batch's `patterns` annotations; positives up-weighted by `pos_weight`, as beats are rare steps).
    Which terms a training stage sums is set by the config's `stages:` (`zoo.engine.stages`)."""

    def __init__(self, local_weight: float = 1.0, pos_weight: float = 10.0, patterns_key: str = "patterns",
                 target_key: str = "label") -> None:
        super().__init__()
        self.local_weight, self.patterns_key, self.target_key = local_weight, patterns_key, target_key
        self.register_buffer("pos_weight", torch.tensor(pos_weight))

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        terms = {"loss_task": F.cross_entropy(out["logits"], batch[self.target_key])}
        if self.patterns_key in batch and "pattern_logits" in out:
            local = F.binary_cross_entropy_with_logits(out["pattern_logits"].float(), batch[self.patterns_key].float(),
                                                       pos_weight=self.pos_weight)
            terms["loss_local"] = self.local_weight * local
        return terms


def rule_teacher(log_probs: torch.Tensor, rule_values: Sequence[torch.Tensor], weights: Sequence[float],
                 strength: float) -> torch.Tensor:
    """q(y|x) ∝ p(y|x) exp(-C sum_l lambda_l (1 - r_l(x, y))), each rule counted once. (B, num_classes)."""
    penalty = sum(w * (1 - r) for w, r in zip(weights, rule_values))
    return torch.softmax(log_probs - strength * penalty, -1)


class LogicRuleDistillation(nn.Module):
    """Hu et al.'s iterative rule-knowledge distillation as a loss: {"loss_task", "loss_distill"}.

    Args:
        rules: callables (batch, out) -> (B, num_classes) rule truth per candidate class (e.g.
            `PartsWorldColourRule`).
        rule_weights: lambda_l (default 1 each).
        strength: C (6 in the paper's sentiment experiments).
        pi_max, decay: pi_t = weight * min(pi_max, 1 - decay^epoch).
        weight: 1 is Hu et al.'s schedule; 0 trains on the labels alone (the opaque twin, as `compare` expects).
    """

    def __init__(self, rules: Sequence[ClassRule], rule_weights: Sequence[float] | None = None,
                 strength: float = 6.0, pi_max: float = 0.95, decay: float = 0.95, weight: float = 1.0,
                 target_key: str = "label") -> None:
        super().__init__()
        self.rules = list(rules)
        self.rule_weights = list(rule_weights) if rule_weights is not None else [1.0] * len(self.rules)
        if len(self.rule_weights) != len(self.rules):
            raise ValueError(f"{len(self.rules)} rules but {len(self.rule_weights)} rule_weights.")
        self.strength, self.pi_max, self.decay, self.target_key = strength, pi_max, decay, target_key
        self.weight, self.pi = weight, 0.0

    def set_epoch(self, epoch: int) -> dict[str, float]:
        self.pi = self.weight * min(self.pi_max, 1 - self.decay**epoch)
        return {"distill_pi": self.pi}

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        log_probs = F.log_softmax(out["logits"].float(), -1)
        with torch.no_grad():
            teacher = rule_teacher(log_probs, [rule(batch, out) for rule in self.rules], self.rule_weights,
                                   self.strength)
        return {
            "loss_task": (1 - self.pi) * F.nll_loss(log_probs, batch[self.target_key]),
            "loss_distill": self.pi * -(teacher * log_probs).sum(-1).mean(),
        }


def semantic_loss_with_logits(logits: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """-log sum_s prod_i p_i^{s_i} (1 - p_i)^{1 - s_i} per sample (B,), p = sigmoid(logits) (B, n), over the
    satisfying 0/1 assignments s (S, n). Exact and with a useful gradient also where the sigmoids saturate."""
    return _negative_log_model_count(F.logsigmoid(logits), F.logsigmoid(-logits), assignments)


def semantic_loss(probs: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """`semantic_loss_with_logits` from probabilities (B, n), for callers that have no logits. Probabilities are
    clamped to [1e-7, 1 - 1e-7], so near-certain outputs saturate (wrong value, zero gradient): pass logits to
    `semantic_loss_with_logits` wherever they exist."""
    clamped = probs.clamp(1e-7, 1 - 1e-7)
    return _negative_log_model_count(torch.log(clamped), torch.log1p(-clamped), assignments)


def _negative_log_model_count(log_p: torch.Tensor, log_not_p: torch.Tensor, assignments: torch.Tensor
                              ) -> torch.Tensor:
    """-logsumexp_s [sum_i s_i log p_i + (1 - s_i) log(1 - p_i)]: (B, n), (B, n), (S, n) -> (B,). In float32 also
    under autocast (a half-precision matmul would round log-probabilities of -20 by ~0.1)."""
    with torch.autocast(log_p.device.type, enabled=False):
        log_p, log_not_p = log_p.float(), log_not_p.float()
        chosen = assignments.to(log_p)  # (S, n)
        log_world = log_p @ chosen.T + log_not_p @ (1 - chosen).T  # (B, S) log-probability of each assignment
        return -torch.logsumexp(log_world, -1)


class SemanticLoss(nn.Module):
    """Cross-entropy plus `weight` x the semantic loss of a constraint over sigmoid(logits): {"loss_task",
    "loss_semantic"}. `constraint`: "exactly_one" (one class active), or a list of satisfying 0/1 assignments."""

    def __init__(self, weight: float = 0.5, constraint: str | Sequence[Sequence[int]] = "exactly_one",
                 target_key: str = "label") -> None:
        super().__init__()
        self.weight, self.constraint, self.target_key = weight, constraint, target_key
        if constraint != "exactly_one":
            self.register_buffer("assignments", torch.as_tensor(constraint, dtype=torch.float32))

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        logits = out["logits"].float()
        assignments = (torch.eye(logits.shape[-1], device=logits.device) if self.constraint == "exactly_one"
                       else self.assignments)
        return {"loss_task": F.cross_entropy(logits, batch[self.target_key]),
                "loss_semantic": self.weight * semantic_loss_with_logits(logits, assignments).mean()}


class PartsWorldColourRule(ClassRule):
    """A parts_world rule read off the input: "the object is class y only if every colour of y's parts appears in
    the image" (soft: per colour, the best pixel's similarity exp(-|pixel - colour|^2 / sigma^2); AND over the
    class's colours). Distractor parts only add colours, so the rule is (softly) true for the right class.
    Built from the same world definition as the datamodule (`num_classes`, `parts_per_class`, `world_seed`)."""

    def __init__(self, num_classes: int = 6, parts_per_class: int = 3, world_seed: int = 0, sigma: float = 0.35,
                 image_key: str = "image") -> None:
        from datamodules.parts_world import COLOUR_VALUES, COLOURS, make_world

        world = make_world(num_classes, parts_per_class, world_seed)
        colours = world.part_types % len(COLOURS)  # (C, P) colour id of each part
        self.class_colours = F.one_hot(colours, len(COLOURS)).amax(1).float()  # (C, n_colours)
        self.colour_values, self.sigma, self.image_key = COLOUR_VALUES, sigma, image_key

    def tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The colour values (n_colours, 3) and each class's required colours (C, n_colours) on `device`, moved there
        once: a copy from the host every step would make the GPU wait. Never as inference tensors (a first call in
        Lightning's validation runs under `torch.inference_mode`)."""
        if self.class_colours.device != device:
            with torch.inference_mode(False):
                self.colour_values, self.class_colours = self.colour_values.to(device), self.class_colours.to(device)
        return self.colour_values, self.class_colours

    def __call__(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch[self.image_key][:, :3].float()  # (B, 3, H, W)
        colour_values, required = (table.to(images) for table in self.tables_on(images.device))  # (K, 3), (C, K)
        distance = (images[:, None] - colour_values[None, :, :, None, None]).square().sum(2)
        present = torch.exp(-distance / self.sigma**2).flatten(2).amax(-1)  # (B, n_colours)
        # prod over required colours of present_k: exp(sum_k required_ck * log present_k)
        return torch.exp(torch.log(present.clamp_min(1e-6)) @ required.T)  # (B, C)
