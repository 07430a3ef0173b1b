"""ICNN's TensorBoard pictures: the most active filters' maps over a fixed validation batch, labelled."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from zoo.backbones import model_map_geometry
from zoo.engine.callbacks import FixedBatchCallback
from zoo.figures import class_name, heatmap_overlay, new_figure


class FilterMapsCallback(FixedBatchCallback):
    """After each validation epoch: the `num_filters` most active filters' maps over a fixed validation batch (one
    image of each class first, see `FixedBatchCallback.fixed_batch`).

    Each cell is drawn at its receptive-field centre (the backbone's measured geometry), where location instability
    and part IoU place it. One labelled figure, one row per filter named by its filter id, assigned category (class
    name) and best-matching ground-truth part with its hit rate (from the System's part IoU; "none" for a filter
    that hits no part), each image titled with its true class:
    TensorBoard figure ``filters/maps`` and text ``filters/table``; in the run folder ``filters/epoch<e>.png`` and
    ``filters/epoch<e>.md`` (the same labels as a table).

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
        batch = self.fixed_batch(trainer)
        images = batch[pl_module.input_key].to(pl_module.device)
        out = pl_module.model(images)
        maps = out[key].float()  # (N, F, h, w)
        top = maps.flatten(2).amax(-1).mean(0).topk(min(self.num_filters, maps.shape[1])).indices  # (k,)
        shown = self.displayable(trainer, images)  # normalisation undone: the images as they look
        geometry = model_map_geometry(pl_module.model, shown.shape[-2:])  # the cells where the part metrics put them
        panels = heatmap_overlay(shown, maps[:, top].transpose(0, 1).cpu(), geometry)  # (k, N, 3, H, W)
        rows = self._describe(trainer, out, top.tolist(), part_scores)
        labels = batch.get(pl_module.target_key)
        figure, axes = new_figure(len(rows), panels.shape[1])
        for row, ((filter_id, category, part), filter_panels) in enumerate(zip(rows, panels)):
            axes[row, 0].set_ylabel(f"filter {filter_id}\ncategory: {category}\npart: {part}", fontsize=8,
                                   rotation=0, ha="right", va="center")
            for column, panel in enumerate(filter_panels):
                axes[row, column].imshow(panel.permute(1, 2, 0).numpy())
                if row == 0 and torch.is_tensor(labels):
                    axes[row, column].set_title(f"true: {class_name(trainer.datamodule, int(labels[column]))}",
                                                fontsize=8)
        lines = ["| row | filter | category | best part (hit rate) |", "| --- | --- | --- | --- |"]
        lines += [f"| {row} | {filter_id} | {category} | {part} |" for row, (filter_id, category, part) in
                  enumerate(rows)]
        self.publish(trainer, "filters", figure, "\n".join(lines) + "\n", "maps")

    @staticmethod
    def _describe(trainer: pl.Trainer, out: dict, filters: list[int],
                  scores: torch.Tensor | None) -> list[tuple[int, str, str]]:
        """(filter id, category as a class name, best part with its hit rate) per shown filter. A filter that hits no
        part (every score 0 or NaN) is "none": the argmax of its all-zero row would name part type 0 ("red circle
        (0.00)"), a part the filter does not match."""
        categories = out["filter_category"][-1].tolist() if "filter_category" in out else None
        names = getattr(trainer.datamodule, "attribute_names", None)
        rows = []
        for f in filters:
            category = class_name(trainer.datamodule, categories[f]) if categories is not None else "-"
            part = "-"
            if scores is not None and f < len(scores):
                row = scores[f].nan_to_num(0.0)  # (P,) hit rate per part type; NaN: a part type never seen
                best = int(row.argmax())
                name = names[best] if names and best < len(names) else best
                part = f"{name} ({row[best]:.2f})" if row[best] > 0 else "none"  # all 0: argmax would say part 0
            rows.append((f, category, part))
        return rows
