"""The family's Systems: ReNN trained in stages and scored on its rule firing, and any classifier trained with a rule
loss (logic-rule distillation, the semantic loss)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics.classification import MulticlassAccuracy

from datamodules._base import DataSettingError
from zoo.engine import ZooSystem
from zoo.renn.metrics import NamedRuleFiring
from zoo.renn.model import registered_name

LOCAL_TERM = "loss_local"  # the loss term (`losses.renn.ReNNLoss`) that trains the detectors on the data's `patterns`
_OPAQUE_SERIES = ["--model.init_args.model_kwargs=null", "--model.init_args.loss=losses.baselines.ClassificationLoss",
                  "--model.init_args.stages=null"]


def step_ranges(steps: list[int]) -> str:
    """Sorted time steps as compact ranges: [3, 12, 13, 14, 40] -> "3 12-14 40"; [] -> ""."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class ReNNSystem(ZooSystem):
    """Train ReNN in the stages of `stages:` (local detectors on `loss_local`, then global inference on `loss_task`
    with the detectors frozen, then optionally both at a lower learning rate; `zoo.engine.stages`), log `<stage>/acc`
    and, in validation and test, how the model's rule map fires on the batch's ground-truth rule events
    (`rule_events_key`, (B, R', T)): `<stage>/rule_precision` and `<stage>/rule_recall` (means over rules) and
    `<stage>/rule_<precision|recall>/<rule name>`. Rule names are the model's public `rule_names`; a model without
    them (an opaque twin) gets accuracy only.

    Channels are matched to the data by name, never by position (`setup`): the rows of the batch's `patterns` by the
    datamodule's `pattern_names` (the local loss trains each detector channel on its own pattern's row; a pattern the
    model detects and the data does not annotate is refused by name), the rows of `rule_events` by its
    `rule_event_names` (only the model's rules the data has ground truth for are scored). Data without pattern
    annotations (`pattern_names` empty: a series file without `patterns`) is refused for a fit whose stages sum
    `loss_local` (it would fail at the first step); without that term the detectors learn through `loss_task`.
    Without a datamodule (`trainer.fit(system, loaders)`) the rows are taken in order.

    Twins (`train.py compare --config configs/renn/rule_series.yaml`): the opaque 1-D CNN and the LSTM of matched
    size (about 10k parameters each), cross-entropy, no stages, same data and budget.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "cnn": ["--model.init_args.model_name=baseline_cnn1d", *_OPAQUE_SERIES],
        "lstm": ["--model.init_args.model_name=baseline_lstm", *_OPAQUE_SERIES],
    }

    def __init__(self, model_name: str = "renn_series", num_classes: int = 10, in_chans: int | None = None,
                 *args: Any, rule_events_key: str = "rule_events", **kwargs: Any) -> None:
        # the family's own model; in_chans None as the CLI links it from a series datamodule (num_channels None: the
        # series' channels come in data_inputs)
        model_kwargs = kwargs.get("model_kwargs")
        if isinstance(model_kwargs, dict) and model_kwargs.get("rules") is not None:
            # saved by name: a checkpoint is read with weights_only=True (no Rule objects); unregistered: ValueError
            kwargs["model_kwargs"] = {**model_kwargs, "rules": [registered_name(r) for r in model_kwargs["rules"]]}
        super().__init__(model_name, num_classes, in_chans, *args, **kwargs)
        self.rule_events_key = rule_events_key
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))
        rule_names = getattr(self.model, "rule_names", None)
        self.scored_rules: list[str] = list(rule_names or [])  # the rules scored against the data's rule events
        if rule_names:
            self.add_metric("rule_firing", NamedRuleFiring(rule_names), log_prefix="rule_")
        # rows of the batch's `patterns` for each model pattern, and (model rule, data event row) pairs scored; None:
        # in order (set by `setup` from the datamodule's names; device tensors: no host copy inside a step)
        self.register_buffer("pattern_rows", None, persistent=False)
        self.register_buffer("scored_rule_ids", None, persistent=False)
        self.register_buffer("rule_event_rows", None, persistent=False)

    def setup(self, stage: str) -> None:
        """The data settings (`ZooSystem.setup`), then the model's pattern and rule channels matched to the
        datamodule's `pattern_names` / `rule_event_names`."""
        super().setup(stage)
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None and stage != "predict":
            self.match_data(data, fitting=stage == "fit")

    def check_data_settings(self, datamodule: Any) -> None:
        """The data settings (`ZooSystem.check_data_settings`) and, called without a trainer (`train.py fit`'s
        preflight, before it moves an earlier run to stale/), the model's patterns against the data's (`match_data`
        as for a fit: a pattern the data does not annotate, data without annotations for a `loss_local` stage), which
        were refused only at setup, after that move. `setup` matches them again for its own stage."""
        super().check_data_settings(datamodule)
        if self._trainer is None:
            self.match_data(datamodule, fitting=True)

    def match_data(self, data: Any, fitting: bool = False) -> None:
        """Select, by name, the data rows the local loss and the rule metrics read (see the class docstring).
        `fitting`: also refuse data without pattern annotations when a stage sums the local loss (a DataSettingError:
        the command line says it once, exit status 2, where the stage would fail at the first step)."""
        where = type(data).__name__ + (f", {str(data.path)!r}" if getattr(data, "path", None) is not None else "")
        patterns = getattr(self.model, "pattern_names", None)
        annotated = list(getattr(data, "pattern_names", None) or [])
        if fitting and patterns and not annotated and hasattr(data, "pattern_names"):  # it says: no annotations
            self._refuse_unannotated(where)
        if patterns and annotated:
            missing = [name for name in patterns if name not in annotated]
            if missing:
                raise DataSettingError(f"The model detects pattern(s) {missing} that the data ({where}) does not "
                                       f"annotate: its `patterns` rows are {annotated}. Name the model's patterns "
                                       f"after the data's (model_kwargs: {{pattern_names: [...]}}) or the data's "
                                       f"after the model's (SeriesFileDataModule: data.init_args.pattern_names).")
            self.pattern_rows = self._rows([annotated.index(name) for name in patterns], len(annotated))
        rules, events = list(getattr(self.model, "rule_names", None) or []), getattr(data, "rule_event_names", None)
        if not rules or events is None:
            return
        events = list(events)
        scored = [(i, events.index(name)) for i, name in enumerate(rules) if name in events]
        self._score_rules([rules[i] for i, _ in scored])
        self.scored_rule_ids = self._rows([i for i, _ in scored], len(rules))
        self.rule_event_rows = self._rows([row for _, row in scored], len(events))

    def _refuse_unannotated(self, where: str) -> None:
        """Refuse a fit on data without `patterns` annotations whose stages sum `LOCAL_TERM` (only the annotations
        give it: the stage raised a KeyError inside the first training step)."""
        local = [stage.name for stage in self.schedule.stages if LOCAL_TERM in (stage.losses or [])]
        if local:
            raise DataSettingError(
                f"The data ({where}) has no `patterns` annotations, but stage(s) {local} sum {LOCAL_TERM!r}, the "
                f"detectors' per-step loss against them. Drop the `local` stage and {LOCAL_TERM} from the stages "
                f"(e.g. --model.init_args.stages=null, or one joint stage with losses: [loss_task]), so the detectors "
                f"learn through loss_task, or give the file a `patterns` array (N, K, T) in [0, 1] with its "
                f"`pattern_names` (the model's: {list(self.model.pattern_names)}).")

    def _rows(self, rows: list[int], count: int) -> torch.Tensor | None:
        """`rows` as a device index tensor, or None where they are all `count` rows in order (nothing to select)."""
        return None if rows == list(range(count)) else torch.tensor(rows, dtype=torch.long, device=self.device)

    def _score_rules(self, names: list[str]) -> None:
        """Score rules `names` (those the data has events for): the rule-firing metrics rebuilt for them, or gone."""
        if names == self.scored_rules:
            return
        for key in ("val_rule_firing", "test_rule_firing"):
            if key in self.metrics:
                del self.metrics[key]
            self._dict_metrics.pop(key, None)
        self.scored_rules = names
        if names:
            self.add_metric("rule_firing", NamedRuleFiring(names).to(self.device), log_prefix="rule_")

    def prediction_extras(self, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """The model's explanation in predictions.csv (`model.explain`): a column `rule:<name>` per rule with the
        steps where it fired (rule map > 0.5) and `pattern:<name>` per pattern with its detected peaks, each as
        compact step ranges ("12 40-42"; empty: never). An opaque twin (no `explain`) adds nothing."""
        explain = getattr(self.model, "explain", None)
        if explain is None or "rule_map" not in out:
            return {}
        explained = explain(out)  # predict only: the host writes the CSV anyway
        rules = set(self.model.rule_names)
        names = [f"{'rule' if name in rules else 'pattern'}:{name}" for name in explained[0]] if explained else []
        return {"columns": {column: [step_ranges(sample[name]) for sample in explained]
                            for column, name in zip(names, explained[0] if explained else [])}}

    def compute_loss(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        key = getattr(self.loss, "patterns_key", None)
        if self.pattern_rows is not None and key in batch:  # the model's patterns' rows, in the model's order
            batch = {**batch, key: batch[key].index_select(1, self.pattern_rows)}
        return super().compute_loss(out, batch, stage)

    def update_metrics(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        super().update_metrics(out, batch, stage)
        if "rule_map" in out and self.rule_events_key in batch and self.scored_rules:
            rule_map, events = out["rule_map"], batch[self.rule_events_key]
            if self.scored_rule_ids is not None:
                rule_map = rule_map.index_select(1, self.scored_rule_ids)
            if self.rule_event_rows is not None:
                events = events.index_select(1, self.rule_event_rows)
            self.log_metric(stage, "rule_firing", rule_map, events)


class RuleLossSystem(ZooSystem):
    """Train any classifier with a rule loss (`losses.renn.LogicRuleDistillation`, whose pi_t is an epoch schedule
    logged as `schedule/distill_pi`, or `losses.renn.SemanticLoss`); logs `<stage>/acc`.

    Twin (`train.py compare --config configs/renn/parts_world_<distillation|semantic>.yaml`): the same network and
    loss with the rule term's `weight` 0, i.e. trained on the labels alone.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {"opaque_twin": ["--model.init_args.loss.init_args.weight=0"]}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_outputs = getattr(self.loss, "check_outputs", None)
        if callable(check_outputs):  # SemanticLoss: a constraint of other rows than the model's classes, said now
            check_outputs(self.hparams.num_classes)
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))

    def check_data_settings(self, datamodule: Any) -> None:
        """The data settings (`ZooSystem.check_data_settings`), then the rules that read the data's definition
        (`bind_data(datamodule)`, e.g. `PartsWorldColourRule`'s world and image normalisation) take it from the
        datamodule, a mismatch refused by name as a DataSettingError (said once, without a traceback). Here, not only
        in `setup` (which runs this): `train.py fit`'s preflight runs it before it moves an earlier run to stale/."""
        super().check_data_settings(datamodule)
        for rule in getattr(self.loss, "rules", []):
            if hasattr(rule, "bind_data"):
                try:
                    rule.bind_data(datamodule)
                except ValueError as error:
                    raise DataSettingError(str(error)) from error
