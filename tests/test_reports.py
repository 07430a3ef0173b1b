"""Reports for people: full-width piped tables with a higher/lower-is-better legend, labelled explanation figures,
fixed picture batches that cover every class."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from zoo.cli.report import direction, legend, metric_directions, write_report
from zoo.engine.callbacks import covering_batch
from zoo.figures import class_name, figure_pixels, log_figure, log_image, log_text, save_figure
from zoo.explain.scores import ExplainedRun, explanation_figure


def figure_texts(figure) -> list[str]:
    """Every title, axis label and free text of a matplotlib figure."""
    texts = [t.get_text() for t in figure.texts]
    for ax in figure.axes:
        texts += [ax.get_title(), ax.get_ylabel(), ax.get_xlabel()]
    return [t for t in texts if t]


def test_directions_come_from_the_metrics_higher_is_better() -> None:
    from losses.icnn import FilterPartLoss
    from zoo.icnn.system import ICNNSystem

    system = ICNNSystem("icnn_tinycnn", num_classes=3, loss=FilterPartLoss(), part_maps_key="filter_maps")
    directions = metric_directions(system, "val")
    assert directions["acc"] is True and directions["location_instability"] is False and directions["part_iou"]
    assert direction("acc_mean", directions) is True and direction("acc_std", directions) is None
    assert direction("rule_3", {"rule_*": True, "*": False}) is True and direction("map_50", {"*": False}) is False
    assert legend(["run", "acc", "location_instability"], directions) == \
        "higher is better: acc; lower is better: location_instability"


def test_piped_tables_are_full_width_markdown_with_the_legend(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"run": f"a_rather_long_run_name_{i}", "model": "icnn_tinycnn_with_a_long_name", "acc": 0.5,
             "location_instability": 0.1234, "part_iou": 0.25, "infer_samples_per_s": 1234.5} for i in range(3)]
    write_report(tmp_path, {"models": rows}, {"acc": True, "location_instability": False, "part_iou": True})
    printed = capsys.readouterr().out  # captured output is not a terminal: plain markdown, never cut
    header = "| run | model | acc | location_instability | part_iou | infer_samples_per_s |"
    assert header in printed and "…" not in printed and max(map(len, printed.splitlines())) > 80
    assert "higher is better: acc, part_iou; lower is better: location_instability" in printed
    markdown = (tmp_path / "report.md").read_text()
    assert header in markdown and "higher is better: acc, part_iou; lower is better: location_instability" in markdown


def test_the_legend_names_metric_columns_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A dict metric logged without a prefix (AOG's detection metrics: "*") gives every metric a direction, but the
    run's and the model's names are no metric (the scene-world report said "higher is better: run, model, ...")."""
    rows = [{"run": "aog_rcnn", "model": "aog_rcnn_tinycnn", "map": 0.7, "map_50": 0.99}]
    write_report(tmp_path, {"models": rows}, {"*": True})
    assert "higher is better: map, map_50\n" in (tmp_path / "report.md").read_text()


def test_explanation_figure_names_rows_classes_and_shows_every_image() -> None:
    images = torch.rand(5, 3, 16, 16)
    maps = {"cam": torch.rand(5, 16, 16), "saliency": torch.rand(5, 16, 16)}
    datamodule = SimpleNamespace(class_names=["cat", "dog", "owl"])
    runs = [ExplainedRun("icnn", images, maps, true=[0, 1, 2, 0, 1], predicted=[0, 2, 2, 0, 1]),
            ExplainedRun("opaque_twin", images, maps, true=[0, 1, 2, 0, 1], predicted=[1, 1, 2, 0, 1])]
    figure = explanation_figure(runs, datamodule)
    texts = figure_texts(figure)
    assert len(figure.axes) == (1 + 2 * 2) * 5  # the images' row, then every model's explainers; all 5 images
    assert {"icnn:\ncam", "icnn:\nsaliency", "opaque_twin:\ncam", "opaque_twin:\nsaliency"} <= set(texts)
    assert [t for t in texts if t.startswith("true: ")] == [f"true: {n}" for n in ("cat", "dog", "owl", "cat", "dog")]
    assert texts.count("pred: owl") == 2 + 1 and texts.count("pred: dog") == 1 + 3  # each model's predictions
    assert class_name(None, 4) == "class 4" and class_name(datamodule, 2) == "owl"


def test_figures_go_to_the_runs_tensorboard(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = ExplainedRun("icnn", torch.rand(2, 3, 16, 16), {"cam": torch.rand(2, 16, 16)}, [0, 1], [1, 1])
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    log_figure(logger, "explanations", explanation_figure([run]), step=3)
    log_figure(None, "explanations", explanation_figure([run]))  # no TensorBoard logger: nothing to do
    log_image(logger, "selection/images", torch.rand(3, 8, 24), step=3)  # a make_grid picture (L2X, textual, AOG)
    log_text(logger, "selection/text", "1. **great** film", step=3)
    for no_tensorboard in (None, SimpleNamespace()):  # no logger, or another kind: nothing to do
        log_image(no_tensorboard, "selection/images", torch.rand(3, 8, 24))
        log_text(no_tensorboard, "selection/text", "x")
    logger.experiment.flush()
    tags = EventAccumulator(str(tmp_path / "run")).Reload().Tags()
    assert sorted(tags["images"]) == ["explanations", "selection/images"]
    assert tags["tensors"] == ["selection/text/text_summary"]


def test_a_figure_is_drawn_once_for_its_png_and_its_tensorboard_image(tmp_path: Path, monkeypatch) -> None:
    """A picture callback writes each figure as PNG and to TensorBoard: drawn once for both (a labelled 8 x 8 grid
    took a second a draw on a CPU, every epoch), the same pixels in both, drawn again once an artist has changed."""
    from matplotlib.figure import Figure
    from PIL import Image
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    draws = []
    draw = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: (draws.append(self), draw(self, renderer))[1])
    from zoo.figures import new_figure

    figure, axes = new_figure(2, 3)  # a labelled grid, its text inside the figure
    for ax in axes.flat:
        ax.imshow(torch.rand(8, 8, 3).numpy())
        ax.set_title("true: owl", fontsize=8)
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    save_figure(figure, tmp_path / "figure.png")
    log_figure(logger, "explanations", figure, step=1)
    assert len(draws) == 1
    pixels = figure_pixels(figure)
    assert pixels.dtype.name == "uint8" and pixels.shape[-1] == 3
    assert (torch.from_numpy(pixels) == torch.from_numpy(np.asarray(Image.open(tmp_path / "figure.png")))).all()
    logger.experiment.flush()
    logged = EventAccumulator(str(tmp_path / "run")).Reload().Images("explanations")[0]
    assert (logged.height, logged.width) == pixels.shape[:2]
    figure.axes[0].set_title("changed")  # an artist changed: the next picture shows it
    log_figure(logger, "explanations", figure, step=2)
    assert len(draws) == 2
    figure.axes[0].set_title("changed again")
    figure.canvas.draw()  # drawn elsewhere, which clears `stale`: the kept pixels are no longer the figure's
    assert not figure.stale and not np.array_equal(figure_pixels(figure), pixels)


def test_a_figure_whose_text_runs_past_its_edges_is_saved_whole() -> None:
    """A title wider than its column (CUB's "003.Sooty_Albatross" over the last image) or a wide suptitle ran past
    the figure: its PNG and TensorBoard copies grow to hold it, as `savefig(bbox_inches="tight")` grew the PNG."""
    from zoo.figures import new_figure

    figure, axes = new_figure(1, 2)
    for ax in axes.flat:
        ax.imshow(np.zeros((4, 4, 3)))
    width = round(figure.get_size_inches()[0] * figure.dpi)
    assert figure_pixels(figure).shape[1] == width  # nothing past the edges: as drawn
    axes[0, 1].set_title("true: 003.Sooty_Albatross_with_a_long_name", fontsize=8)
    figure.suptitle("explanations " * 12)
    pixels = figure_pixels(figure)
    assert pixels.shape[1] > width + 100
    dark = (pixels.astype(int).sum(-1) < 300).any(0)  # (W,) columns with text or image
    assert dark.any() and not dark[0] and not dark[-1]  # the text ends inside the picture


def test_fixed_batches_cover_every_class_of_a_sorted_set() -> None:
    data = [{"image": torch.full((1,), float(i)), "label": torch.tensor(i // 10)} for i in range(40)]  # 4 sorted
    batch = covering_batch(DataLoader(data, batch_size=8), "label", 8, num_classes=4)
    assert batch["label"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # first of each class, then second of each
    assert batch["image"].flatten().tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert torch.equal(covering_batch(DataLoader(data, batch_size=8), "label", 8, 4)["image"], batch["image"])
    assert covering_batch(DataLoader(data, batch_size=8), "label", 6)["label"].tolist() == [0, 1, 2, 3, 0, 1]
    shuffled = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(covering_batch(shuffled, "label", 3, 4)["label"]) == 3  # no order to rely on: the first samples
    scenes = [{"images": torch.rand(3, 8, 8)} for _ in range(4)]  # no class per sample: the first samples
    assert len(covering_batch(DataLoader(scenes, batch_size=4), "label", 2)["images"]) == 2


def test_fixed_batch_of_an_image_folder_shows_every_class(image_folder_root: Path) -> None:
    from datamodules import ImageFolderDataModule

    data = ImageFolderDataModule(root=str(image_folder_root), image_size=32, batch_size=1)
    data.setup("validate")
    batch = covering_batch(data.val_dataloader(), "label", 2, data.num_classes)  # val: cat, cat, dog, dog
    assert batch["label"].tolist() == [0, 1]


def test_explanation_figure_draws_the_pixels_as_they_are_and_says_the_true_class_is_explained() -> None:
    """Normalised images were drawn as `clamp(0, 1)` of the normalised values (most clipped); the datamodule's
    `denormalize` undoes it for the image row and under the heat maps. The maps explain the true class."""
    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(num_train=8, num_val=4, num_test=4, image_size=32, mean=[0.485, 0.456, 0.406],
                                std=[0.229, 0.224, 0.225])
    data.setup("fit")
    images = torch.stack([data.val_dataloader().dataset[i]["image"] for i in range(2)])  # normalised
    figure = explanation_figure([ExplainedRun("m", images, {"cam": torch.rand(2, 32, 32)}, [0, 1], [0, 1])], data)
    shown = torch.tensor(figure.axes[0].get_images()[0].get_array().data)
    pixels = data.denormalize(images).clamp(0, 1)
    torch.testing.assert_close(shown, pixels[0].permute(1, 2, 0), atol=1e-3, rtol=0)
    overlay = torch.tensor(figure.axes[2].get_images()[0].get_array().data)  # the cam row, first image
    heat = overlay - 0.45 * pixels[0].permute(1, 2, 0)  # heatmap_overlay: 0.45 image + 0.55 red heat
    assert heat.min() > -1e-3  # the heat over the pixels as they are, not over the normalised values
    assert "true class" in figure.get_suptitle()


class FlatLinear(torch.nn.Module):
    """A linear classifier over every input value: images (B, C, H, W) or series (B, C, T) -> {"logits": (B, K)}."""

    def __init__(self, features: int, classes: int = 2) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(x.flatten(1))}


def test_explanation_scores_are_kept_in_full_precision() -> None:
    """The explanation rows were rounded to 4 decimals before the CSV (a mass of 3e-5 read 0.0, twins tied that do
    not); they are kept in full now (the markdown rounds them for reading, `cell`)."""
    from zoo.explain.scores import score_explanations

    torch.manual_seed(0)
    masks = torch.rand(3, 2, 8, 8) > 0.5  # (B, P, H, W)
    rows, _ = score_explanations(FlatLinear(3 * 8 * 8), torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 0]), masks,
                                 methods=("saliency",), metrics=("deletion", "infidelity"), step=16)
    scores = [rows[0][column] for column in ("deletion_auc", "infidelity", "mass_in_parts", "deletion_vs_random")]
    assert all(isinstance(score, float) for score in scores)
    assert all(score != round(score, 4) for score in scores), scores  # none cut to 4 decimals


def test_the_note_speaks_of_series_only_under_series_rows() -> None:
    """The note under an image-only explanation table ended with "Series: deletion sets 4 time steps at a time...";
    it is said where series rows are only."""
    from zoo.explain.scores import EXPLANATION_NOTE, explanation_note, score_explanations

    torch.manual_seed(0)
    target = torch.tensor([0, 1, 0])
    image_rows, _ = score_explanations(FlatLinear(3 * 8 * 8), torch.rand(3, 3, 8, 8), target, methods=("saliency",),
                                       metrics=("deletion",), step=16)
    assert explanation_note(image_rows) == EXPLANATION_NOTE and "time steps" not in EXPLANATION_NOTE
    series_rows, _ = score_explanations(FlatLinear(2 * 16), torch.rand(3, 2, 16), target, methods=("saliency",),
                                        metrics=("deletion",), step=4)
    series_note = explanation_note(series_rows)
    assert series_note.startswith(EXPLANATION_NOTE) and "Series: deletion sets 4 time steps at a time" in series_note
