"""AOG R-CNN's TensorBoard pictures: detections with their parse-tree leaves."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

from zoo.engine.callbacks import FixedBatchCallback, logged_step, record_name, run_folder
from zoo.figures import class_name, log_image


def pad_to_largest(panels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images (C, H_i, W_i) of their own sizes (a detector's inputs: VOC's photographs differ) padded with black at
    the bottom and right to the largest height and width, so that they tile into one grid."""
    height, width = max(p.shape[-2] for p in panels), max(p.shape[-1] for p in panels)
    return [F.pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2])) for p in panels]


def draw_detections(image: torch.Tensor, found: dict[str, torch.Tensor], names: Any,
                    score_threshold: float = 0.5) -> torch.Tensor:
    """The image (C, H, W) in [0, 1] with its detections scoring >= `score_threshold` drawn: each box in white,
    labelled with its class name (`class_name(names, label - 1)`: detector labels are 1-based, 0 = background) and
    score, and, for AOG, the leaves of its parse tree in yellow inside it -> (3, H, W) in [0, 1]."""
    keep = found["scores"] >= score_threshold
    boxes = found["boxes"][keep].detach().cpu()
    canvas = (image[:3].detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
    if "parse_leaves" in found and len(boxes):
        leaves = found["leaf_boxes"][keep][found["parse_leaves"][keep]].detach().cpu()  # (leaves of kept boxes, 4)
        canvas = draw_bounding_boxes(canvas, leaves, colors="yellow", width=1)
    if len(boxes):
        labels = [f"{class_name(names, int(label) - 1)} {score:.2f}"
                  for label, score in zip(found["labels"][keep].tolist(), found["scores"][keep].tolist())]
        canvas = draw_bounding_boxes(canvas, boxes, labels=labels, colors="white", width=1)
    return canvas.float() / 255


class ParseTreeCallback(FixedBatchCallback):
    """After each validation epoch: detections on a fixed set of validation images, each box with the leaves of its
    parse tree drawn inside it (the AOG detector's extractive rationale; baselines: boxes only).

    Reads the detections only: "boxes" (D, 4), "scores" (D,), "labels" (D,) and, for AOG, "leaf_boxes" (D, T, 4)
    with "parse_leaves" (D, T) bool (the terminals of each detection's parse tree). Boxes are labelled with the
    datamodule's class name (detector labels are 1-based, 0 = background) and their score.
    TensorBoard ``detections/parse_trees`` and, in the run folder, ``parse_trees/epoch<e>.png`` (``validate.png``
    outside fit)."""

    def __init__(self, num_images: int = 8, score_threshold: float = 0.5) -> None:
        super().__init__()
        self.num_items, self.score_threshold = num_images, score_threshold

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        images = self.fixed_batch(trainer)["images"]
        detections = pl_module([im.to(pl_module.device) for im in images])
        panels = [draw_detections(image, found, trainer.datamodule, self.score_threshold)
                  for image, found in zip(images, detections)]
        grid = make_grid(pad_to_largest(panels), nrow=min(4, len(panels)))
        folder = run_folder(trainer, "parse_trees")
        if folder is not None:  # None: no run folder (fast_dev_run)
            save_image(grid, folder / f"{record_name(trainer)}.png")
        log_image(trainer.loggers, "detections/parse_trees", grid, logged_step(trainer))
