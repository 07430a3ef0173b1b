"""The opaque classifiers' System: ZooSystem's defaults (cross-entropy, accuracy in every stage), nothing else."""

from __future__ import annotations

from typing import Any

from torchmetrics.classification import MulticlassAccuracy

from zoo.engine import ZooSystem


class ClassifierSystem(ZooSystem):
    """Train any registered classifier (`baseline_*`, or any model whose output has `logits`) with a named-terms
    loss; logs `<stage>/acc`. Opaque models are the twins of the interpretable families: they declare none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))
