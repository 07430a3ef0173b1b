"""ReNN: Rule-embedded Neural Network (Hu Wang, ICPR 2018, arXiv 1801.09856), and the soft-logic rules API.

The paper states the architecture in outline only (no public code): local inference detects local patterns,
domain-knowledge rules over those patterns produce a "rule-modulated map", and a global inference combines the
patterns with the rule map; training is two-stage. This file is a faithful reading of that outline:

    x (B, C, T) -> local detectors g (1-D CNN, small receptive field) -> patterns L (B, K, T) in [0, 1]
                -> rule layer R (user rules in soft logic, no parameters) -> rule map M (B, R, T) in [0, 1]
                -> global inference h([L; M]) (1x1 conv, max + mean over time, linear) -> logits
Long-range dependencies (a pause 30-40 steps after a beat, how often a pattern occurs) are carried by the rules,
not learnt by the network. Stages (local loss on pattern annotations; then h with g frozen; optionally joint) are
run by the engine's stage mechanism (`stages:` of `zoo.renn.system.ReNNSystem`, `zoo.engine.stages`).

Rules API: a rule maps {pattern name: (B, T) probabilities} to a (B, T) truth map, in soft logic (product
t-norm: a AND b = ab, a OR b = a + b - ab, NOT a = 1 - a) with temporal predicates computed by prefix sums
(no loop over time):

    beat = Pattern("normal_beat") | Pattern("premature_beat")
    pause_after_premature = NotFollowedBy(Pattern("premature_beat"), beat, within=(4, 26))
    frequent = CountAtLeast(Pattern("premature_beat"), 4)          # over the whole series
    register_rule("my_rule", pause_after_premature & ~frequent)    # then name it in YAML: rules: [my_rule]

A config run by train.py names a rule of the user's own module as "module:attr" (or "module.attr"): the module is
imported (which may register its rules) and the Rule object `attr` is used, registered under that name if it was not
registered already; a checkpoint stores that name, so loading it imports the module again.
"""

from __future__ import annotations

import importlib
import json
import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.backbones import like
from zoo.checks import check_input, check_new_head, close_names
from zoo.layers import cached_constant
from zoo.registry import register_model

Patterns = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ soft logic
def window_sum(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """out[..., t] = sum of values[..., s] for s in [t + low, t + high], steps outside the series count as 0.

    On a GPU one convolution with a ones kernel (one kernel forward, one backward and the slice's); on a CPU, where
    a one-channel convolution is slow, the difference of two slices of the zero-padded series' prefix sums."""
    if low > high:
        raise ValueError(f"window (low={low}, high={high}) is empty.")
    return (prefix_window_sum if values.device.type == "cpu" else conv_window_sum)(values, low, high)


def conv_window_sum(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """`window_sum` as a convolution over the zero-padded series, in the values' own dtype also under autocast."""
    length = values.shape[-1]
    pad = max(high, -low, 0)  # both window ends fall inside the padded series
    kernel = _ones_kernel(high - low + 1, values.device, values.dtype)  # (1, 1, W)
    with torch.autocast(values.device.type, enabled=False):
        sums = F.conv1d(values.reshape(-1, 1, length), kernel, padding=pad)  # (N, 1, T + 2 pad - W + 1)
    return sums[..., low + pad: low + pad + length].reshape(values.shape)  # out[t] = sums[t + low + pad]


def prefix_window_sum(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """`window_sum` as prefix[t + high] - prefix[t + low - 1] over the series zero-padded at both ends: two slices,
    no gather."""
    length = values.shape[-1]
    pad = max(high, -low, 0) + 1
    prefix = F.pad(values, (pad, pad)).cumsum(-1)  # (..., T + 2 pad): prefix[pad + s] = sum of values[:s + 1]
    return prefix[..., pad + high: pad + high + length] - prefix[..., pad + low - 1: pad + low - 1 + length]


@cached_constant
def _ones_kernel(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, width) ones: the window's convolution kernel, once per width, device and dtype."""
    return torch.ones(1, 1, width, device=device, dtype=dtype)


def exists_within(p: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Soft "some step s in [t + low, t + high] has the pattern": 1 - prod_s (1 - p_s)."""
    return 1 - absent_within(p, low, high)


def absent_within(p: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Soft "no step s in [t + low, t + high] has the pattern": prod_s (1 - p_s), via a sum of logs."""
    return torch.exp(window_sum(torch.log1p(-p.clamp(max=1 - 1e-6)), low, high))


def local_peaks(p: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """p where it is the maximum of its (2 radius + 1)-step neighbourhood, 0 elsewhere (gradient flows through p):
    a detector's probability spread over neighbouring steps counts as one occurrence. Ties go to the first step:
    a step is kept only if it is >= every step in [t, t + radius] and > every step in [t - radius, t - 1], so a
    plateau (e.g. saturated sigmoids at 1.0 on neighbouring steps) is one peak, not one per step."""
    if radius < 1:
        return p
    length = p.shape[-1]
    padded = F.pad(p.reshape(-1, 1, length), (radius, radius), value=-torch.inf)  # (N, 1, T + 2 radius)
    # padded[t + radius] = p[t]: the max over [t - radius, t - 1], and over [t, t + radius]
    before = F.max_pool1d(padded, radius, stride=1)[..., :length].reshape(p.shape)
    ahead = F.max_pool1d(padded[..., radius:], radius + 1, stride=1).reshape(p.shape)
    return p.masked_fill((p < ahead) | (p <= before), 0.0)


class Rule:
    """A soft-logic rule over pattern maps; compose with &, |, ~ and the temporal predicates below."""

    name: str = ""

    def __call__(self, patterns: Patterns) -> torch.Tensor:  # (B, T) in [0, 1]
        raise NotImplementedError

    def __and__(self, other: "Rule") -> "Rule":
        return And(self, other)

    def __or__(self, other: "Rule") -> "Rule":
        return Or(self, other)

    def __invert__(self) -> "Rule":
        return Not(self)


def rule_patterns(rule: Any) -> list[str]:
    """The pattern names `rule` reads: those of every `Pattern` in its tree, found through the attributes of each rule
    (And's `rules`, FollowedBy's `first` and `then`, a user's Rule subclass holding sub-rules in attributes, lists,
    tuples or dicts), in order of appearance. A rule class that reads `patterns["name"]` in its own code without a
    `Pattern` is not seen (its KeyError comes at the first forward, naming the pattern)."""
    found: dict[str, None] = {}
    seen: set[int] = set()

    def walk(node: Any) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Pattern):
            found[node.pattern] = None
        elif isinstance(node, Rule):
            for value in getattr(node, "__dict__", {}).values():  # a class with __slots__: none seen
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(rule)
    return list(found)


class Pattern(Rule):
    """The detector's probability of pattern `name` at each step."""

    def __init__(self, name: str) -> None:
        self.pattern = name

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        if self.pattern not in patterns:
            raise KeyError(f"Rule uses pattern {self.pattern!r}; the model detects {sorted(patterns)}.")
        return patterns[self.pattern]

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"


class And(Rule):
    """Product t-norm: a * b * ..."""

    def __init__(self, *rules: Rule) -> None:
        self.rules = rules

    def __repr__(self) -> str:
        return f"And({', '.join(map(repr, self.rules))})"

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        out = self.rules[0](patterns)
        for rule in self.rules[1:]:
            out = out * rule(patterns)
        return out


class Or(Rule):
    """Probabilistic sum: 1 - (1 - a)(1 - b)..."""

    def __init__(self, *rules: Rule) -> None:
        self.rules = rules

    def __repr__(self) -> str:
        return f"Or({', '.join(map(repr, self.rules))})"

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        absent = 1 - self.rules[0](patterns)
        for rule in self.rules[1:]:
            absent = absent * (1 - rule(patterns))
        return 1 - absent


class Not(Rule):
    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def __repr__(self) -> str:
        return f"Not({self.rule!r})"

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        return 1 - self.rule(patterns)


class Implies(Rule):
    """Reichenbach implication: 1 - a + a b."""

    def __init__(self, premise: Rule, conclusion: Rule) -> None:
        self.premise, self.conclusion = premise, conclusion

    def __repr__(self) -> str:
        return f"Implies({self.premise!r}, {self.conclusion!r})"

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        a = self.premise(patterns)
        return 1 - a + a * self.conclusion(patterns)


class Within(Rule):
    """`rule` holds at some step in [t + low, t + high] (negative offsets look back)."""

    def __init__(self, rule: Rule, within: Sequence[int]) -> None:
        self.rule, self.low, self.high = rule, int(within[0]), int(within[1])

    def __repr__(self) -> str:
        return f"Within({self.rule!r}, within=({self.low}, {self.high}))"

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        return exists_within(self.rule(patterns), self.low, self.high)

    def absent(self, patterns: Patterns) -> torch.Tensor:
        """NOT this rule, as one product (not 1 - (1 - product))."""
        return absent_within(self.rule(patterns), self.low, self.high)


class FollowedBy(Rule):
    """Ordering with an interval: `first` at t AND `then` at some step in [t + low, t + high]."""

    def __init__(self, first: Rule, then: Rule, within: Sequence[int]) -> None:
        self.first, self.then = first, Within(then, within)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.first!r}, {self.then.rule!r}, within=({self.then.low}, {self.then.high}))"

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        return self.first(patterns) * self.then(patterns)


class NotFollowedBy(Rule):
    """`first` at t AND NOT `then` anywhere in [t + low, t + high] (e.g. a pause after a beat)."""

    def __init__(self, first: Rule, then: Rule, within: Sequence[int]) -> None:
        self.first, self.then = first, Within(then, within)

    __repr__ = FollowedBy.__repr__

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        return self.first(patterns) * self.then.absent(patterns)


class CountAtLeast(Rule):
    """At least `n` occurrences of `rule`, soft: sigmoid(sharpness (count - n + 0.5)), where an occurrence is a
    local peak above `threshold` counted with its probability (weak noise peaks do not add up).

    Counted over the whole series (the map is constant over time) or, with `within`, over [t + low, t + high].
    """

    def __init__(self, rule: Rule, n: int, within: Sequence[int] | None = None, sharpness: float = 4.0,
                 threshold: float = 0.5) -> None:
        self.rule, self.n, self.within, self.sharpness, self.threshold = rule, n, within, sharpness, threshold

    def __repr__(self) -> str:
        within = None if self.within is None else tuple(int(w) for w in self.within)
        return (f"CountAtLeast({self.rule!r}, {self.n}, within={within}, sharpness={self.sharpness}, "
                f"threshold={self.threshold})")

    def __call__(self, patterns: Patterns) -> torch.Tensor:
        peaks = local_peaks(self.rule(patterns))
        occurrences = peaks.masked_fill(peaks <= self.threshold, 0.0)  # (B, T)
        if self.within is None:
            count = occurrences.sum(-1, keepdim=True).expand_as(occurrences)
        else:
            count = window_sum(occurrences, int(self.within[0]), int(self.within[1]))
        return torch.sigmoid((count - (self.n - 0.5)) * self.sharpness)


# ------------------------------------------------------------------------------------------ named rules
_RULES: dict[str, Rule] = {}


def register_rule(name: str, rule: Rule) -> Rule:
    """Name a rule so configs can list it (`rules: [name, ...]`); a second registration of a name raises."""
    if name in _RULES:
        raise ValueError(f"Rule {name!r} is already registered; pick another name (registered: {sorted(_RULES)}).")
    rule.name = name
    _RULES[name] = rule
    return rule


def get_rule(name: str) -> Rule:
    """The rule registered as `name`, or the Rule object a "module:attr" / "module.attr" name points to (the module
    imported, the rule registered under `name` unless its module registered it already)."""
    if name not in _RULES and (":" in name or "." in name):
        return _import_rule(name)
    if name not in _RULES:
        close = close_names(name, list(_RULES), n=3)
        raise ValueError(f"Unknown rule {name!r}." + (f" Did you mean: {', '.join(close)}?" if close else "")
                         + f" Registered: {sorted(_RULES)}. A rule of your own module can be named "
                         "\"module:attr\" (imported, then registered under that name).")
    return _RULES[name]


def _import_rule(name: str) -> Rule:
    """Import "module:attr" (or "module.attr") and return its Rule, registered under `name` unless registered."""
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Rule {name!r}: cannot import module {module_name!r} ({err}). Registered rules: "
                         f"{sorted(_RULES)}.") from err
    if name in _RULES:  # the import registered it under this very name
        return _RULES[name]
    rule = getattr(module, attr, None)
    if not isinstance(rule, Rule):
        raise TypeError(f"Rule {name!r}: {module_name}.{attr} is {type(rule).__name__}, not a zoo.renn.model.Rule.")
    if _RULES.get(rule.name) is rule:  # the module registered it under a name of its own
        return rule
    return register_rule(name, rule)


def registered_name(rule: str | Rule) -> str:
    """The name a config or checkpoint gives `rule`: a name as it is, a Rule object the name it is registered under.
    An unregistered Rule object is refused: a checkpoint names its rules (the System's hyperparameters are read back
    with weights_only=True, which loads no Rule object), so loading it needs the name to find the rule again."""
    if isinstance(rule, str):
        return rule
    if isinstance(rule, Rule) and rule.name and _RULES.get(rule.name) is rule:
        return rule.name
    raise ValueError(f"Rule {rule!r} is not registered: a checkpoint names its rules, so register it first, "
                     f"register_rule(name, rule), and give the rule or its name (registered: {sorted(_RULES)}).")


def list_rules() -> list[str]:
    return sorted(_RULES)


_NORMAL, _PREMATURE = Pattern("normal_beat"), Pattern("premature_beat")
register_rule("premature_then_pause", NotFollowedBy(_PREMATURE, _NORMAL | _PREMATURE, within=(4, 26)))
register_rule("premature_interpolated", FollowedBy(_PREMATURE, _NORMAL, within=(4, 16)))
register_rule("frequent_premature", CountAtLeast(_PREMATURE, 4))
RULE_SERIES_PATTERNS = ["normal_beat", "premature_beat"]
RULE_SERIES_RULES = ["premature_then_pause", "premature_interpolated", "frequent_premature"]


# ------------------------------------------------------------------------------------------ the network
def _encode(definitions: dict[str, str | None]) -> torch.Tensor:
    """JSON text as a uint8 tensor (a buffer that state dicts, checkpoints and safetensors carry)."""
    return torch.tensor(list(json.dumps(definitions).encode()), dtype=torch.uint8)


class LocalPatternDetector(nn.Module):
    """Per-step pattern logits from a small 1-D CNN (receptive field 41 steps: a beat and its neighbours, local
    against the series and the rules' windows)."""

    def __init__(self, in_chans: int, num_patterns: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(in_chans, width, 9, padding=4), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 9, padding=8, dilation=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, num_patterns, 9, padding=8, dilation=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, K, T)


def rule_definition(rule: Rule) -> str | None:
    """The rule's definition as text (its repr), or None for a rule class without a repr of its own."""
    text = repr(rule)
    return None if " object at 0x" in text else text


class RuleLayer(nn.Module):
    """Evaluates the rules on the pattern probabilities: the rule-modulated map (B, R, T). No parameters.

    Rules are named in configs and checkpoints, so the layer also saves each rule's definition (its repr, as JSON in
    a uint8 buffer `definitions`: checkpoints and safetensors exports carry it) and warns when a loaded model's rule
    of the same name is now defined otherwise: the weights were trained on another rule map."""

    def __init__(self, pattern_names: Sequence[str], rules: Sequence[str | Rule]) -> None:
        super().__init__()
        self.pattern_names = list(pattern_names)
        self.rules = [get_rule(r) if isinstance(r, str) else r for r in rules]
        self.rule_names = [r.name or repr(r) for r in self.rules]
        self.check_patterns()
        self.register_buffer("definitions", _encode(self.rule_definitions()))

    def check_patterns(self) -> None:
        """Refuse a rule over a pattern the model does not detect (`rule_patterns` against `pattern_names`), naming
        the rule, the pattern and the model's patterns: it raised a KeyError only at the first forward, inside the
        fit's sanity check, after the run folder had moved."""
        known = set(self.pattern_names)
        missing = [(name, [p for p in rule_patterns(rule) if p not in known])
                   for name, rule in zip(self.rule_names, self.rules)]
        missing = [(name, patterns) for name, patterns in missing if patterns]
        if missing:
            said = "; ".join(f"rule {name!r} uses {patterns}" for name, patterns in missing)
            raise ValueError(f"ReNN's rules read patterns the model does not detect: {said}; the model's "
                             f"pattern_names are {self.pattern_names}. Add the pattern(s) to "
                             f"model_kwargs.pattern_names (the data must annotate them for the local loss) or leave "
                             f"the rule(s) out of "
                             f"model_kwargs.rules (rules: [] trains the model on its patterns alone).")

    def rule_definitions(self) -> dict[str, str | None]:
        return {name: rule_definition(rule) for name, rule in zip(self.rule_names, self.rules)}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Compare the saved definitions with this layer's (warn on a difference) and keep this layer's; a
        state dict saved before definitions were kept loads without them."""
        key = prefix + "definitions"
        saved = state_dict.get(key)
        if saved is not None:
            try:
                before = json.loads(bytes(saved.tolist()).decode())
            except (ValueError, UnicodeDecodeError):
                before = {}
            changed = [name for name, now in self.rule_definitions().items()
                       if now is not None and before.get(name) not in (None, now)]
            if changed:
                warnings.warn("ReNN rule(s) " + "; ".join(f"{name!r} were {before[name]}, now are "
                                                          f"{self.rule_definitions()[name]}" for name in changed)
                              + ": the loaded weights were trained on the rule map of the saved definitions.",
                              stacklevel=2)
        state_dict[key] = self.definitions  # this layer's, whatever was saved (its length may differ)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, patterns: torch.Tensor) -> torch.Tensor:
        """The rule map (B, R, T) of the pattern probabilities (B, K, T); (B, 0, T) for a layer without rules (the
        ablation `rules: []`: the head then reads the patterns alone)."""
        if not self.rules:
            return patterns.new_zeros(patterns.shape[0], 0, patterns.shape[-1])
        named = {name: patterns[:, i] for i, name in enumerate(self.pattern_names)}
        return torch.stack([rule(named) for rule in self.rules], 1)


class GlobalInference(nn.Module):
    """h([L; M]): a 1x1 convolution over the stacked maps, max and mean over time, a linear classifier."""

    def __init__(self, in_maps: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Conv1d(in_maps, hidden, 1), nn.ReLU())
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the stacked maps (B, K + R, T). The maps come in at least float32 (`ReNN` applies the
        rules there); they meet the layers in the layers' dtype, which under `--trainer.precision=bf16-true` is bf16
        (a no-op in float32 and under autocast, where the parameters stay float32)."""
        mixed = self.mix(maps.to(self.mix[0].weight.dtype))  # (B, hidden, T)
        return self.fc(torch.cat([mixed.amax(-1), mixed.mean(-1)], 1))


class ReNN(nn.Module):
    """Local detectors -> rules -> global inference. Output dict:
    {"logits": (B, C), "pattern_logits": (B, K, T), "patterns": (B, K, T), "rule_map": (B, R, T)}.

    Public attributes: `pattern_names` (K, the order of the "patterns" channels) and `rule_names` (R, the order of
    the "rule_map" channels; what the System's per-rule metrics and `explain` are named by).

    A rule over a pattern that is not in `pattern_names` is refused when the model is built (`RuleLayer`). `rules=[]`
    is the ablation of the rule map: "rule_map" is (B, 0, T) and the head reads the patterns alone."""

    def __init__(self, *, in_chans: int = 1, num_classes: int = 4, pattern_names: Sequence[str] = RULE_SERIES_PATTERNS,
                 rules: Sequence[str | Rule] = RULE_SERIES_RULES, width: int = 32, hidden: int = 16,
                 length: int | None = None) -> None:
        super().__init__()
        self.in_chans, self.num_classes, self.length = in_chans, num_classes, length
        self.detector = LocalPatternDetector(in_chans, len(pattern_names), width)
        self.rule_layer = RuleLayer(pattern_names, rules)
        self.pattern_names, self.rule_names = self.rule_layer.pattern_names, self.rule_layer.rule_names
        self.head = GlobalInference(len(pattern_names) + len(self.rule_layer.rules), num_classes, hidden)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("ReNN", x, ("B", self.in_chans, "T"), "series", like=self)
        pattern_logits = self.detector(x)
        patterns = torch.sigmoid(pattern_logits.to(torch.promote_types(pattern_logits.dtype, torch.float32)))
        rule_map = self.rule_layer(patterns)
        return {"logits": self.head(torch.cat([patterns, rule_map], 1)), "pattern_logits": pattern_logits,
                "patterns": patterns, "rule_map": rule_map}

    def explain(self, out: dict[str, torch.Tensor], threshold: float = 0.5) -> list[dict[str, list[int]]]:
        """Per sample: {rule or pattern name: steps where it fired (rules) / was detected (pattern peaks)}."""
        fired = out["rule_map"] > threshold  # (B, R, T)
        detected = (local_peaks(out["patterns"]) > threshold)  # (B, K, T)
        names = self.rule_names + self.pattern_names
        flags = torch.cat([fired, detected], 1).cpu()
        return [{name: row.nonzero().flatten().tolist() for name, row in zip(names, sample)} for sample in flags]

    def own_explanation(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What `zoo.explain(model, series)` ("own") shows, (B, T) at the input's length: the strongest rule
        activation at each step (max over rules of "rule_map"). A model without rules (`rules: []`, the ablation of
        the rule map) has no rule activation; it shows its strongest pattern detection, the maps its head then reads
        alone. The same map for every class (`target` unused)."""
        with torch.no_grad():
            out = self(inputs)
            maps = out["rule_map"] if out["rule_map"].shape[1] else out["patterns"]  # (B, R or K, T')
            strongest = maps.float().amax(1, keepdim=True)  # (B, 1, T')
            return F.interpolate(strongest, size=inputs.shape[-1], mode="linear", align_corners=False)[:, 0]

    pool_type = "catavgmax"  # the head reads max and mean over time, concatenated (timm's name for that pool)

    @property
    def num_features(self) -> int:
        """timm's `num_features`: the width the classifier (`head.fc`) reads: max and mean of the mixed maps."""
        return self.head.fc.in_features

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's head swap: a new last linear layer for `num_classes` (detectors, rules and mixing kept);
        `global_pool`: None or "catavgmax"."""
        check_new_head(self, num_classes, global_pool, self.pool_type)
        self.num_classes = num_classes
        self.head.fc = like(nn.Linear(self.head.fc.in_features, num_classes), self.head.fc.weight)


@register_model
def renn_series(**kwargs) -> ReNN:
    """ReNN for 1-D series: local pattern CNN, named soft-logic rules, global inference (rule_series defaults)."""
    return ReNN(**kwargs)
