"""L2X's TensorBoard pictures: what a feature selector keeps for a fixed validation batch."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from zoo.engine.callbacks import FixedBatchCallback, logged_step, record_name, run_folder
from zoo.figures import log_image, log_text


class SelectionCallback(FixedBatchCallback):
    """After each validation epoch: what a feature selector (L2X, INVASE) keeps for a fixed validation batch.

    Reads the selector's output dict (`zoo.l2x.model`): image selectors give ``pixel_selection`` (B, 1, H, W), drawn
    as the input with unselected patches dimmed (TensorBoard ``selection/images`` and, in the run folder,
    ``selection/epoch<e>.png``), with the datamodule's normalisation undone (`FixedBatchCallback.displayable`:
    normalised values drawn as they were clip most pixels to black or white, and kept patches could not be told
    from dimmed ones); otherwise ``selection`` (B, d) is written as text (TensorBoard ``selection/text``,
    ``selection/epoch<e>.md``; outside fit the files are ``validate.*``, `record_name`): token ids through the
    datamodule's public `decode_selection(tokens, selection) -> str` (`datamodules.text.TokenDataModule`: selected
    words in **bold**), vectors as the selected feature indices, next to the true ones where the batch has them (the
    System's ``relevant_key``, default ``relevant``).
    """

    def __init__(self, num_samples: int = 8) -> None:
        super().__init__()
        self.num_items = num_samples

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        batch = self.fixed_batch(trainer)
        x = batch[pl_module.input_key].to(pl_module.device)
        out = pl_module(x)
        selection = out["selection"]  # (N, d) hard in eval mode
        folder = run_folder(trainer, "selection")
        if "pixel_selection" in out:
            kept = out["pixel_selection"].float().cpu()  # (N, 1, H, W)
            images = self.displayable(trainer, x)  # (N, C, H, W) normalisation undone: as they look, in [0, 1]
            shown = images * (0.25 + 0.75 * kept)  # unselected patches dimmed, not hidden
            panels = torch.cat([images, shown])  # originals above, selections below
            scale = max(1, 64 // x.shape[-1])  # small images (digits are 8x8) are enlarged to be seen
            grid = make_grid(F.interpolate(panels, scale_factor=scale, mode="nearest"), nrow=len(x))
            if folder is not None:  # None: no run folder (fast_dev_run)
                save_image(grid, folder / f"{record_name(trainer)}.png")
            log_image(trainer.loggers, "selection/images", grid, logged_step(trainer))
            return
        decode = getattr(trainer.datamodule, "decode_selection", None) or self._describe
        lines = [decode(x[i].cpu(), selection[i].cpu()) for i in range(len(x))]
        relevant = batch.get(getattr(pl_module, "relevant_key", "relevant"))  # (N, d) the System's setting
        if relevant is not None:
            lines = [f"{line}  (true: {relevant[i].nonzero().flatten().tolist()})" for i, line in enumerate(lines)]
        text = "\n\n".join(f"{i}. {line}" for i, line in enumerate(lines))
        if folder is not None:
            (folder / f"{record_name(trainer)}.md").write_text(text + "\n")
        log_text(trainer.loggers, "selection/text", text, logged_step(trainer))

    @staticmethod
    def _describe(x: torch.Tensor, selection: torch.Tensor) -> str:
        return f"selected features {selection.nonzero().flatten().tolist()}"
