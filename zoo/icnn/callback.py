"""ICNN's TensorBoard pictures: the most active filters' maps over a fixed validation batch."""

from __future__ import annotations


import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from zoo.engine.callbacks import FixedBatchCallback, heatmap_overlay


class FilterMapsCallback(FixedBatchCallback):
    """After each validation epoch: the `num_filters` most active filters' maps over a fixed validation batch.

    Writes a TensorBoard image per filter (tag ``filters/<rank>_f<id>``) and, in the run folder, ``filters/
    epoch<e>.png`` (one row per filter) with ``filters/epoch<e>.md`` naming each row's filter, assigned category
    (by class name: the System's `class_names`) and best-matching ground-truth part (from the System's part IoU).

    Args:
        num_filters: filters shown, ranked by mean peak activation on the fixed batch.
        num_images: images in the fixed batch.
        maps_key: model output to show; default the System's `part_maps_key`.
    """

    def __init__(self, num_filters: int = 8, num_images: int = 8, maps_key: str | None = None) -> None:
        super().__init__()
        self.num_filters, self.num_items, self.maps_key = num_filters, num_images, maps_key

    def collective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        return pl_module.filter_part_scores() if hasattr(pl_module, "filter_part_scores") else None

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, part_scores: torch.Tensor | None) -> None:
        key = self.maps_key or getattr(pl_module, "part_maps_key", None) or "features"
        images = self.fixed_batch(trainer)[pl_module.input_key].to(pl_module.device)
        out = pl_module.model(images)
        maps = out[key].float()  # (N, F, h, w)
        top = maps.flatten(2).amax(-1).mean(0).topk(min(self.num_filters, maps.shape[1])).indices  # (k,)
        panels = heatmap_overlay(images.float(), maps[:, top].transpose(0, 1))  # (k, N, 3, H, W)
        rows = self._describe(trainer, out, top.tolist(), part_scores, getattr(pl_module, "class_names", None))
        if isinstance(trainer.logger, TensorBoardLogger):
            for panel, (filter_id, text) in zip(panels, rows):
                tag = f"filters/{filter_id:04d}"
                trainer.logger.experiment.add_image(tag, make_grid(panel, nrow=len(panel)), trainer.global_step)
                trainer.logger.experiment.add_text(tag, text, trainer.global_step)
        folder = self.run_folder(trainer, "filters")
        save_image(panels.flatten(0, 1), folder / f"epoch{trainer.current_epoch}.png", nrow=panels.shape[1])
        lines = ["| row | filter | category | best part (hit rate) |", "| --- | --- | --- | --- |"]
        lines += [f"| {row} | {text} |" for row, (_, text) in enumerate(rows)]
        (folder / f"epoch{trainer.current_epoch}.md").write_text("\n".join(lines) + "\n")

    @staticmethod
    def _describe(trainer: pl.Trainer, out: dict, filters: list[int], scores: torch.Tensor | None,
                  class_names: list[str] | None) -> list[tuple[int, str]]:
        categories = out["filter_category"][-1].tolist() if "filter_category" in out else None
        names = getattr(trainer.datamodule, "attribute_names", None)
        rows = []
        for f in filters:
            category = "-" if categories is None else str(categories[f])
            if class_names and categories is not None and 0 <= categories[f] < len(class_names):
                category = class_names[categories[f]]
            part = "-"
            if scores is not None and f < len(scores):
                best = int(scores[f].argmax())
                part = f"{names[best] if names and best < len(names) else best} ({scores[f, best]:.2f})"
            rows.append((f, f"{f} | {category} | {part}"))
        return rows
