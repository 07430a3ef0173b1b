"""What `train.py predict` writes: predictions.csv and the model's own explanation of each image, as PNGs.

    python train.py predict --config <the run's config> --ckpt_path checkpoints/<run>/checkpoints/last.ckpt

writes into the run folder (checkpoints/<run>/predictions/; an earlier predict's predictions.csv and pictures there
are removed first, once the checkpoint is restored, so the folder holds one predict's files). Without --ckpt_path
(or with a `last` that finds none) predict is refused, as validate and test are: the model's weights would be
random; a model given weights of its own (model_kwargs.pretrained_path) predicts as built. It writes:
- predictions.csv: one row per sample: index, file (where the data names its samples), true label id and name
  (where the data has labels), predicted class id and name, its probability, then the System's own extra columns
  (L2X / INVASE: the prediction is the approximator's from the selected features alone, followed by the black box's
  class on the full input, `black_box_pred` / `black_box_pred_name`, and the `selected` feature indices; concept
  bottlenecks: `concepts`, the names of the concepts predicted present);
- <index>.png for the first `max_pictures` images: the image beside the model's own explanation (the System's
  `explanation` when predict_step gives one at the image's size, else `zoo.explain`, method "own") of the predicted
  class, titled with the predicted (and true) class name. Inputs that are not images (vectors, tokens), and Systems
  whose explanations are no pictures (`PREDICT_PICTURES = False`: the textual sentences, in the CSV): CSV only.

Models whose output is not one class per sample (detectors) give their own rows instead: predictions.csv then holds
one row per entry of each sample (AOG R-CNN: per detection its class, score, box and parse-tree leaves, in the
image's pixels; a sample with none gets one row of its index and file alone), and <index>.png are the System's own
pictures (detections with their parse trees).

Without a run folder (no logger: `fast_dev_run`, `logger: false`) it writes into `<default_root_dir>/predictions/`.

Under distributed predict (`--trainer.strategy=ddp`, `--trainer.devices=2`) each rank predicts its own share of the
samples; rank zero gathers every rank's rows and writes one predictions.csv in sample order, each sample once, as one
process would. Each rank draws the pictures of its own samples among the first `max_pictures`, so the folder holds the
same pictures as a one-process predict.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_warn

from zoo.distributed import is_distributed
from zoo.engine.callbacks import run_folder

CSV_NAME = "predictions.csv"


def clear_predictions(folder: Path) -> Path:
    """`folder` without an earlier predict's files (its predictions.csv and <index>.png pictures; nothing else),
    so a predict of another checkpoint or with fewer samples leaves no picture of the earlier one beside its rows.
    Called at predict start, once Lightning has restored the checkpoint: a predict refused before (no checkpoint,
    `zoo.cli.lightning.ZooCLI.refuse_untrained_evaluation`; one that does not fit the run; a file it cannot read)
    removes nothing."""
    for path in [folder / CSV_NAME, *folder.glob("[0-9][0-9][0-9][0-9][0-9]*.png")]:
        if path.is_file() and (path.name == CSV_NAME or path.stem.isdigit()):
            path.unlink()
    return folder


class PredictionWriter(BasePredictionWriter):
    """Writes predictions.csv and explanation PNGs into `<run folder>/<folder>` (see the module docstring).

    Reads the predict_step output ({"probs": (B, C), "pred": (B,), "index": (B,)}; optional "explanation":
    (B, H, W) maps drawn instead of `zoo.explain`'s, and "columns": {name: B values} appended to each row; or, for
    models without one class per sample, {"rows": B lists of row dicts, "index": (B,), "pictures": B images
    (C, H, W) in [0, 1], or a function of (batch, count) drawing the first `count`, optional}), the batch
    (image, label), the System's public `class_names` and the datamodule's public `sample_names(split)` /
    `denormalize(images)`.

    Distributed predict: every rank keeps its rows; at the end rank zero gathers them (`all_gather_object`: plain
    Python rows, any backend), orders them by sample index, keeps each sample's rows from the first rank that has it
    (a padded sampler repeats samples) and writes the CSV once. Pictures: `max_pictures` is the total; rank r of W
    draws its first `max_pictures // W` (+1 for r < `max_pictures % W`) samples, which under the evaluation loaders'
    interleaved shards (rank r: samples r, r + W, ...) are the first `max_pictures` samples, as in one process. Rank
    zero makes the folder before any rank writes into it. One process: no collective.

    Args:
        folder: sub-folder of the run folder.
        max_pictures: explanation PNGs to write (0: none); every sample gets a CSV row.
    """

    def __init__(self, folder: str = "predictions", max_pictures: int = 32) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.max_pictures = folder, max_pictures
        self.rows: list[dict[str, Any]] = []
        self.pictures = 0
        self.names: list[str] | None = None
        self.quota = max_pictures  # this rank's share of max_pictures
        self.drawn: list[int] = []  # the sample indices of this rank's pictures
        self.positional = False  # a prediction without "index": rows numbered by their position in this rank's batches
        self.folder_path: Path | None = None  # the folder, made by rank zero, under distributed predict

    def out_dir(self, trainer: pl.Trainer) -> Path:
        if self.folder_path is not None:
            return self.folder_path
        folder = run_folder(trainer, self.folder)
        if folder is None:  # no run (no logger): predictions asked for are still written, beside the runs
            folder = Path(trainer.default_root_dir) / self.folder
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from datamodules._base import PREDICT_SPLIT

        self.rows, self.pictures, self.drawn, self.positional, self.folder_path = [], 0, [], False, None
        sample_names = getattr(trainer.datamodule, "sample_names", None)
        self.names = sample_names(PREDICT_SPLIT) if sample_names is not None else None
        self.quota = self.max_pictures
        if is_distributed():  # one folder for every rank (a logger's version may differ off rank zero), made first
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            self.quota = self.max_pictures // world + int(rank < self.max_pictures % world)
            folder = [clear_predictions(self.out_dir(trainer)) if rank == 0 else None]
            torch.distributed.broadcast_object_list(folder, src=0)
            self.folder_path = folder[0]
        else:
            clear_predictions(self.out_dir(trainer))

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not isinstance(prediction, dict):
            return
        if "rows" in prediction:
            self._write_rows(trainer, prediction, batch, batch_idx)
            return
        if "probs" not in prediction:
            return
        classes = prediction["probs"].shape[-1]
        class_names = getattr(pl_module, "class_names", None) or [str(c) for c in range(classes)]
        probs, pred = prediction["probs"].float().cpu(), prediction["pred"].cpu()
        self.positional |= "index" not in prediction
        index = prediction.get("index", torch.arange(len(pred)) + batch_idx * len(pred)).cpu()
        labels = batch.get(getattr(pl_module, "target_key", "label")) if isinstance(batch, dict) else None
        labels = labels.cpu() if isinstance(labels, torch.Tensor) and labels.ndim == 1 else None
        for i in range(len(pred)):
            row: dict[str, Any] = {"index": int(index[i])}
            if self.names is not None:
                row["file"] = self.names[int(index[i])]
            if labels is not None:
                row |= {"label": int(labels[i]), "label_name": class_names[int(labels[i])]}
            row |= {"pred": int(pred[i]), "pred_name": class_names[int(pred[i])],
                    "probability": round(float(probs[i, pred[i]]), 4)}
            row |= {name: _cell(values[i]) for name, values in prediction.get("columns", {}).items()}
            self.rows.append(row)
        self._pictures(trainer, pl_module, batch, pred, probs, index, labels, class_names,
                       prediction.get("explanation"))

    def _write_rows(self, trainer: pl.Trainer, prediction: dict[str, Any], batch: Any, batch_idx: int) -> None:
        """The System's own rows of each sample, each after the sample's index (and file), and its own pictures."""
        count = len(prediction["rows"])
        self.positional |= "index" not in prediction
        index = prediction.get("index", torch.arange(count) + batch_idx * count).cpu().tolist()
        for i, sample_rows in zip(index, prediction["rows"]):
            sample = {"index": i} | ({"file": self.names[i]} if self.names is not None else {})
            self.rows.extend(sample | row for row in (sample_rows or [{}]))  # a sample with no rows still gets one
        pictures = prediction.get("pictures") or []
        count = min(self.quota - self.pictures, len(index))
        if count > 0:
            from torchvision.utils import save_image

            folder = self.out_dir(trainer)
            drawn = pictures(batch, count) if callable(pictures) else pictures[:count]  # drawn only when written
            for i, picture in zip(index[:count], drawn):
                save_image(picture.float().cpu(), folder / f"{i:05d}.png")
            self.pictures += len(drawn)
            self.drawn.extend(index[:len(drawn)])

    def _pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, pred: torch.Tensor,
                  probs: torch.Tensor, index: torch.Tensor, labels: torch.Tensor | None,
                  class_names: list[str], explanation: torch.Tensor | None = None) -> None:
        """The first images' pictures; none for a System that declares it has none (`PREDICT_PICTURES = False`:
        the textual explanations are sentences, in the CSV) or whose model `zoo.explain` cannot explain (said)."""
        images = batch.get(getattr(pl_module, "input_key", "image")) if isinstance(batch, dict) else None
        count = min(self.quota - self.pictures, len(pred))
        if count <= 0 or not isinstance(images, torch.Tensor) or images.ndim != 4:
            return
        if not getattr(pl_module, "PREDICT_PICTURES", True):
            return
        if isinstance(explanation, torch.Tensor) and explanation.shape == (len(images), *images.shape[-2:]):
            maps = explanation[:count].float().cpu()  # the System's own explanation (L2X: the kept pixels)
        else:
            from zoo.explain import explain

            try:
                maps = explain(pl_module, images[:count], "own", target=pred[:count].to(images.device)).cpu()
            except ValueError as err:  # a model without an own map (detectors, generators)
                rank_zero_warn(f"predict: no explanation pictures ({err}).")
                self.max_pictures = self.quota = 0
                return
        denormalize = getattr(trainer.datamodule, "denormalize", lambda x: x)
        shown = denormalize(images[:count].float()).clamp(0, 1).cpu()
        folder = self.out_dir(trainer)
        for i in range(count):
            title = f"predicted: {class_names[int(pred[i])]} ({float(probs[i, pred[i]]):.2f})"
            if labels is not None:
                title += f"\ntrue: {class_names[int(labels[i])]}"
            save_explanation_png(folder / f"{int(index[i]):05d}.png", shown[i], maps[i], title)
        self.pictures += count
        self.drawn.extend(index[:count].tolist())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows, pictures = self.rows, self.pictures
        if is_distributed():
            rows, pictures = self._gathered()
        if not trainer.is_global_zero:
            return
        if not rows:
            rank_zero_warn(f"predict: {type(pl_module).__name__}.predict_step returns no class probabilities "
                           f"({{'probs', 'pred'}}) and no rows ({{'rows'}}); no {CSV_NAME} written.")
            return
        path = self.out_dir(trainer) / CSV_NAME
        with path.open("w", newline="") as handle:  # every row's columns, in order of appearance ("" where missing)
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)
        print(f"predict: {len(rows)} rows in {path}, {pictures} pictures beside it.")

    def _gathered(self) -> tuple[list[dict[str, Any]], int]:
        """Every rank's rows, on every rank (a collective: each rank calls it): ordered by sample index, each sample's
        rows from the first rank that holds it (a padded sampler gives a sample to two ranks; a detector's sample has
        several rows, kept in their order), and the count of distinct pictures. Rows numbered by position (no
        "index") cannot be matched across ranks: they are kept, rank after rank, and a warning says so."""
        world = torch.distributed.get_world_size()
        shares: list[Any] = [None] * world
        torch.distributed.all_gather_object(shares, (self.rows, self.drawn, self.positional))
        if any(positional for _, _, positional in shares):
            rank_zero_warn(f"predict: predict_step gives no sample 'index'; {CSV_NAME} holds each rank's rows in "
                           "rank order, numbered by their position on that rank.")
            return [row for rows, _, _ in shares for row in rows], sum(len(drawn) for _, drawn, _ in shares)
        owner: dict[int, int] = {}  # sample index -> the first rank that holds it
        for rank, (rows, _, _) in enumerate(shares):
            for row in rows:
                owner.setdefault(row["index"], rank)
        kept = [row for rank, (rows, _, _) in enumerate(shares) for row in rows if owner[row["index"]] == rank]
        kept.sort(key=lambda row: row["index"])  # stable: a sample's rows stay in their order
        return kept, len({i for _, drawn, _ in shares for i in drawn})


def _cell(value: Any) -> Any:
    """One CSV cell of an extra column: a tensor element as a number, anything else as it is."""
    return value.item() if isinstance(value, torch.Tensor) else value


def save_explanation_png(path: Path, image: torch.Tensor, saliency: torch.Tensor, title: str) -> None:
    """The image (C, H, W) in [0, 1] and the same image with its map (H, W) overlaid, side by side, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = image.permute(1, 2, 0).numpy()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]
    cmap = "gray" if pixels.ndim == 2 else None
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.8))
    axes[0].imshow(pixels, cmap=cmap)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(pixels, cmap=cmap)
    axes[1].imshow(saliency.numpy(), cmap="jet", alpha=0.5)
    axes[1].set_title("own explanation", fontsize=8)
    for axis in axes:
        axis.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
