"""The family's Systems: ReNN trained in stages and scored on its rule firing, and any classifier trained with a rule
loss (logic-rule distillation, the semantic loss)."""

from __future__ import annotations

from typing import Any, ClassVar

from torchmetrics.classification import MulticlassAccuracy

from zoo.engine import ZooSystem
from zoo.renn.metrics import NamedRuleFiring

_OPAQUE_SERIES = ["--model.init_args.model_kwargs=null", "--model.init_args.loss=losses.baselines.ClassificationLoss",
                  "--model.init_args.stages=null"]


class ReNNSystem(ZooSystem):
    """Train ReNN in the stages of `stages:` (local detectors on `loss_local`, then global inference on `loss_task`
    with the detectors frozen, then optionally both at a lower learning rate; `zoo.engine.stages`), log `<stage>/acc`
    and, in validation and test, how the model's rule map fires on the batch's ground-truth rule events
    (`rule_events_key`, (B, R, T)): `<stage>/rule_precision` and `<stage>/rule_recall` (means over rules) and
    `<stage>/rule_<precision|recall>/<rule name>`. Rule names are the model's public `rule_names`; a model without
    them (an opaque twin) gets accuracy only.

    Twins (`train.py compare --config configs/renn/rule_series.yaml`): the opaque 1-D CNN and the LSTM of matched
    size (about 10k parameters each), cross-entropy, no stages, same data and budget.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "cnn": ["--model.init_args.model_name=baseline_cnn1d", *_OPAQUE_SERIES],
        "lstm": ["--model.init_args.model_name=baseline_lstm", *_OPAQUE_SERIES],
    }

    def __init__(self, *args: Any, rule_events_key: str = "rule_events", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rule_events_key = rule_events_key
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))
        rule_names = getattr(self.model, "rule_names", None)
        if rule_names:
            self.add_metric("rule_firing", NamedRuleFiring(rule_names), log_prefix="rule_")

    def update_metrics(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        super().update_metrics(out, batch, stage)
        if "rule_map" in out and self.rule_events_key in batch:
            self.log_metric(stage, "rule_firing", out["rule_map"], batch[self.rule_events_key])


class RuleLossSystem(ZooSystem):
    """Train any classifier with a rule loss (`losses.renn.LogicRuleDistillation`, whose pi_t is an epoch schedule
    logged as `schedule/distill_pi`, or `losses.renn.SemanticLoss`); logs `<stage>/acc`.

    Twin (`train.py compare --config configs/renn/parts_world_<distillation|semantic>.yaml`): the same network and
    loss with the rule term's `weight` 0, i.e. trained on the labels alone.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {"opaque_twin": ["--model.init_args.loss.init_args.weight=0"]}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))
