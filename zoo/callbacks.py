"""Lightning callbacks that show what a model's interpretable units do (rank zero, eval mode, no grad)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.seed import isolate_rng
from torchvision.utils import make_grid, save_image


class LatestCheckpoint(ModelCheckpoint):
    """`last.ckpt` after every validation, whether or not the monitored metric improved (Lightning's `save_last`
    only refreshes it when a top-k checkpoint is written, so a killed run could resume from a stale state)."""

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         enable_version_counter=False)


class RNGStateCallback(pl.Callback):
    """Saves the torch, numpy and Python random states in every checkpoint and restores them on resume, so a run
    killed mid-epoch and resumed from last.ckpt draws the same batches and noise as an uninterrupted one.
    States are stored as tensors and plain lists: the checkpoint still loads with weights_only=True."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        version, python_state, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
            "python": {"version": version, "state": list(python_state), "gauss": gauss},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        numpy_state = state["numpy"]
        np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["gauss"]))
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


class FixedBatchCallback(pl.Callback):
    """Base of every picture callback: after each validation epoch (not the sanity check), on rank zero, `draw` gets
    a fixed validation batch and the model in eval mode under no_grad; the training mode is restored afterwards.

    Everything runs under `isolate_rng`: building the batch iterates a DataLoader, which draws its base seed from
    the global torch generator. Without the isolation the first picture of a run shifts every later shuffle, and
    a run resumed from last.ckpt (which draws that seed one epoch later) is not the run that never died.

    Subclasses set `num_items` and implement `draw(trainer, pl_module, batch)`; `collective(trainer, pl_module)`
    runs on every rank first (for metrics that synchronise) and its result is passed to `draw` as `shared`.
    """

    num_items: int = 8

    def __init__(self) -> None:
        self.batch: Any = None

    def fixed_batch(self, trainer: pl.Trainer) -> Any:
        """The first `num_items` of the first validation batch, taken once and kept."""
        if self.batch is None:
            batch = next(iter(trainer.datamodule.val_dataloader()))
            self.batch = {k: v[: self.num_items] for k, v in batch.items()}
        return self.batch

    def collective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return None

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: Any) -> None:
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with isolate_rng():
            shared = self.collective(trainer, pl_module)
            if not trainer.is_global_zero:
                return
            was_training = pl_module.training
            pl_module.eval()
            try:
                with torch.no_grad():
                    self.draw(trainer, pl_module, shared)
            finally:
                pl_module.train(was_training)

    @staticmethod
    def run_folder(trainer: pl.Trainer, name: str) -> Path:
        folder = Path(trainer.log_dir or trainer.default_root_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def heatmap_overlay(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] with maps (F, N, h, w) overlaid in red: (F, N, 3, H, W)."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    heat = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)  # (F, N, H, W)
    heat = heat / heat.flatten(1).amax(1).clamp(min=1e-8)[:, None, None, None]  # per filter over the batch
    red = torch.tensor([1.0, 0.1, 0.1], device=images.device)[None, None, :, None, None]
    return (0.45 * rgb[None] + 0.55 * heat[:, :, None] * red).clamp(0, 1)


class FilterMapsCallback(FixedBatchCallback):
    """After each validation epoch: the `num_filters` most active filters' maps over a fixed validation batch.

    Writes a TensorBoard image per filter (tag ``filters/<rank>_f<id>``) and, in the run folder, ``filters/
    epoch<e>.png`` (one row per filter) with ``filters/epoch<e>.md`` naming each row's filter, assigned category
    and best-matching ground-truth part (from the System's part IoU).

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
        rows = self._describe(trainer, out, top.tolist(), part_scores)
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
    def _describe(trainer: pl.Trainer, out: dict, filters: list[int],
                  scores: torch.Tensor | None) -> list[tuple[int, str]]:
        categories = out["filter_category"][-1].tolist() if "filter_category" in out else None
        names = getattr(trainer.datamodule, "attribute_names", None)
        rows = []
        for f in filters:
            category = str(categories[f]) if categories is not None else "-"
            part = "-"
            if scores is not None and f < len(scores):
                best = int(scores[f].argmax())
                part = f"{names[best] if names and best < len(names) else best} ({scores[f, best]:.2f})"
            rows.append((f, f"{f} | {category} | {part}"))
        return rows


class SelectionCallback(FixedBatchCallback):
    """After each validation epoch: what a feature selector (L2X, INVASE) keeps for a fixed validation batch.

    Images: the input with unselected patches dimmed (TensorBoard ``selection/images`` and, in the run folder,
    ``selection/epoch<e>.png``); token ids: the text with selected words in **bold**, and vectors: the selected
    feature indices next to the true ones (TensorBoard text ``selection/text``, ``selection/epoch<e>.md``).
    """

    def __init__(self, num_samples: int = 8) -> None:
        super().__init__()
        self.num_items = num_samples

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        batch = self.fixed_batch(trainer)
        x = batch[pl_module.input_key].to(pl_module.device)
        selection = pl_module.model(x)["selection"]  # (N, d) hard in eval mode
        folder = self.run_folder(trainer, "selection")
        experiment = trainer.logger.experiment if isinstance(trainer.logger, TensorBoardLogger) else None
        if x.ndim == 4:
            kept = pl_module.model.space.pixel_mask(selection)  # (N, 1, H, W)
            shown = x.float() * (0.25 + 0.75 * kept)  # unselected patches dimmed, not hidden
            panels = torch.cat([x.float(), shown])  # originals above, selections below
            scale = max(1, 64 // x.shape[-1])  # small images (digits are 8x8) are enlarged to be seen
            grid = make_grid(F.interpolate(panels, scale_factor=scale, mode="nearest"), nrow=len(x))
            save_image(grid, folder / f"epoch{trainer.current_epoch}.png")
            if experiment is not None:
                experiment.add_image("selection/images", grid, trainer.global_step)
            return
        decode = getattr(trainer.datamodule, "decode_selection", None) or self._describe
        lines = [decode(x[i].cpu(), selection[i].cpu()) for i in range(len(x))]
        if "relevant" in batch:
            lines = [f"{line}  (true: {batch['relevant'][i].nonzero().flatten().tolist()})"
                     for i, line in enumerate(lines)]
        text = "\n\n".join(f"{i}. {line}" for i, line in enumerate(lines))
        (folder / f"epoch{trainer.current_epoch}.md").write_text(text + "\n")
        if experiment is not None:
            experiment.add_text("selection/text", text, trainer.global_step)

    @staticmethod
    def _describe(x: torch.Tensor, selection: torch.Tensor) -> str:
        return f"selected features {selection.nonzero().flatten().tolist()}"


class ExplanationTextCallback(FixedBatchCallback):
    """After each validation epoch: the generated explanation of each image of a fixed validation batch, beside the
    image and its first reference sentence (TensorBoard text `explanations/text` and image grid
    `explanations/images`; `explanations/epoch<e>.md` in the run folder). Words come from the datamodule's
    `vocabulary`."""

    def __init__(self, num_images: int = 8) -> None:
        super().__init__()
        self.num_items = num_images

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        hp = pl_module.hparams
        batch = self.fixed_batch(trainer)
        images = batch[hp.image_key].to(pl_module.device)
        labels = batch[hp.target_key].to(pl_module.device)
        generated, _ = pl_module.model.explain(images, labels)
        vocabulary = getattr(trainer.datamodule, "vocabulary", None)

        def words(tokens: torch.Tensor) -> str:
            out = []
            for t in tokens.tolist():
                if t == hp.end_token:
                    break
                if t not in (0, hp.start_token):
                    out.append(vocabulary[t] if vocabulary is not None and t < len(vocabulary) else str(t))
            return " ".join(out)

        lines = ["| image | class | generated | a reference |", "| --- | --- | --- | --- |"]
        lines += [f"| {i} | {int(labels[i])} | {words(generated[i])} | {words(batch[hp.captions_key][i, 0])} |"
                  for i in range(len(images))]
        text = "\n".join(lines)
        (self.run_folder(trainer, "explanations") / f"epoch{trainer.current_epoch}.md").write_text(text + "\n")
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_text("explanations/text", text, trainer.global_step)
            trainer.logger.experiment.add_image("explanations/images", make_grid(images.float().cpu(), nrow=len(images)),
                                                trainer.global_step)


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
