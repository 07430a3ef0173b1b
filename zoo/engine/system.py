"""ZooSystem: the one LightningModule every family's System subclasses.

The base owns what every family shares: the model from the registry, the loss dict summed (narrowed by the current
stage), the non-finite-loss policy, per-term logging, metrics logged as objects, schedules, auxiliary models,
optimiser and scheduler from YAML, and checkpoint compatibility checks. A family overrides hooks only:

    forward_batch(batch, stage) -> out      the model's output dict for a batch
    compute_loss(out, batch, stage) -> dict  named loss terms (default: self.loss(out, batch))
    update_state(out, batch)                 online statistics, training steps only (ICNN's Z_T, categories)
    update_metrics(out, batch, stage)        validation / test metrics (default: accuracy of out["logits"])
    auxiliaries() -> list[Auxiliary]         frozen helper models trained before the first step
    batch_size(batch) -> int                 for logging

and declares its opaque twins in `TWINS`: name -> CLI overrides applied to the family's config
(`train.py compare --config <family config>` trains the config and every twin with the same data, seed and budget).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import Metric

from zoo.checks import batch_field, check_class_ids
from zoo.engine.auxiliary import Auxiliary, auxiliaries_pending, prepare_auxiliaries
from zoo.engine.stages import Schedule, epoch_schedules
from zoo.registry import create_model_for_data
from zoo.weights import check_same_model, model_spec

NONFINITE_POLICIES = ("raise", "skip")
EVAL_STAGES = ("val", "test")


class ZooSystem(pl.LightningModule):
    """A registered model trained with a named-terms loss (see the module docstring for the hooks).

    Args:
        model_name: registry name, e.g. "icnn_tinycnn".
        num_classes, in_chans, image_size, data_inputs: what the data fixes about the model, linked from the
            datamodule by the CLI (`data_inputs`: num_features, vocab_size, ...).
        model_kwargs: extra keyword arguments for `zoo.create_model` (they win over the linked ones).
        loss: module returning named loss terms {"loss_<term>": tensor}; default `default_loss()`.
        optimizer / scheduler: callables injected by LightningCLI (``optimizer: {class_path: torch.optim.SGD}``).
        input_key / target_key: batch fields fed to the model and scored against its output.
        stages: list of `zoo.engine.Stage` fields (name, epochs, train, losses, lr_scale, settings).
        nonfinite_loss: a NaN/inf training loss "raise"s `FloatingPointError` naming the step, the batch and every
            term (the last good checkpoint stays), or "skip"s the batch with a warning.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {}

    def __init__(
        self,
        model_name: str = "baseline_tinycnn",
        num_classes: int = 10,
        in_chans: int | None = 3,
        image_size: int | None = 64,
        data_inputs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        input_key: str = "image",
        target_key: str = "label",
        stages: list[dict[str, Any]] | None = None,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}; got {nonfinite_loss!r}.")
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.model = self.build_model()
        self.loss = loss if loss is not None else self.default_loss()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.input_key, self.target_key = input_key, target_key
        self.schedule = Schedule(stages, self.model)
        self.metrics = nn.ModuleDict()  # "<stage>_<name>": a ModuleDict key "train" would shadow nn.Module.train
        self._dict_metrics: dict[str, str] = {}  # metrics whose compute() returns a dict: key -> log prefix

    # ------------------------------------------------------------------------------------------- family hooks
    def build_model(self) -> nn.Module:
        hp = self.hparams
        return create_model_for_data(hp.model_name, hp.num_classes, hp.in_chans, hp.image_size, hp.data_inputs,
                                     hp.model_kwargs)

    def default_loss(self) -> nn.Module:
        from losses.baselines import ClassificationLoss

        return ClassificationLoss()

    def forward_batch(self, batch: Any, stage: str) -> dict[str, Any]:
        return self.model(batch_field(batch, self.input_key))

    def compute_loss(self, out: dict[str, Any], batch: Any, stage: str) -> dict[str, torch.Tensor]:
        if self.target_key in batch and torch.is_tensor(batch[self.target_key]):
            check_class_ids(batch[self.target_key], self.hparams.num_classes)
        return self.loss(out, batch)

    def update_state(self, out: dict[str, Any], batch: Any) -> None:
        """Online statistics after a training forward (never in evaluation)."""

    def update_metrics(self, out: dict[str, Any], batch: Any, stage: str) -> None:
        """Default: accuracy of out["logits"] against the target (every stage)."""
        if "logits" in out and self.target_key in batch:
            self.log_metric(stage, "acc", out["logits"].detach(), batch[self.target_key], prog_bar=True)

    def auxiliaries(self) -> list[Auxiliary]:
        """Frozen helper models (L2X black box, textual sentence classifier) that must be ready before training."""
        return []

    def explanation_report(self, datamodule: Any, settings: dict[str, Any]) -> tuple[list[dict], dict, Any] | None:
        """What `compare` reports on explanations: by default every post-hoc explainer (and the model's own map)
        scored on the same validation images (`zoo.explain`); None for inputs that are not images."""
        from zoo.explain.scores import explain_validation_images

        return explain_validation_images(self, datamodule, settings)

    def batch_size(self, batch: Any) -> int:
        return len(batch[self.target_key]) if isinstance(batch, dict) and self.target_key in batch else 1

    # ------------------------------------------------------------------------------------------------ metrics
    def add_metric(self, name: str, metric: Metric, stages: tuple[str, ...] = EVAL_STAGES,
                   log_prefix: str | None = None) -> None:
        """One copy of `metric` per stage, as `metrics["<stage>_<name>"]`. A metric whose compute() returns a dict
        is logged entry by entry at the epoch's end as "<stage>/<log_prefix><key>" (`log_prefix` given)."""
        for stage in stages:
            key = f"{stage}_{name}"
            self.metrics[key] = metric if stage == stages[0] else metric.clone()
            if log_prefix is not None:
                self._dict_metrics[key] = log_prefix

    def log_metric(self, stage: str, name: str, *args: Any, **log_kwargs: Any) -> None:
        """Update `metrics["<stage>_<name>"]` with `args` and, for a scalar metric, log the metric object (Lightning
        computes, synchronises and resets it at the epoch's end)."""
        key = f"{stage}_{name}"
        if key not in self.metrics:
            return
        metric = self.metrics[key]
        metric.update(*args)
        if key not in self._dict_metrics:
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, **log_kwargs)

    def logged_metrics(self, stage: str) -> list[tuple[str, Metric]]:
        """The metrics of `stage` with the name they are logged under (without "<stage>/"); a metric whose compute()
        returns a dict is named "<log_prefix>*" (its entries are logged as "<log_prefix><key>"). Reports read each
        metric's `higher_is_better` from here."""
        return [(f"{self._dict_metrics[key]}*" if key in self._dict_metrics else key.removeprefix(f"{stage}_"), metric)
                for key, metric in self.metrics.items() if key.startswith(f"{stage}_")]

    def _log_dict_metrics(self, stage: str) -> None:
        for key, prefix in self._dict_metrics.items():
            metric = self.metrics[key]
            if key.startswith(f"{stage}_") and metric.update_count:
                for name, value in metric.compute().items():
                    self.log(f"{stage}/{prefix}{name}", value.float() if torch.is_tensor(value) else value,
                             sync_dist=False)  # already synchronised by compute()
            if key.startswith(f"{stage}_"):
                metric.reset()

    # ------------------------------------------------------------------------------------------------ steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _step(self, batch: Any, stage: str, batch_idx: int) -> torch.Tensor | None:
        out = self.forward_batch(batch, stage)
        if stage == "train":
            self.update_state(out, batch)
        terms = self.compute_loss(out, batch, stage)
        if stage == "train":
            terms = self.schedule.select(terms)
        elif not terms:  # a model whose evaluation output has no loss (torchvision detectors): metrics only
            self.update_metrics(out, batch, stage)
            return None
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        if stage == "train" and not torch.isfinite(loss):
            message = (f"Non-finite training loss at global step {self.global_step}, epoch {self.current_epoch}, "
                       f"batch {batch_idx}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            if self.hparams.nonfinite_loss == "raise":
                raise FloatingPointError(message + ". The last checkpoint is the last good state.")
            rank_zero_warn(message + "; batch skipped (nonfinite_loss='skip').")
            return None  # Lightning skips the optimiser step
        on_step = stage == "train"
        log_kw = dict(on_step=on_step, on_epoch=True, batch_size=self.batch_size(batch), sync_dist=not on_step)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, **log_kw)
        self.log(f"{stage}/loss", loss, prog_bar=on_step, **log_kw)
        self.update_metrics(out, batch, stage)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.forward_batch(batch, "predict")
        probs = out["logits"].float().softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1), **({"index": batch["index"]} if "index" in batch else {})}

    def on_train_epoch_end(self) -> None:
        self._log_dict_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_dict_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_dict_metrics("test")

    # ------------------------------------------------------------------------------- schedules and auxiliaries
    def on_fit_start(self) -> None:
        if auxiliaries_pending(self):
            if self.trainer.world_size > 1:
                raise RuntimeError("Auxiliary models must be ready before a distributed fit: call "
                                   "zoo.engine.prepare_auxiliaries(system, trainer, datamodule) first (train.py does).")
            prepare_auxiliaries(self, self.trainer, self.trainer.datamodule)

    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        logged = self.schedule.start_epoch(self.model, optimizer, self.current_epoch)
        logged |= epoch_schedules({"model": self.model, "loss": self.loss}, self.current_epoch)
        self.train(self.training)  # frozen submodules back to eval mode
        for name, value in logged.items():
            self.log(f"schedule/{name}", value, on_step=False, on_epoch=True)

    def train(self, mode: bool = True) -> "ZooSystem":
        super().train(mode)
        if mode and hasattr(self, "schedule"):
            for module in self.frozen_modules():
                module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Modules kept in eval mode while training: the current stage's frozen submodules and the auxiliaries (but
        those left trainable after preparation, e.g. a fine-tuned encoder)."""
        return self.schedule.frozen(self.model) + [aux.module(self) for aux in self.auxiliaries()
                                                   if not aux.trainable_after]

    # -------------------------------------------------------------------------------- optimiser and checkpoints
    def configure_optimizers(self) -> Any:
        if self.schedule.staged:  # the optimiser holds every parameter of the model; stages switch them on and off
            params = [p for p in self.model.parameters()]
        else:
            params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, naming the difference, a checkpoint of another model / class count / channel count (before
        Lightning's load_state_dict fails deep inside torch)."""
        saved = checkpoint.get("hyper_parameters")
        if isinstance(saved, dict) and "model_name" in saved:
            check_same_model(model_spec(saved), {k: self.hparams.get(k) for k in ("model_name", "num_classes",
                                                                                   "in_chans")}, "the checkpoint")
