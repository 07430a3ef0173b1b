"""The AOG-parsed R-CNN's System: torchvision's detector losses in training, mAP and parse-part IoU in evaluation."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn as nn

from zoo.aog_rcnn.callback import draw_detections
from zoo.aog_rcnn.metrics import DetectionAP, ParsePartIoU
from zoo.checks import check_finite
from zoo.engine import ZooSystem

Detections = list[dict[str, torch.Tensor]]


def dataset_indices(targets: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """(N,) the images' dataset indices, from each target's "index", or None where a target has none."""
    index = [t.get("index") for t in targets]
    return torch.stack(index) if index and all(i is not None for i in index) else None


def detection_rows(found: dict[str, torch.Tensor], class_names: list[str]) -> list[dict[str, Any]]:
    """One row per detection of one image, in the image's pixels: `object` (its rank), `label` (1-based, 0 is
    the background) and `label_name`, `score`, the box corners `x1 y1 x2 y2` and, for AOG, `parse_leaves`: the
    rectangles of its parse tree's leaves as "x1 y1 x2 y2" joined by "; "."""
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


def folding_stages(unfold_epoch: int) -> list[dict[str, Any]]:
    """The paper's schedule as stages: OR-nodes take the mean of their children (folding: every configuration is
    integrated while the parameters are untrained) for `unfold_epoch` epochs, then the max (unfolding: the best
    parse tree). Logged as schedule/stage (0 folding, 1 unfolding)."""
    if unfold_epoch < 0:
        raise ValueError(f"unfold_epoch must be >= 0; got {unfold_epoch}.")
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
        unfold_epoch: the folding -> unfolding schedule (`folding_stages`); None keeps the model's `or_mode` (or
            the `stages` given). Other arguments as ZooSystem's; `loss` is not taken: the detector computes its own.

    Twins (`train.py compare --config configs/aog_rcnn/<x>.yaml`): R-FCN's average vote and torchvision's
    TwoMLPHead on the same backbone, RPN and proposals. `{backbone}` is the model name less the family's prefix
    ("tinycnn" for "aog_rcnn_tinycnn"), so the twins' names are "vote_rcnn_" / "faster_rcnn_" + it.
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "average_vote": ["--model.init_args.model_name=vote_rcnn_{backbone}"],
        "two_mlp_head": ["--model.init_args.model_name=faster_rcnn_{backbone}"],
    }

    def __init__(self, model_name: str = "aog_rcnn_tinycnn", num_classes: int = 4, in_chans: int | None = 3,
                 image_size: int | None = 128, *, unfold_epoch: int | None = None, **kwargs: Any) -> None:
        if kwargs.get("loss") is not None:
            raise ValueError("AOGRCNNSystem takes no loss: the detector computes torchvision's loss terms itself.")
        if unfold_epoch is not None:
            stages = folding_stages(unfold_epoch)
            if kwargs.get("stages") not in (None, stages):  # a reloaded checkpoint passes both, the same
                raise ValueError("Give unfold_epoch or stages, not both.")
            kwargs["stages"] = stages
        super().__init__(model_name, num_classes, in_chans, image_size, **kwargs)
        self.add_metric("map", DetectionAP(), log_prefix="")
        self.partitions = ("parse", "grid", "box") if self.model.parser is not None else ("grid", "box")
        for partition in self.partitions:
            self.add_metric(f"{partition}_parts", ParsePartIoU(), log_prefix=f"{partition}_")

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
