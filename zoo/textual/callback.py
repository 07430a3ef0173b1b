"""Textual explanations in TensorBoard: generated sentences for a fixed validation batch."""

from __future__ import annotations


import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from zoo.engine.callbacks import FixedBatchCallback


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
