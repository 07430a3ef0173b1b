"""The concept bottleneck System: what f reads in each training mode, RandInt for CEM, concept metrics, TWINS."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from datamodules._base import DataSettingError
from zoo.cbm.metrics import ConceptAccuracy, ConceptAUROC, ConceptF1
from zoo.checks import batch_field, check_binary_concepts
from zoo.distributed import updated_on_any_rank
from zoo.engine import ZooSystem

MODES = ("independent", "sequential", "joint")


class CBMSystem(ZooSystem):
    """Train a concept bottleneck model (`cbm_*`, `cem_*`) in one of the paper's modes.

    - **joint**: f reads g's concept probabilities; the loss is L_task + lambda * L_concept (`losses.cbm`).
    - **independent**: in training f reads the *true* concepts (so L_task trains f only and L_concept g only); in
      evaluation f reads g's predictions.
    - **sequential**: f reads g's predictions detached; give two stages (configs/cbm/sequential.yaml): "concepts"
      trains backbone and concept_head with loss_concept, then "task" trains task_head with loss_task.

    Logged: `<stage>/acc` (task accuracy of f on g's predicted concepts, in training too: in independent mode, and
    under RandInt, f is trained on true concepts but `train/acc` scores it as `val/acc` does, from a second decode
    without intervention, no gradient), `<stage>/concept_acc` (mean over concepts), `<stage>/concept_f1` and
    `<stage>/concept_auroc` (macro over concepts; validation and test) and `<stage>/acc_intervened`, the task
    accuracy when every concept is replaced by the truth (hard 0/1; the label is a function of the concepts, so a
    sufficient bottleneck gives 1.0). `concept_table()` gives each concept's F1 and AUROC (ConceptsCallback writes it).

    The loss (default `losses.cbm.ConceptBottleneckLoss` with lambda 1) must read the System's `concept_key` and
    return a `loss_concept` term for a bottleneck model (otherwise g would never learn the concepts): both are clear
    errors. Concept labels must be hard 0 / 1 (a ValueError names the batch; see `concepts`).

    Twins (`train.py compare --config configs/cbm/<x>.yaml`): "standard", the same backbone trained end to end on
    the label only (the paper's standard model) with a linear concept probe on its detached pooled features.

    Args:
        mode: "joint", "independent" or "sequential".
        concept_key: the batch field of the true concepts (B, K) in {0, 1} (parts world and CUB: "attributes");
            the loss must read the same field.
        train_intervention: CEM's RandInt: in training each concept is replaced by the truth with this probability
            (the paper: 0.25); 0 for CBMs.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "standard": ["--model.init_args.model_kwargs.bottleneck=false", "--model.init_args.mode=joint",
                     "--model.init_args.stages=null", "--model.init_args.train_intervention=0"],
    }
    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("mode", "concept_key")  # f's inputs mean another thing in each mode

    def __init__(self, model_name: str = "cbm_tinycnn", *args: Any, mode: str = "joint",
                 concept_key: str = "attributes", train_intervention: float = 0.0, **kwargs: Any) -> None:
        self.concept_key = concept_key  # before the base builds `default_loss()`, which reads it
        super().__init__(model_name, *args, **kwargs)
        loss_key = getattr(self.loss, "concept_key", concept_key)
        if loss_key != concept_key:
            raise ValueError(f"The loss reads the true concepts from batch[{loss_key!r}] but the System from "
                             f"batch[{concept_key!r}] (concept_key={concept_key!r}); give the loss the same field "
                             f"(loss.init_args.concept_key: {concept_key}).")
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
        if train_intervention > 0 and mode == "independent":
            raise ValueError(f"train_intervention={train_intervention} has no effect in mode='independent': f already "
                             "reads every true concept in training. Use it with mode='joint' (RandInt, CEM).")
        self.mode, self.concept_key, self.train_intervention = mode, concept_key, train_intervention
        num_classes, num_concepts = self.hparams.num_classes, self.model.num_concepts
        pos_weight = getattr(self.loss, "pos_weight", None)  # one weight for every concept, or one each
        if torch.is_tensor(pos_weight) and pos_weight.numel() not in (1, num_concepts):
            raise ValueError(f"The loss's pos_weight has {pos_weight.numel()} values but the model predicts "
                             f"{num_concepts} concepts: give one weight per concept (or one for all).")
        self.add_metric("acc", MulticlassAccuracy(num_classes, average="micro"), stages=("train", "val", "test"))
        self.add_metric("concept_acc", ConceptAccuracy(), stages=("train", "val", "test"))
        self.add_metric("concept_f1", ConceptF1(num_concepts))
        self.add_metric("concept_auroc", ConceptAUROC(num_concepts))
        self.add_metric("acc_intervened", MulticlassAccuracy(num_classes, average="micro"))

    def build_model(self) -> nn.Module:
        """The registry's model, refused by name unless it is a concept bottleneck (the twin is one too: `cbm_*`
        with `bottleneck: false`), before anything reads its concepts."""
        model = super().build_model()
        if not hasattr(model, "num_concepts"):
            raise ValueError(f"CBMSystem needs a concept bottleneck model (cbm_*, cem_*); got "
                             f"{self.hparams.model_name} ({type(model).__name__}, no num_concepts). Give model_name: "
                             f"cbm_tinycnn (or another cbm_* / cem_*), or train a plain classifier with "
                             f"zoo.baselines.system.ClassifierSystem.")
        return model

    def default_loss(self) -> nn.Module:
        """The paper's loss, L_task + lambda * L_concept (lambda 1), on the System's `concept_key`: a config without
        `loss:` still trains the concepts (the engine's default, cross-entropy alone, would not)."""
        from losses.cbm import ConceptBottleneckLoss

        return ConceptBottleneckLoss(concept_key=self.concept_key, target_key=self.target_key)

    def check_data_settings(self, datamodule: Any) -> None:
        """The engine's data settings, then the model's concept count against the datamodule's
        (`check_concept_count`): at setup, and in train.py before anything trains or moves (`zoo.cli.preflight`); a
        mismatch was found only at the first batch, a traceback inside the fit."""
        super().check_data_settings(datamodule)
        self.check_concept_count(datamodule)

    def check_concept_count(self, datamodule: Any) -> None:
        """Refuse (`DataSettingError`: train.py says it in one line, exit status 2) a model that predicts another
        number of concepts K than the datamodule gives: its `num_concepts`, else its `concept_names`, else (when
        the System reads `attributes`, as for the parts world and CUB with `attributes=true`) its `attribute_names`.
        A datamodule that tells none of them (or an empty list: CUB without attributes, whose batches then lack the
        field, a named error of `concepts`) is left to the batch check. Why here: the model's K is fixed when it is
        built (model_kwargs.num_concepts, the parts world's 36 by default), and CUB's attribute count depends on
        `min_attribute_classes` and the split; the first batch's check came after the fit had started."""
        count, source = getattr(datamodule, "num_concepts", None), "num_concepts"
        named = ["concept_names", *(["attribute_names"] if self.concept_key == "attributes" else [])]
        for attribute in named if count is None else []:
            names = getattr(datamodule, attribute, None)
            if names:  # (None or empty: not told)
                count, source = len(names), f"len({attribute})"
                break
        mine = self.model.num_concepts
        if count is None or int(count) == mine:
            return
        raise DataSettingError(
            f"{type(self).__name__} ({self.hparams.get('model_name')}) predicts num_concepts={mine} concepts but the "
            f"data's {source} ({type(datamodule).__name__}, batch[{self.concept_key!r}]) is {int(count)}. Set "
            f"model_kwargs.num_concepts to {int(count)} (train.py: --model.init_args.model_kwargs.num_concepts="
            f"{int(count)}).")

    def concepts(self, batch: dict[str, Any], stage: str = "train") -> torch.Tensor | None:
        """The batch's true concepts (B, K), checked against the model's K and to be 0 or 1; None where a predict
        batch has none (a training or evaluation batch without them is a named error).

        The 0/1 check must not make a step wait for the device: concepts on the host are checked here, naming the
        sample and concept; on an accelerator the check is deferred to the engine's loss check (`defer_check`). Not
        in `on_before_batch_transfer`: a datamodule that overrides that hook silently replaces the System's."""
        if self.concept_key not in batch:
            if stage == "predict":
                return None
            raise KeyError(f"The {stage} batch has no {self.concept_key!r} (concept_key), which a concept bottleneck "
                           f"trains and is scored on; it holds {sorted(batch)}. CUB: "
                           "--data.init_args.attributes=true; other data: set concept_key to its concept field.")
        concepts = batch_field(batch, self.concept_key)
        if concepts.ndim != 2 or concepts.shape[1] != self.model.num_concepts:
            raise ValueError(f"batch[{self.concept_key!r}] has shape {tuple(concepts.shape)}; the model predicts "
                             f"{self.model.num_concepts} concepts (set model_kwargs.num_concepts).")
        if concepts.device.type == "cpu":
            check_binary_concepts(concepts, f"batch[{self.concept_key!r}]", batch.get("index"))
        else:
            self.defer_check(((concepts == 0) | (concepts == 1)).all(),
                             f"batch[{self.concept_key!r}] must hold hard concept labels, 0 or 1; the {stage} batch "
                             f"at global step {self.global_step}, epoch {self.current_epoch} held other values. "
                             "Binarise soft or uncertain labels in the data before training a concept bottleneck.")
        return concepts

    def compute_loss(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        terms = super().compute_loss(out, batch, stage)
        if self.model.bottleneck and "loss_concept" not in terms:  # a key lookup: nothing read from the device
            raise ValueError(f"The loss ({type(self.loss).__name__}) returns {sorted(terms)}, no 'loss_concept': "
                             "the bottleneck g would never learn the concepts. Use losses.cbm.ConceptBottleneckLoss "
                             "(the default) or a loss with a 'loss_concept' term.")
        return terms

    def forward_batch(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """One `self.model(...)` call per step: what `compile` compiles (`nn.Module.compile` wraps `__call__`)."""
        concepts = self.concepts(batch, stage)
        intervene = None
        if stage == "train" and concepts is not None:
            if self.mode == "independent":  # f learns from the true concepts
                intervene = torch.ones_like(concepts, dtype=torch.bool)
            elif self.train_intervention > 0:  # RandInt
                intervene = torch.rand(concepts.shape, device=concepts.device) < self.train_intervention
        evaluating = stage in ("val", "test") and concepts is not None and self.model.bottleneck  # the twin: none
        # f read true concepts: `predicted` scores it on g's predictions as in evaluation (`train/acc`)
        return self.model(batch_field(batch, self.input_key), None if intervene is None else concepts, intervene,
                          detach=self.mode == "sequential", predicted=intervene is not None,
                          intervened=concepts if evaluating else None)

    def prediction_extras(self, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """Each image's predicted concepts, the model's explanation: `concept_probs` (B, K) and a predictions.csv
        column `concepts`, the names (the datamodule's `concept_names` / `attribute_names`, else "concept i") of
        those with probability >= 0.5, "; "-separated. The standard twin has no bottleneck: nothing."""
        if not self.model.bottleneck:
            return {}
        from zoo.cbm.callback import concept_names

        probs = out["concept_probs"].float()  # (B, K)
        names = (concept_names(self.trainer, probs.shape[1]) if self._trainer is not None
                 else [f"concept {i}" for i in range(probs.shape[1])])
        present = (probs >= 0.5).cpu()  # predict only: the host writes the CSV anyway
        return {"concept_probs": probs, "columns": {"concepts": ["; ".join(n for n, on in zip(names, row) if on)
                                                                for row in present.tolist()]}}

    def update_metrics(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        if self.target_key in batch:  # task accuracy of f on g's predicted concepts, in every stage
            logits = out.get("logits_predicted", out["logits"])
            self.log_metric(stage, "acc", logits.detach(), batch[self.target_key], prog_bar=True)
        concepts = batch.get(self.concept_key)
        if concepts is None:
            return
        logits = out["concept_logits"].detach()
        self.log_metric(stage, "concept_acc", logits, concepts)
        self.log_metric(stage, "concept_f1", logits, concepts)
        self.log_metric(stage, "concept_auroc", logits, concepts)
        if "logits_intervened" in out:
            self.log_metric(stage, "acc_intervened", out["logits_intervened"].detach(), batch[self.target_key])

    def concept_table(self, stage: str = "val") -> dict[str, torch.Tensor]:
        """This epoch's F1 and AUROC of each concept, {"f1": (K,), "auroc": (K,)} on the CPU (NaN where undefined),
        from the stage's metrics before Lightning resets them; a column is left out while no rank has updated its
        metric. A collective call under DDP (the states are gathered): every rank must make it
        (`FixedBatchCallback.collective`). Whether a metric was updated is decided over all ranks
        (`zoo.distributed.updated_on_any_rank`): a rank that ran no batch (an unrepeated evaluation sampler with
        fewer samples than ranks) must still join the gather the others enter."""
        present = [(column, self.metrics[f"{stage}_{name}"]) for column, name in
                   (("f1", "concept_f1"), ("auroc", "concept_auroc")) if f"{stage}_{name}" in self.metrics]
        if not present:  # the System's metrics: alike on every rank
            return {}
        table = {}
        for (column, metric), updated in zip(present, updated_on_any_rank([m for _, m in present], self.device)):
            if not updated:
                continue
            with metric.sync_context(should_sync=self.trainer.world_size > 1):
                table[column] = metric.per_concept().float().cpu()
        return table
