"""The Interpretable CNN's System: the classifier's, plus the filter statistics and the part metrics."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from zoo.distributed import updated_on_any_rank
from zoo.engine import ZooSystem
from zoo.icnn.metrics import LocationInstability, PartIoU


class ICNNSystem(ZooSystem):
    """Train an Interpretable CNN (or, as its twin, any classifier) and score what its filters mean.

    After each training forward the model updates its online statistics (Z_T, filter categories; a balanced
    assignment is solved before the next forward, see `InterpretableFilters`). In validation
    and test the map `part_maps_key` ("filter_maps" for ICNN, "features" for an opaque twin) is scored for
    location instability where the batch has landmarks and part IoU where it has part masks.

    Twins (`train.py compare --config configs/icnn/<x>.yaml`): the paper's ordinary twin (the same network with
    ordinary conv layers, lambda 0), the masked twin (masks kept, lambda 0: an ablation of the masks) and the
    plain classifier on the same backbone (`{backbone}` is the model name less "icnn_"; it keeps the model_kwargs a
    classifier takes, so the same `backbone` of icnn_timm and the same `pretrained_path` weights, and drops the
    ICNN's own: `zoo.cli.compare.declared_twins`), reading the layer ICNN's filters read (`top_conv`: conv5_3 on
    VGG, not pool5), so both are scored at the same resolution.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "ordinary_twin": ["--model.init_args.loss.init_args.weight=0", "--model.init_args.model_kwargs.masks=false"],
        "masked_twin": ["--model.init_args.loss.init_args.weight=0"],
        "plain_cnn": ["--model.init_args.loss.init_args.weight=0", "--model.init_args.model_name=baseline_{backbone}",
                      "--model.init_args.model_kwargs=null",  # then set, not merged into the ICNN's kwargs
                      "--model.init_args.model_kwargs={shared_model_kwargs}",
                      "--model.init_args.model_kwargs.top_conv=true",  # VGG: conv5_3, the map ICNN's filters read
                      "--model.init_args.part_maps_key=features"],
    }

    def __init__(self, model_name: str = "icnn_tinycnn", *args: Any, part_maps_key: str | None = "filter_maps",
                 **kwargs: Any) -> None:
        super().__init__(model_name, *args, **kwargs)  # the family's own default model, not the engine's classifier
        self.check_plain_model_settings(part_maps_key)
        self.part_maps_key = part_maps_key
        self.add_metric("acc", MulticlassAccuracy(self.hparams.num_classes, average="micro"),
                        stages=("train", "val", "test"))
        if part_maps_key is not None:
            stride, offset = self._top_map_geometry()
            self.add_metric("location_instability", LocationInstability(self.hparams.image_size or 0, stride=stride,
                                                                        offset=offset))
            self.add_metric("part_iou", PartIoU(image_size=self.hparams.image_size or None, stride=stride,
                                                offset=offset))  # part masks: upsampled with the cells in place

    def check_plain_model_settings(self, part_maps_key: str | None) -> None:
        """Refuse, when built, ICNN settings a classifier without interpretable filters (a twin built by hand) cannot
        give: the filter loss reads the filters' template scores, and `filter_maps` / `masked_filter_maps` are their
        maps; both failed with a bare KeyError in the sanity check (in a compare, after the earlier runs trained)."""
        if hasattr(self.model, "interpretable_layers"):
            return
        built = f"model {self.hparams.model_name} ({type(self.model).__name__}) has no interpretable filters"
        weight = getattr(self.loss, "base_weight", 0)
        if weight:
            raise ValueError(f"ICNNSystem: {built}, so the filter loss ({type(self.loss).__name__} weight={weight}) "
                             f"has no template scores to read. Give --model.init_args.loss.init_args.weight=0 (the "
                             f"task term alone, as the plain_cnn twin), or an icnn_* model.")
        if part_maps_key in ("filter_maps", "masked_filter_maps"):
            raise ValueError(f"ICNNSystem: {built}, so it gives no {part_maps_key!r} for the part metrics. Give "
                             f"--model.init_args.part_maps_key=features (its top map, as the plain_cnn twin scores "
                             f"it), or null (no part metrics).")

    def on_train_start(self) -> None:
        """Warn when the backbone starts frozen while ICNN's first interpretable layer reads its top conv stage: that
        layer's filters are the stage's own, so its filter loss trains no weight while the backbone is frozen (only
        the added conv layer's filters learn to be interpretable meanwhile), and its filter metrics score the
        pretrained filters as they were. At train start: a resumed fit's epoch is restored by then (a fit resumed
        past unfreeze_epoch is not told)."""
        super().on_train_start()
        top = getattr(self.model, "top_filters", None)
        backbone = getattr(self.model, "backbone", None)
        if top is None or backbone is None or not getattr(self.loss, "weight", 0):
            return
        built_frozen = not any(p.requires_grad for p in backbone.parameters())
        unfreeze = None if built_frozen else self.hparams.get("unfreeze_epoch")
        if not (built_frozen or self.hparams.get("freeze_backbone")):
            return
        if unfreeze is not None and self.current_epoch >= unfreeze:
            return
        until = f"until epoch {unfreeze} (unfreeze_epoch)" if unfreeze is not None else "for the whole fit"
        rank_zero_warn(f"ICNNSystem: the backbone is frozen {until}, and its top conv stage holds the filters of "
                       f"ICNN's first interpretable layer (top_filters): their filter loss trains no weight while it "
                       f"is frozen, so only the added conv layer's filters learn to be interpretable, and the top "
                       f"layer's filter metrics score the pretrained filters. Give an earlier unfreeze_epoch, or "
                       f"fine-tune the whole backbone at a smaller rate (backbone_lr_scale) instead of freezing it.")

    def _top_map_geometry(self) -> tuple[Any, Any]:
        """Stride and offset ((y, x) pixels) of the scored map's cells, for both part metrics: the backbone's top
        map, which ICNN's added 3x3 layer and the plain twin's features keep. Measured by a traced dry run
        (`Backbone.map_geometry`), as a cell's receptive-field centre depends on the net's padding, not only its
        stride; (stride, None) where it cannot be traced, None without a backbone or an image size."""
        backbone = getattr(self.model, "backbone", None)
        if backbone is None or not hasattr(backbone, "reductions"):
            return None, None
        if not self.hparams.image_size or not hasattr(backbone, "map_geometry"):
            return backbone.reductions[-1], None
        geometry, stride = backbone.map_geometry(self.hparams.image_size)[-1], backbone.reductions[-1]
        if geometry is None:
            return stride, None
        return (stride if geometry.stride == (stride, stride) else geometry.stride), geometry.offset

    def default_loss(self) -> nn.Module:
        """The paper's filter loss (lambda 1, on `target_key`) for an Interpretable CNN, cross-entropy for any other
        classifier (a twin): a config without `loss:` still trains the filters."""
        if not hasattr(self.model, "interpretable_layers"):
            return super().default_loss()
        from losses.icnn import FilterPartLoss

        return FilterPartLoss(target_key=self.target_key)

    def forward_batch(self, batch: Any, stage: str) -> dict[str, Any]:
        if hasattr(self.model, "refresh_categories"):
            self.model.refresh_categories()  # the previous step's host solve, outside a compiled forward
        return super().forward_batch(batch, stage)

    def on_skipped_batch(self) -> None:
        if hasattr(self.model, "discard_queued"):
            self.model.discard_queued()  # the skipped batch's class shares: their statistics were restored

    def update_state(self, out: dict[str, Any], batch: dict[str, Any]) -> None:
        if hasattr(self.model, "update_statistics"):
            self.model.update_statistics(out, batch, self.target_key)

    def update_metrics(self, out: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        super().update_metrics(out, batch, stage)
        if stage == "train" or self.part_maps_key is None:
            return
        maps = out[self.part_maps_key]
        if "landmarks" in batch:
            self.log_metric(stage, "location_instability", maps, batch["landmarks"], batch.get("landmark_visible"),
                            batch.get(self.target_key))
        if "part_masks" in batch:
            self.log_metric(stage, "part_iou", maps, batch["part_masks"], batch.get("part_types"))

    def filter_part_scores(self) -> torch.Tensor | None:
        """This validation epoch's per-filter part hit rates (F, K): which filter means what. A collective call
        under DDP (every rank must make it, and each decides alike whether to gather: `updated_on_any_rank`); None
        without part metrics or before any validation batch."""
        metric = self.metrics["val_part_iou"] if self.part_maps_key is not None else None
        if metric is None or not updated_on_any_rank([metric], self.device)[0]:  # no part masks, on any rank
            return None
        with metric.sync_context(should_sync=self.trainer.world_size > 1):
            return metric.part_scores()
