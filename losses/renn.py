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

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import check_fraction, check_weight

Batch = dict[str, Any]


class ClassRule:
    """A rule for distillation: (batch, model output) -> (B, num_classes) truth of the rule for each candidate
    class y, in [0, 1]. Subclass it (so configs can name it by class_path) or pass any such callable in Python."""

    def __call__(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ReNNLoss(nn.Module):
    """ReNN's terms: `loss_task` (cross-entropy) and `loss_local` (per-step BCE of the pattern detectors against
    the batch's `patterns` annotations; positives up-weighted by `pos_weight`, as beats are rare steps).
    Which terms a training stage sums is set by the config's `stages:` (`zoo.engine.stages`). The annotation rows
    must be the model's patterns in the model's order: `zoo.renn.system.ReNNSystem` selects them by name."""

    def __init__(self, local_weight: float = 1.0, pos_weight: float = 10.0, patterns_key: str = "patterns",
                 target_key: str = "label") -> None:
        super().__init__()
        check_weight("ReNNLoss", "local_weight", local_weight, "the pattern detectors' BCE")
        check_weight("ReNNLoss", "pos_weight", pos_weight, "the annotated steps of the pattern BCE", zero_off=False)
        self.local_weight, self.patterns_key, self.target_key = local_weight, patterns_key, target_key
        # a constant of the config, not state: non-persistent, so checkpoints do not hold it (a System rebuilt by
        # `load_from_checkpoint` has its default loss, and a strict load would refuse an extra "loss.pos_weight")
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32).clone(),
                             persistent=False)

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        terms = {"loss_task": F.cross_entropy(out["logits"], batch[self.target_key])}
        if self.patterns_key in batch and "pattern_logits" in out:
            logits, annotations = out["pattern_logits"], batch[self.patterns_key]  # (B, K, T) each
            if logits.shape != annotations.shape:
                raise ValueError(f"The model detects {tuple(logits.shape)} (B, K, T) patterns but batch"
                                 f"[{self.patterns_key!r}] is {tuple(annotations.shape)}: the annotation rows must be "
                                 "the model's pattern_names in order (ReNNSystem selects them by the datamodule's "
                                 "pattern_names).")
            local = F.binary_cross_entropy_with_logits(logits.float(), annotations.float(), pos_weight=self.pos_weight)
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
        for index, value in enumerate(self.rule_weights):
            check_weight("LogicRuleDistillation", f"rule_weights[{index}]", value, "the teacher's penalty for "
                         "breaking that rule", zero_off=False)
        check_weight("LogicRuleDistillation", "strength", strength, "the teacher's rule penalty (C)")
        check_weight("LogicRuleDistillation", "weight", weight, "the distillation term (pi_t = weight * "
                     "min(pi_max, 1 - decay^t))")
        check_fraction("LogicRuleDistillation", "pi_max", pi_max, "the largest share pi_t of the distillation term "
                       "(the task term gets 1 - pi_t)")
        check_fraction("LogicRuleDistillation", "decay", decay, "the schedule's base (pi_t follows 1 - decay^t; "
                       "above 1 it is negative)")
        if weight * pi_max > 1:
            raise ValueError(f"LogicRuleDistillation weight={weight!r} with pi_max={pi_max!r}: pi_t reaches "
                             f"weight * pi_max = {weight * pi_max:g} > 1, and the task term, weighted 1 - pi_t, "
                             f"would be maximised. Give weight * pi_max <= 1 (weight 1 is Hu et al.'s schedule).")
        self.strength, self.pi_max, self.decay, self.target_key = strength, pi_max, decay, target_key
        self.weight, self.pi = weight, 0.0

    def set_epoch(self, epoch: int) -> dict[str, float]:
        self.pi = self.weight * min(self.pi_max, 1 - self.decay**epoch)
        return {"distill_pi": self.pi}

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        log_probs = F.log_softmax(out["logits"].float(), -1)  # (B, C)
        with torch.no_grad():
            values = [rule(batch, out) for rule in self.rules]
            for rule, value in zip(self.rules, values):
                if value.shape != log_probs.shape:
                    raise ValueError(f"Rule {type(rule).__name__} gives {tuple(value.shape)} (B, classes) truth values "
                                     f"for logits {tuple(log_probs.shape)}: the rule and the model must know the same "
                                     "classes (a rule built for another world or class count?).")
            teacher = rule_teacher(log_probs, values, self.rule_weights, self.strength)
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
    "loss_semantic"}. `constraint`: "exactly_one" (one class active), or the list of satisfying assignments, each
    a row of 0/1 (one per class), each listed once (a row listed twice would count its probability twice)."""

    def __init__(self, weight: float = 0.5, constraint: str | Sequence[Sequence[int]] = "exactly_one",
                 target_key: str = "label") -> None:
        super().__init__()
        check_weight("SemanticLoss", "weight", weight, "the semantic loss")
        self.weight, self.constraint, self.target_key = weight, constraint, target_key
        if isinstance(constraint, str):
            if constraint != "exactly_one":
                raise ValueError(f"constraint is 'exactly_one' or a list of 0/1 assignments; got {constraint!r}.")
            return
        # (S, n), from the config: non-persistent, as `ReNNLoss.pos_weight` (checkpoints hold state, not settings)
        self.register_buffer("assignments", check_assignments(constraint), persistent=False)

    def check_outputs(self, num_classes: int) -> None:
        """Refuse a constraint whose rows are not one 0/1 entry per class of a model of `num_classes` outputs, by
        name: the System calls this when built (`RuleLossSystem`), where `forward` found it only at the first batch,
        inside the fit's sanity check."""
        if not isinstance(self.constraint, str) and self.assignments.shape[1] != num_classes:
            raise ValueError(f"SemanticLoss's constraint has rows of {self.assignments.shape[1]} entries, but the "
                             f"model has num_classes={num_classes} outputs: give each satisfying assignment one 0/1 "
                             f"entry per class (rows of {num_classes}; model.init_args.loss.init_args.constraint), "
                             f"or constraint: exactly_one.")

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        logits = out["logits"].float()
        if self.constraint == "exactly_one":
            assignments = torch.eye(logits.shape[-1], device=logits.device)
        elif self.assignments.shape[1] != logits.shape[-1]:
            raise ValueError(f"The constraint's assignments have {self.assignments.shape[1]} entries each but the "
                             f"model has {logits.shape[-1]} outputs: give one 0/1 entry per class.")
        else:
            assignments = self.assignments
        return {"loss_task": F.cross_entropy(logits, batch[self.target_key]),
                "loss_semantic": self.weight * semantic_loss_with_logits(logits, assignments).mean()}


def check_assignments(constraint: Sequence[Sequence[int]]) -> torch.Tensor:
    """The satisfying assignments (S, n) as a float tensor, refused unless every entry is 0 or 1 and no row is
    listed twice (the semantic loss sums over distinct assignments)."""
    try:
        assignments = torch.as_tensor(constraint, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"constraint must be a list of equally long 0/1 rows ({err}).") from err
    if assignments.ndim != 2 or not len(assignments):
        raise ValueError(f"constraint must be a non-empty list of 0/1 rows (S, n); got shape "
                         f"{tuple(assignments.shape)}.")
    if not ((assignments == 0) | (assignments == 1)).all():
        values = sorted(set(assignments.flatten().tolist()))
        raise ValueError(f"constraint entries must be 0 or 1; got the values {values}.")
    rows = [tuple(int(v) for v in row) for row in assignments.tolist()]
    repeated = sorted({row for row in rows if rows.count(row) > 1})
    if repeated:
        raise ValueError(f"constraint lists assignment(s) {[list(r) for r in repeated]} more than once; list each "
                         "satisfying assignment once (a repeat would count its probability twice).")
    return assignments


class PartsWorldColourRule(ClassRule):
    """A parts_world rule read off the input: "the object is class y only if every colour of y's parts appears in
    the image" (soft: per colour, the best pixel's similarity exp(-|pixel - colour|^2 / sigma^2); AND over the
    class's colours). Distractor parts only add colours, so the rule is (softly) true for the right class.

    The world (which colours each class's parts have) and the images' normalisation are the datamodule's:
    `RuleLossSystem` calls `bind_data(datamodule)` in its data check (`check_data_settings`: before `train.py fit`
    moves an earlier run to stale/, and at the start of fit / validate / test), which takes its world
    definition (refusing by name a `num_classes` / `parts_per_class` / `world_seed` / `shared_part_types` given here
    that differs from the data's) and its mean / std (normalised images are mapped back to [0, 1] pixel values before
    the colours are compared). The arguments left None take the data's; unbound (plain Python), they default to
    `PartsWorldDataModule`'s (6 classes, 3 parts, world_seed 0, own part types) and unnormalised images."""

    WORLD_KEYS: ClassVar[tuple[str, ...]] = ("num_classes", "parts_per_class", "world_seed", "shared_part_types")
    DEFAULTS: ClassVar[dict[str, Any]] = {"num_classes": 6, "parts_per_class": 3, "world_seed": 0,
                                          "shared_part_types": False}

    def __init__(self, num_classes: int | None = None, parts_per_class: int | None = None,
                 world_seed: int | None = None, shared_part_types: bool | None = None, sigma: float = 0.35,
                 image_key: str = "image") -> None:
        from datamodules.parts_world import make_world

        self.requested = {"num_classes": num_classes, "parts_per_class": parts_per_class, "world_seed": world_seed,
                          "shared_part_types": shared_part_types}
        settings = {key: self.DEFAULTS[key] if value is None else value for key, value in self.requested.items()}
        self.sigma, self.image_key = sigma, image_key
        self.normalization: tuple[torch.Tensor, torch.Tensor] | None = None  # (3,) mean and std of the images
        self._use_world(make_world(**settings))

    def _use_world(self, world: Any) -> None:
        from datamodules.parts_world import COLOUR_VALUES, COLOURS

        colours = world.part_types % len(COLOURS)  # (C, P) colour id of each part
        self.class_colours = F.one_hot(colours, len(COLOURS)).amax(1).float()  # (C, n_colours)
        self.colour_values = COLOUR_VALUES

    def bind_data(self, datamodule: Any) -> None:
        """Take the datamodule's world definition and image normalisation (see the class docstring)."""
        world, settings = getattr(datamodule, "world", None), getattr(datamodule, "hparams", {})
        where = type(datamodule).__name__
        if world is None or not all(key in settings for key in self.WORLD_KEYS):
            raise ValueError(f"PartsWorldColourRule reads parts_world images; the data ({where}) has no parts_world "
                             f"definition (`world` and {list(self.WORLD_KEYS)}).")
        differ = {key: (value, settings[key]) for key, value in self.requested.items()
                  if value is not None and value != settings[key]}
        if differ:
            raise ValueError("PartsWorldColourRule was given a world the data does not have: "
                             + ", ".join(f"{key}={mine!r} (the data's {key}={theirs!r})"
                                         for key, (mine, theirs) in differ.items())
                             + ". Leave them out of the rule's init_args: it takes the datamodule's.")
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean == "pretrained":
            raise ValueError("PartsWorldColourRule: the data's mean ('pretrained') is not resolved yet; resolve it "
                             "(use_pretrained_normalization) before training.")
        self._use_world(world)
        self.normalization = None if mean is None else (torch.tensor(mean, dtype=torch.float32).expand(3).clone(),
                                                        torch.tensor(std, dtype=torch.float32).expand(3).clone())

    def tables_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The colour values (n_colours, 3), each class's required colours (C, n_colours) and, for normalised images,
        the mean and std (3,) on `device`, moved there once: a copy from the host every step would make the GPU wait.
        Never as inference tensors (a first call in Lightning's validation runs under `torch.inference_mode`)."""
        if self.class_colours.device != device or (self.normalization and self.normalization[0].device != device):
            with torch.inference_mode(False):
                self.colour_values, self.class_colours = self.colour_values.to(device), self.class_colours.to(device)
                if self.normalization is not None:
                    self.normalization = tuple(t.to(device) for t in self.normalization)
        return self.colour_values, self.class_colours, *(self.normalization or ())

    def __call__(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch[self.image_key][:, :3].float()  # (B, 3, H, W)
        colour_values, required, *normalization = (table.to(images) for table in self.tables_on(images.device))
        if normalization:  # back to [0, 1] pixel values, where the colours are defined
            mean, std = normalization
            images = images * std[:, None, None] + mean[:, None, None]
        distance = (images[:, None] - colour_values[None, :, :, None, None]).square().sum(2)  # (B, K, H, W)
        present = torch.exp(-distance / self.sigma**2).flatten(2).amax(-1)  # (B, n_colours)
        # prod over required colours of present_k: exp(sum_k required_ck * log present_k)
        return torch.exp(torch.log(present.clamp_min(1e-6)) @ required.T)  # (B, C)
