"""AOG R-CNN's TensorBoard pictures: detections with their parse-tree leaves."""

from __future__ import annotations


import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from zoo.engine.callbacks import FixedBatchCallback


class ParseTreeCallback(FixedBatchCallback):
    """After each validation epoch: detections on a fixed set of validation images, each box with the leaves of its
    parse tree drawn inside it (the AOG detector's extractive rationale; baselines: boxes only).

    TensorBoard ``detections/parse_trees`` and, in the run folder, ``parse_trees/epoch<e>.png``."""

    def __init__(self, num_images: int = 8, score_threshold: float = 0.5) -> None:
        super().__init__()
        self.num_items, self.score_threshold = num_images, score_threshold

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        from torchvision.utils import draw_bounding_boxes

        dataset = trainer.datamodule.splits["val"]
        images = [dataset[i][0] for i in range(min(self.num_items, len(dataset)))]
        detections = pl_module.model([im.to(pl_module.device) for im in images])
        parser = getattr(pl_module, "leaf_parser", None)
        panels = []
        for image, found in zip(images, detections):
            keep = found["scores"] >= self.score_threshold
            boxes = found["boxes"][keep].cpu()
            canvas = (image[:3].clamp(0, 1) * 255).to(torch.uint8)
            if "parse_leaves" in found and parser is not None and len(boxes):
                leaves = parser.leaf_boxes(boxes)[found["parse_leaves"][keep].cpu()]  # (n_leaves, 4)
                canvas = draw_bounding_boxes(canvas, leaves, colors="yellow", width=1)
            if len(boxes):
                labels = [str(int(label)) for label in found["labels"][keep]]
                canvas = draw_bounding_boxes(canvas, boxes, labels=labels, colors="white", width=1)
            panels.append(canvas.float() / 255)
        grid = make_grid(panels, nrow=min(4, len(panels)))
        save_image(grid, self.run_folder(trainer, "parse_trees") / f"epoch{trainer.current_epoch}.png")
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image("detections/parse_trees", grid, trainer.global_step)
