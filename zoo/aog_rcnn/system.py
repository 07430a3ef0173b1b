"""The AOG-parsed R-CNN's System: torchvision's detector losses in training, mAP and parse-part IoU in evaluation."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from zoo.aog_rcnn.callback import draw_detections
from zoo.aog_rcnn.metrics import DetectionAP, ParsePartIoU
from zoo.aog_rcnn.model import folded_parse_warning
from zoo.checks import check_finite
from zoo.engine import ZooSystem
from zoo.engine.stages import Schedule

Detections = list[dict[str, torch.Tensor]]


def dataset_indices(targets: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """(N,) the images' dataset indices, from each target's "index", or None where a target has none."""
    index = [t.get("index") for t in targets]
    return torch.stack(index) if index and all(i is not None for i in index) else None


def detection_rows(found: dict[str, torch.Tensor], class_names: list[str]) -> list[dict[str, Any]]:
    """One row per detection of one image, in the image's pixels: `object` (its rank), `label` (1-based, 0 is
    the background) and `label_name`, `score`, the box corners `x1 y1 x2 y2` and, for AOG, `parse_leaves`: the
    rectangles of its parse tree's leaves as "x1 y1 x2 y2" joined by "; " (the tree that scored it when the model
    unfolds; a folding model warns at its first evaluation: `zoo.aog_rcnn.model.folded_parse_warning`)."""
    boxes = found["boxes"].detach().cpu().tolist()
    labels, scores = found["labels"].tolist(), found["scores"].tolist()
    leaves = None
    if "parse_leaves" in found:
        used, rectangles = found["parse_leaves"].cpu().tolist(), found["leaf_boxes"].detach().cpu().tolist()
        leaves = ["; ".join(" ".join(f"{v:.1f}" for v in rect) for rect, on in zip(rects, mask) if on)
                  for rects, mask in zip(rectangles, used)]
    rows = []
    for k, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label - 1}"
        row = {"object": k, "label": label, "label_name": name, "score": round(score, 4),
               **{corner: round(v, 1) for corner, v in zip(("x1", "y1", "x2", "y2"), box)}}
        rows.append(row | ({"parse_leaves": leaves[k]} if leaves is not None else {}))
    return rows


HALF = "half"  # unfold_epoch's default: fold for the first half of the fit's max_epochs, unfold for the rest
UNFOLD_EPOCH_KEY = "zoo_aog_unfold_epoch"  # checkpoint entry: the epoch a default ("half") schedule unfolds at


def half_of(max_epochs: int | None) -> int | None:
    """The epoch the default schedule unfolds at: max_epochs // 2 (the shipped configs' 4 of 8 and 6 of 12), so
    that the last half of the fit unfolds; None when the budget is open (max_epochs None or -1: a fit bounded by
    max_steps or max_time)."""
    return None if max_epochs is None or max_epochs < 0 else max_epochs // 2


def folding_stages(unfold_epoch: int) -> list[dict[str, Any]]:
    """The paper's schedule as stages: OR-nodes take the mean of their children (folding: every configuration is
    integrated while the parameters are untrained) for `unfold_epoch` epochs, then the max (unfolding: the best
    parse tree). Logged as schedule/stage (0 folding, 1 unfolding)."""
    if isinstance(unfold_epoch, bool) or not isinstance(unfold_epoch, int) or unfold_epoch < 0:
        raise ValueError(f"unfold_epoch must be an epoch >= 0, {HALF!r} (the default: unfold for the second half "
                         f"of max_epochs) or None (keep the model's or_mode); got {unfold_epoch!r}.")
    return [{"name": "folding", "epochs": unfold_epoch, "settings": {"or_mode": "mean"}},
            {"name": "unfolding", "epochs": 1, "settings": {"or_mode": "max"}}]


class AOGRCNNSystem(ZooSystem):
    """Train a registered detector (`aog_rcnn_*`, or its opaque twins `vote_rcnn_*`, `faster_rcnn_*`).

    Batches are {"images": [(C, H, W)], "targets": [{"boxes", "labels", ...}]} (datamodules built on
    DetectionDataModule). The loss terms are torchvision's (RPN objectness and boxes, RoI classification and
    boxes), computed inside the model; evaluation has no loss and logs mAP@0.5 (`map_50`, the checkpoint monitor)
    and mAP@[.5:.95] (`map`) and, where the targets have part boxes, the part IoU (`<partition>_part_iou`,
    `_part_recall`, `_leaf_precision`, `_leaves`, `_matched`) of the detector's parse-tree leaves (`parse`, AOG
    only), of the uniform grid of cells (`grid`) and of the whole box (`box`), all on the same detections.

    Args:
        unfold_epoch: the folding -> unfolding schedule (`folding_stages`): the epoch (from 0) the OR-nodes switch
            from mean to max. "half" (the default, for an AOG model given no `stages`): each fit unfolds at
            max_epochs // 2 (the shipped configs' 4 of 8, 6 of 12), read from the trainer when the fit starts and
            kept in the checkpoints, so a resumed fit keeps its run's epoch whatever its max_epochs; a fit with an
            open budget (max_epochs -1: max_steps, max_time) unfolds from the start; a model given its `or_mode`
            (`model_kwargs`) keeps it. None keeps the model's `or_mode` (or the `stages` given). Only an unfolded model's parse trees are the trees that scored its
            detections: a fit that ends folding warns, and so does a folding model's first evaluation outside a fit
            (`zoo.aog_rcnn.model.folded_parse_warning`). Other arguments as ZooSystem's; `loss` is not taken: the
            detector computes its own.

    Twins (`train.py compare --config configs/aog_rcnn/<x>.yaml`): R-FCN's average vote and torchvision's
    TwoMLPHead on the same backbone, RPN and proposals. `{backbone}` is the model name less the family's prefix
    ("tinycnn" for "aog_rcnn_tinycnn"), so the twins' names are "vote_rcnn_" / "faster_rcnn_" + it.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "average_vote": ["--model.init_args.model_name=vote_rcnn_{backbone}"],
        "two_mlp_head": ["--model.init_args.model_name=faster_rcnn_{backbone}"],
    }

    def __init__(self, model_name: str = "aog_rcnn_tinycnn", num_classes: int = 4, in_chans: int | None = 3,
                 image_size: int | None = 128, *, unfold_epoch: int | Literal["half"] | None = HALF,
                 **kwargs: Any) -> None:
        if kwargs.get("loss") is not None:
            raise ValueError("AOGRCNNSystem takes no loss: the detector computes torchvision's loss terms itself.")
        if unfold_epoch is not None and unfold_epoch != HALF:
            stages = folding_stages(unfold_epoch)
            if kwargs.get("stages") not in (None, stages):  # a reloaded checkpoint passes both, the same
                raise ValueError("Give unfold_epoch or stages, not both.")
            kwargs["stages"] = stages
        super().__init__(model_name, num_classes, in_chans, image_size, **kwargs)
        # the default schedule, set for each fit by `setup` (its max_epochs) or a resumed checkpoint; not for given
        # stages, nor for a model given its or_mode (model_kwargs: the user's choice, kept for the whole fit), nor for
        # the twins, which have no OR-nodes
        self.default_unfolding = (unfold_epoch == HALF and kwargs.get("stages") is None
                                  and "or_mode" not in (kwargs.get("model_kwargs") or {})
                                  and self.model.parser is not None)
        self.unfold_at: int | None = None  # the epoch the default schedule unfolds at in this fit (None: not set)
        self.add_metric("map", DetectionAP(), log_prefix="")
        self.partitions = ("parse", "grid", "box") if self.model.parser is not None else ("grid", "box")
        for partition in self.partitions:
            self.add_metric(f"{partition}_parts", ParsePartIoU(), log_prefix=f"{partition}_")

    # ------------------------------------------------------------------------- the default folding -> unfolding
    def set_unfold_epoch(self, epoch: int) -> None:
        """The default schedule (`unfold_epoch="half"`) as stages: fold for `epoch` epochs, then unfold."""
        self.unfold_at = epoch
        self.schedule = Schedule(folding_stages(epoch), self.model)

    def setup(self, stage: str) -> None:
        """A fit of the default schedule unfolds at half of its max_epochs (a resumed fit then takes its checkpoint's
        epoch: `on_load_checkpoint`, which Lightning calls after this and before the optimiser is built)."""
        super().setup(stage)
        if stage != "fit" or not self.default_unfolding:
            return
        max_epochs = self.trainer.max_epochs
        epoch = half_of(max_epochs)
        if epoch is None:
            rank_zero_warn(f"AOGRCNNSystem: unfold_epoch={HALF!r} unfolds at half of max_epochs, and this fit has no "
                           f"max_epochs ({max_epochs}: it ends at max_steps or max_time): it unfolds from the start "
                           f"(OR = max, no folding stage). Give unfold_epoch an epoch to fold first.")
            epoch = 0
        elif self.trainer.ckpt_path is None:  # a resumed fit takes its checkpoint's epoch (`on_load_checkpoint`)
            folding = f"epochs 0-{epoch - 1}" if epoch > 1 else "epoch 0"
            rank_zero_info(f"AOGRCNNSystem: folding (OR = mean) for {folding}, unfolding (OR = max) from epoch "
                           f"{epoch} (unfold_epoch={HALF!r} of max_epochs={max_epochs})." if epoch else
                           f"AOGRCNNSystem: unfolding (OR = max) from the start (unfold_epoch={HALF!r} of "
                           f"max_epochs={max_epochs}).")
        self.set_unfold_epoch(epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.unfold_at is not None:  # a resumed fit keeps it whatever its max_epochs (`on_load_checkpoint`)
            checkpoint[UNFOLD_EPOCH_KEY] = self.unfold_at

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """ZooSystem's checks, then the default schedule's epoch of the run the checkpoint was written by: a fit
        resumed with a larger max_epochs would otherwise fold again after it had unfolded."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(UNFOLD_EPOCH_KEY)
        if self.default_unfolding and isinstance(saved, int):
            self.set_unfold_epoch(saved)

    def on_fit_start(self) -> None:
        """The fit's validations in a folding stage draw and score folded trees on purpose: the model does not warn
        (`on_fit_end` does, if the fit ends folding)."""
        super().on_fit_start()
        self.model.warn_folded = False

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.model.warn_folded = True  # a later validate / test / predict of a folding model warns
        if self.model.or_mode == "mean":
            unfold_epoch = self.hparams.get("unfold_epoch")
            if self.unfold_at is not None:
                schedule = f"the default schedule unfolds at epoch {self.unfold_at}"
            elif unfold_epoch not in (None, HALF) or self.hparams.get("stages") is None:
                schedule = f"unfold_epoch={unfold_epoch!r}"
            else:  # stages of the user's own
                schedule = f"stages {[(stage.name, stage.epochs) for stage in self.schedule.stages]}"
            rank_zero_warn(folded_parse_warning(f"The detector this fit ended with ({schedule}; the fit stopped "
                                                f"after {self.current_epoch} epoch(s))"))

    def default_loss(self) -> nn.Module:
        return nn.Identity()  # unused: torchvision's detectors return their loss terms from the forward

    def forward_batch(self, batch: Any, stage: str) -> dict[str, torch.Tensor] | Detections:
        """Training: torchvision's loss dict; otherwise the detections, per image {"boxes", "scores", "labels",
        "leaf_boxes"} and, for AOG, "parse_leaves" (see `zoo.aog_rcnn.model.ParsingRoIHeads`)."""
        if not isinstance(batch, dict) or "images" not in batch or "targets" not in batch:
            raise TypeError("Detection batches are {'images': [...], 'targets': [...]} (datamodules built on "
                            f"DetectionDataModule); got {type(batch).__name__} "
                            f"{sorted(batch) if isinstance(batch, dict) else ''}.")
        images, targets = batch["images"], batch["targets"]
        if images and all(im.device.type == "cpu" for im in images):  # (N,): non-finite iff the image has NaN/inf
            check_finite(torch.stack([im.abs().amax() for im in images]), "images", dataset_indices(targets))
        if not self.model.training:
            return self.model(images)
        return self.model(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])

    def compute_loss(self, out: Any, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        return dict(out) if stage == "train" else {}  # evaluation: metrics only

    def update_metrics(self, out: Any, batch: Any, stage: str) -> None:
        if stage == "train":
            return
        targets = batch["targets"]
        self.log_metric(stage, "map", out, targets)
        if not all("part_boxes" in t for t in targets):
            return
        fixed = self.model.fixed_partitions()  # {"grid", "box"}: (T,) bool
        for partition in self.partitions:
            preds = [{**found, "leaf_mask": found["parse_leaves"] if partition == "parse"
                      else fixed[partition][None].expand(len(found["boxes"]), -1)} for found in out]  # (D, T)
            self.log_metric(stage, f"{partition}_parts", preds, targets)

    def batch_size(self, batch: Any) -> int:
        return len(batch["images"])

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Each image's detections ("detections", as the model returns them) and, for `train.py predict`'s
        predictions.csv, one row per detection ("rows": `detection_rows`) and pictures of the first `count` images'
        detections scoring >= 0.5 with their parse trees ("pictures": (batch, count) -> list); "index" (B,) the images'
        dataset indices, where the targets give them."""
        detections = self.forward_batch(batch, "predict")
        index = dataset_indices(batch["targets"])
        return {"detections": detections, **({"index": index} if index is not None else {}),
                "rows": [detection_rows(found, self.class_names) for found in detections],
                "pictures": partial(self.draw_predictions, detections)}  # holds no image: predict keeps outputs

    def draw_predictions(self, detections: Detections, batch: Any, count: int) -> list[torch.Tensor]:
        """Pictures of the first `count` images of `batch` with their `detections` (`draw_detections`)."""
        return [draw_detections(image, found, self) for image, found in zip(batch["images"][:count], detections)]

    def explanation_report(self, datamodule: Any, settings: dict[str, Any]) -> None:
        """None: post-hoc explainers score classifiers; a detection's rationale (its parse tree) is scored by the
        part IoU metrics above."""
        return None
