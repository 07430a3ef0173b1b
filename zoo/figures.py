"""Pictures and their words, for every picture callback, report and explainer: class names, pyplot-free figures,
heatmap overlays, and where they go (PNG files; TensorBoard figures, images and text). Nothing here knows a System, a
Trainer or a model: only matplotlib, torch, TensorBoard's writer and where a feature map's cells sit
(`zoo.backbones.cells_to_pixels`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import TensorBoardLogger

from zoo.backbones import MapGeometry, cells_to_pixels


def class_name(datamodule: Any, index: int) -> str:
    """What pictures and reports call class `index`: the datamodule's public `class_names[index]`, else "class k"."""
    names = getattr(datamodule, "class_names", None)
    return str(names[index]) if names is not None and 0 <= index < len(names) else f"class {index}"


def figure_pixels(figure: Any) -> Any:
    """A matplotlib figure drawn to an (H, W, 3) uint8 array at its dpi, grown as `savefig(bbox_inches="tight")`
    grows it where text runs past its edges (a long class name over the last column, a wide suptitle), else as
    drawn. Drawn once and kept on the figure until it is drawn again elsewhere or an artist changes
    (`figure.stale`). Why: a picture callback writes each figure twice (PNG, TensorBoard), and each draw of a
    labelled 8 x 8 grid under constrained layout took a second on a CPU, every validation epoch (three draws with
    `savefig(bbox_inches="tight")` and `add_figure`'s own, whose copy cut such text off)."""
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    cached = getattr(figure, "_zoo_pixels", None)
    if cached is not None and not figure.stale:
        return cached
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    box, (width, height) = figure.get_tightbbox(canvas.get_renderer()), figure.get_size_inches()
    slack = 0.5 / figure.dpi  # half a pixel, in inches
    if box.x0 < -slack or box.y0 < -slack or box.x1 > width + slack or box.y1 > height + slack:
        buffer = io.BytesIO()  # text past the edges: the tight render holds it (one draw more)
        figure.savefig(buffer, format="png", dpi=figure.dpi, bbox_inches="tight")
        pixels = np.asarray(Image.open(buffer).convert("RGB")).copy()
    else:
        pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if not getattr(figure, "_zoo_pixels_watched", False):  # a draw elsewhere (`figure.canvas.draw()` after a
        figure.canvas.mpl_connect("draw_event", lambda event: setattr(figure, "_zoo_pixels", None))  # change)
        figure._zoo_pixels_watched = True  # clears `stale` without these pixels: drop them
    figure.stale = False  # (a tight savefig leaves it stale)
    figure._zoo_pixels = pixels
    return pixels


def save_figure(figure: Any, path: Path) -> None:
    """A matplotlib figure as PNG (folders made), from its one drawing (`figure_pixels`)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    dpi = float(figure.dpi)
    Image.fromarray(figure_pixels(figure)).save(path, format="png", dpi=(dpi, dpi))


def tensorboards(loggers: Any) -> list[TensorBoardLogger]:
    """The TensorBoard loggers among `loggers`: one logger, a sequence of them (`trainer.loggers`: pass it, not
    `trainer.logger`, which is the first one only, so a TensorBoardLogger listed after a CSVLogger got no picture),
    or None."""
    return [logger for logger in (loggers if isinstance(loggers, (list, tuple)) else [loggers])
            if isinstance(logger, TensorBoardLogger)]


def log_figure(loggers: Any, tag: str, figure: Any, step: int = 0) -> None:
    """A matplotlib figure in the run's TensorBoard (an image, as `add_figure` logs it, from the figure's one drawing:
    `figure_pixels`), for each TensorBoardLogger among `loggers` (`tensorboards`)."""
    for logger in tensorboards(loggers):
        logger.experiment.add_image(tag, figure_pixels(figure), step, dataformats="HWC")


def log_image(loggers: Any, tag: str, image: torch.Tensor, step: int = 0) -> None:
    """A (3, H, W) image in [0, 1] (a torchvision `make_grid`) in the run's TensorBoard (`add_image`), for each
    TensorBoardLogger among `loggers` (`tensorboards`)."""
    for logger in tensorboards(loggers):
        logger.experiment.add_image(tag, image, step)


def log_text(loggers: Any, tag: str, text: str, step: int = 0) -> None:
    """Markdown text in the run's TensorBoard (`add_text`), for each TensorBoardLogger among `loggers`
    (`tensorboards`)."""
    for logger in tensorboards(loggers):
        logger.experiment.add_text(tag, text, step)


def new_figure(rows: int, columns: int, panel_inches: float = 1.3) -> tuple[Any, Any]:
    """A pyplot-free matplotlib Figure (no GUI backend, nothing to close) with a (rows, columns) grid of axes, ticks
    off: the canvas of every labelled picture."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(panel_inches * columns + 1.6, panel_inches * rows + 0.4), dpi=72, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure, axes


def heatmap_overlay(images: torch.Tensor, maps: torch.Tensor, geometry: MapGeometry | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] with maps (F, N, h, w) overlaid in red: (F, N, 3, H, W). With the maps'
    `geometry` (`zoo.backbones.MapGeometry` of a feature map in these images) each cell is drawn at its
    receptive-field centre, where the part metrics place it (`cells_to_pixels`); without, spread evenly."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    heat = cells_to_pixels(maps, images.shape[-2:], geometry)  # (F, N, H, W)
    heat = heat / heat.flatten(1).amax(1).clamp(min=1e-8)[:, None, None, None]  # per filter over the batch
    red = torch.tensor([1.0, 0.1, 0.1], device=images.device)[None, None, :, None, None]
    return (0.45 * rgb[None] + 0.55 * heat[:, :, None] * red).clamp(0, 1)
