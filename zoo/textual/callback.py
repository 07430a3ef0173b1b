"""Textual explanations in TensorBoard: generated sentences for a fixed validation batch."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid

from zoo.engine.callbacks import FixedBatchCallback, logged_step, record_name, run_folder
from zoo.figures import class_name, log_image, log_text


class ExplanationTextCallback(FixedBatchCallback):
    """After each validation epoch: the generated explanation of each image of a fixed validation batch, beside the
    image and its first reference sentence (TensorBoard text `explanations/text` and image grid
    `explanations/images`; `explanations/epoch<e>.md` in the run folder, `validate.md` outside fit).

    Reads the System's evaluation output dict (`forward_batch(batch, "val")`: "images", "labels", "sentences",
    "references"; see `zoo.textual.system.TextualSystem`). Words come from the System's `sentence_decoder`, as in
    its metrics and predictions: the datamodule's public `decode(tokens)` (parts_world, CUB), else the recorded
    `vocabulary`, else token ids as numbers, each sentence up to its <eos> without <bos> and padding. Images are
    drawn with the datamodule's normalisation undone (`FixedBatchCallback.displayable`). Classes are named by the
    datamodule's `class_names` ("class k" without them)."""

    def __init__(self, num_images: int = 8) -> None:
        super().__init__()
        self.num_items = num_images

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v
                 for k, v in self.fixed_batch(trainer).items()}
        out = pl_module.forward_batch(batch, "val")
        decode = pl_module.sentence_decoder()  # the datamodule's decode, else the recorded words, up to <eos>
        images, labels = out["images"], out["labels"].tolist()
        lines = ["| image | class | generated | a reference |", "| --- | --- | --- | --- |"]
        lines += [f"| {i} | {class_name(trainer.datamodule, label)} | {decode(out['sentences'][i])} | "
                  f"{decode(out['references'][i, 0])} |"
                  for i, label in enumerate(labels)]
        text = "\n".join(lines)
        folder = run_folder(trainer, "explanations")
        if folder is not None:  # None: no run folder (fast_dev_run)
            (folder / f"{record_name(trainer)}.md").write_text(text + "\n")
        log_text(trainer.loggers, "explanations/text", text, logged_step(trainer))
        shown = self.displayable(trainer, images)  # normalisation undone: the images as they look, in [0, 1]
        log_image(trainer.loggers, "explanations/images", make_grid(shown, nrow=len(images)), logged_step(trainer))
