"""Lightning systems: a registered model plus a loss module; the loss dict is summed, every term is logged.

Imported on demand (``from zoo.systems import ClassificationSystem``) so that `import zoo` needs no Lightning.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from losses import ClassificationLoss
from metrics.part_location import LocationInstability, PartIoU
from zoo._registry import create_model, needs_image_size

STAGES = ("train", "val", "test")


def batch_field(batch: dict[str, Any], key: str) -> Any:
    """`batch[key]` with an error that lists what the batch does hold."""
    if not isinstance(batch, dict):
        raise TypeError(f"Batches must be dicts of tensors; got {type(batch).__name__}.")
    if key not in batch:
        raise KeyError(f"The batch has no {key!r}; it holds {sorted(batch)}. Set input_key/target_key to match.")
    return batch[key]


class ClassificationSystem(pl.LightningModule):
    """Train any registered classifier with a named-terms loss, accuracy per stage, optimiser from the config.

    Args:
        model_name: registry name, e.g. "baseline_tinycnn".
        num_classes: linked from the datamodule by the CLI.
        in_chans: image channels, linked from the datamodule by the CLI.
        model_kwargs: extra keyword arguments for `zoo.create_model`.
        loss: module returning named loss terms; default: cross-entropy as "loss_task".
        optimizer / scheduler: callables injected by LightningCLI (``optimizer: {class_path: torch.optim.SGD}``).
        input_key / target_key: batch fields fed to the model and to the accuracy.
        part_maps_key: model output scored for part interpretability in validation/test ("filter_maps" for ICNN,
            "features" for an opaque twin): location instability where the batch has landmarks, part IoU where it
            has part masks. None skips them.
        image_size: input side in pixels (linked from the datamodule): places map units in the image for the part
            metrics, and sizes models marked `input_size_aware` (unless model_kwargs sets it).
        nonfinite_loss: a NaN/inf training loss "raise"s `FloatingPointError` naming the step, the batch and every
            term (the last good checkpoint stays), or "skip"s the batch with a warning.
    """

    def __init__(
        self,
        model_name: str = "baseline_tinycnn",
        num_classes: int = 10,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        input_key: str = "image",
        target_key: str = "label",
        part_maps_key: str | None = None,
        image_size: int = 64,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        model_kwargs = dict(model_kwargs or {})
        if needs_image_size(model_name):  # e.g. ICNN's template bank is sized for the top map of this input
            model_kwargs.setdefault("image_size", image_size)
        self.model = create_model(model_name, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
        self.loss = loss if loss is not None else ClassificationLoss()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.input_key, self.target_key = input_key, target_key
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip'; got {nonfinite_loss!r}.")
        self.nonfinite_loss = nonfinite_loss
        # Keyed "<stage>_acc": a ModuleDict key "train" would shadow nn.Module.train.
        self.metrics = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in STAGES})
        self.part_maps_key = part_maps_key
        if part_maps_key is not None:
            for stage in ("val", "test"):
                self.metrics[f"{stage}_location_instability"] = LocationInstability(image_size)
                self.metrics[f"{stage}_part_iou"] = PartIoU()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)

    def _step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> torch.Tensor | None:
        images, labels = batch_field(batch, self.input_key), batch_field(batch, self.target_key)
        out = self.model(images)
        if stage == "train" and hasattr(self.model, "update_statistics"):
            self.model.update_statistics(out, batch)  # online statistics (e.g. ICNN's Z_T, categories), never in eval
        terms = self.loss(out, batch)
        loss = torch.stack(list(terms.values())).sum()
        if stage == "train" and not torch.isfinite(loss):
            message = (f"Non-finite training loss at global step {self.global_step}, epoch {self.current_epoch}, "
                       f"batch {batch_idx}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            if self.nonfinite_loss == "raise":
                raise FloatingPointError(message + ". The last checkpoint is the last good state.")
            rank_zero_warn(message + "; batch skipped (nonfinite_loss='skip').")
            return None  # Lightning skips the optimiser step
        on_step = stage == "train"
        log_kw = dict(on_step=on_step, on_epoch=True, batch_size=len(labels), sync_dist=not on_step)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, **log_kw)
        self.log(f"{stage}/loss", loss, prog_bar=on_step, **log_kw)
        accuracy = self.metrics[f"{stage}_acc"]
        accuracy.update(out["logits"].detach(), labels)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        if self.part_maps_key is not None and stage != "train":
            self._update_part_metrics(out[self.part_maps_key], batch, stage)
        return loss

    def _update_part_metrics(self, maps: torch.Tensor, batch: dict[str, Any], stage: str) -> None:
        if "landmarks" in batch:
            metric = self.metrics[f"{stage}_location_instability"]
            metric.update(maps, batch["landmarks"], batch.get("landmark_visible"), batch.get(self.target_key))
            self.log(f"{stage}/location_instability", metric, on_step=False, on_epoch=True)
        if "part_masks" in batch:
            metric = self.metrics[f"{stage}_part_iou"]
            metric.update(maps, batch["part_masks"], batch.get("part_types"))
            self.log(f"{stage}/part_iou", metric, on_step=False, on_epoch=True)

    def filter_part_scores(self) -> torch.Tensor | None:
        """This validation epoch's per-filter part hit rates (F, K): which filter means what. A collective call
        under DDP (every rank must make it); None without part metrics or before any validation batch."""
        metric = self.metrics["val_part_iou"] if self.part_maps_key is not None else None
        if metric is None or metric.update_count == 0:
            return None
        with metric.sync_context(should_sync=self.trainer.world_size > 1):
            return metric.part_scores()

    def on_train_epoch_start(self) -> None:
        """Loss schedules (e.g. ICNN's lambda / epoch) step here and are logged."""
        if hasattr(self.loss, "set_epoch"):
            for name, value in self.loss.set_epoch(self.current_epoch).items():
                self.log(f"schedule/{name}", value, on_step=False, on_epoch=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.model(batch_field(batch, self.input_key))
        probs = out["logits"].softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1), **({"index": batch["index"]} if "index" in batch else {})}

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
