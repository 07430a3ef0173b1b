"""The concept bottleneck System: what f reads in each training mode, RandInt for CEM, concept metrics, TWINS."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics.classification import MulticlassAccuracy

from zoo.cbm.metrics import ConceptAccuracy, ConceptF1
from zoo.checks import batch_field
from zoo.engine import ZooSystem

MODES = ("independent", "sequential", "joint")


class CBMSystem(ZooSystem):
    """Train a concept bottleneck model (`cbm_*`, `cem_*`) in one of the paper's modes.

    - **joint**: f reads g's concept probabilities; the loss is L_task + lambda * L_concept (`losses.cbm`).
    - **independent**: in training f reads the *true* concepts (so L_task trains f only and L_concept g only); in
      evaluation f reads g's predictions.
    - **sequential**: f reads g's predictions detached; give two stages (configs/cbm/sequential.yaml): "concepts"
      trains backbone and concept_head with loss_concept, then "task" trains task_head with loss_task.

    Logged: `<stage>/acc` (task accuracy), `<stage>/concept_acc` (mean over concepts), `<stage>/concept_f1` (macro
    over concepts) and `<stage>/acc_intervened`, the task accuracy when every concept is replaced by the truth
    (hard 0/1; the label is a function of the concepts, so a sufficient bottleneck gives 1.0).

    Twins (`train.py compare --config configs/cbm/<x>.yaml`): "standard", the same backbone trained end to end on
    the label only (the paper's standard model) with a linear concept probe on its detached pooled features.

    Args:
        mode: "joint", "independent" or "sequential".
        concept_key: the batch field of the true concepts (B, K) in {0, 1} (parts world: "attributes").
        train_intervention: CEM's RandInt: in training each concept is replaced by the truth with this probability
            (the paper: 0.25); 0 for CBMs.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "standard": ["--model.init_args.model_kwargs.bottleneck=false", "--model.init_args.mode=joint",
                     "--model.init_args.stages=null", "--model.init_args.train_intervention=0"],
    }

    def __init__(self, *args: Any, mode: str = "joint", concept_key: str = "attributes",
                 train_intervention: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
        if mode == "sequential" and [stage.losses for stage in self.schedule.stages] != [["loss_concept"],
                                                                                         ["loss_task"]]:
            raise ValueError("mode='sequential' trains g, then f on g's predictions: give two stages, one with "
                             "losses [loss_concept] then one with losses [loss_task] (configs/cbm/sequential.yaml).")
        if mode != "joint" and getattr(self.model, "embedding_size", 0):
            raise ValueError(f"mode={mode!r}: a concept embedding model trains jointly (its f reads embeddings that g "
                             "makes, so f cannot learn apart from g); use mode='joint'.")
        if not 0.0 <= train_intervention <= 1.0:
            raise ValueError(f"train_intervention is a probability in [0, 1]; got {train_intervention}.")
        self.mode, self.concept_key, self.train_intervention = mode, concept_key, train_intervention
        num_classes, num_concepts = self.hparams.num_classes, self.model.num_concepts
        self.add_metric("acc", MulticlassAccuracy(num_classes, average="micro"), stages=("train", "val", "test"))
        self.add_metric("concept_acc", ConceptAccuracy(), stages=("train", "val", "test"))
        self.add_metric("concept_f1", ConceptF1(num_concepts))
        self.add_metric("acc_intervened", MulticlassAccuracy(num_classes, average="micro"))

    def concepts(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The batch's true concepts (B, K), checked against the model's K; None where the batch has none."""
        if self.concept_key not in batch:
            return None
        concepts = batch_field(batch, self.concept_key)
        if concepts.ndim != 2 or concepts.shape[1] != self.model.num_concepts:
            raise ValueError(f"batch[{self.concept_key!r}] has shape {tuple(concepts.shape)}; the model predicts "
                             f"{self.model.num_concepts} concepts (set model_kwargs.num_concepts).")
        return concepts

    def forward_batch(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        encoded = self.model.encode(batch_field(batch, self.input_key))
        concepts = self.concepts(batch)
        intervene = None
        if stage == "train" and concepts is not None:
            if self.mode == "independent":  # f learns from the true concepts
                intervene = torch.ones_like(concepts, dtype=torch.bool)
            elif self.train_intervention > 0:  # RandInt
                intervene = torch.rand(concepts.shape, device=concepts.device) < self.train_intervention
        out = self.model.decode(encoded, concepts, intervene, detach=self.mode == "sequential")
        if stage in ("val", "test") and concepts is not None and self.model.bottleneck:  # the standard twin: none
            everything = torch.ones_like(concepts, dtype=torch.bool)
            out["logits_intervened"] = self.model.decode(encoded, concepts, everything)["logits"]  # (B, C)
        return out

    def update_metrics(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        super().update_metrics(out, batch, stage)
        concepts = batch.get(self.concept_key)
        if concepts is None:
            return
        logits = out["concept_logits"].detach()
        self.log_metric(stage, "concept_acc", logits, concepts)
        self.log_metric(stage, "concept_f1", logits, concepts)
        if "logits_intervened" in out:
            self.log_metric(stage, "acc_intervened", out["logits_intervened"].detach(), batch[self.target_key])
