"""Picture callbacks draw what the data looks like: L2X's image selections with the datamodule's normalisation
undone, and fixed batches of as many samples as asked for where the loader's batches are smaller (detection scenes,
a shuffled loader)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from datamodules._base import DictDataModule, detection_collate
from zoo.engine.callbacks import covering_batch


class Normalised:
    """The part of a datamodule the pictures read: images normalised by mean 0.5, std 0.25 (`denormalize`)."""

    mean, std = [0.5], [0.25]
    denormalize = DictDataModule.denormalize


class PatchSelector(nn.Module):
    """Stands in for an L2X image selector: keeps the left half of every image (``pixel_selection`` (B, 1, H, W))."""

    input_key = "image"
    device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        kept = torch.zeros(len(x), 1, *x.shape[-2:])
        kept[..., : x.shape[-1] // 2] = 1
        return {"selection": kept.flatten(1), "pixel_selection": kept}


def drawn_images(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[torch.Tensor]:
    """Every image the callback module logs to TensorBoard (its `log_image`), captured."""
    logged: list[torch.Tensor] = []
    monkeypatch.setattr(module, "log_image", lambda logger, tag, image, step=0: logged.append(image))
    return logged


def stub_trainer(datamodule: Any) -> SimpleNamespace:
    """A trainer as far as `draw` reads it: no logger (no run folder, no files), the datamodule, fitting."""
    from pytorch_lightning.trainer.states import TrainerFn

    return SimpleNamespace(datamodule=datamodule, logger=None, loggers=[], global_step=0, current_epoch=0,
                           state=SimpleNamespace(fn=TrainerFn.FITTING), lightning_module=None)


def test_l2x_selection_picture_shows_the_images_as_they_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """Normalised pixels were drawn as they were (mean 0.5, std 0.25: 0 -> -2, 1 -> 2): most of the picture black or
    white, kept and dimmed patches alike. Drawn now: the raw images above, dropped patches dimmed below."""
    from zoo.l2x import callback

    logged = drawn_images(monkeypatch, callback)
    raw = torch.linspace(0, 1, 2 * 64).reshape(2, 1, 8, 8)  # (N, C, H, W) pixel values in [0, 1]
    selection = callback.SelectionCallback(num_samples=2)
    selection.batch = {"image": (raw - 0.5) / 0.25, "label": torch.tensor([0, 1])}  # as the loader gives them
    selection.draw(stub_trainer(Normalised()), PatchSelector(), None)
    kept = PatchSelector()(raw)["pixel_selection"]
    expected = make_grid(F.interpolate(torch.cat([raw, raw * (0.25 + 0.75 * kept)]), scale_factor=8), nrow=2)
    assert len(logged) == 1 and torch.allclose(logged[0], expected, atol=1e-6)


def scenes(count: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """`count` detection samples (image (3, 8, 8) filled with its index, target with one box)."""
    return [(torch.full((3, 8, 8), i / count), {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                                                 "labels": torch.tensor([1])}) for i in range(count)]


def test_fixed_batch_of_scenes_gathers_batches_until_it_has_them_all() -> None:
    """Detection scenes with batch size 4 and 8 pictures asked for (the shipped VOC config): the first batch's 4
    only were drawn. The first 8 now, as the loader's collate makes them (lists of images and targets)."""
    data = scenes(10)
    batch = covering_batch(DataLoader(data, batch_size=4, collate_fn=detection_collate), "label", 8)
    assert set(batch) == {"images", "targets"} and len(batch["images"]) == len(batch["targets"]) == 8
    assert all(torch.equal(image, data[i][0]) for i, image in enumerate(batch["images"]))
    assert len(covering_batch(DataLoader(data, batch_size=4, collate_fn=detection_collate), "label", 20)["images"]) \
        == 10  # the whole split where it holds fewer


def test_fixed_batch_of_a_shuffled_loader_has_every_sample_asked_for() -> None:
    """A shuffled loader (no order to cover classes by): the first `count` samples it gives, over its batches."""
    data = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor(i % 3), "name": "x"} for i in range(9)]
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    batch = covering_batch(loader, "label", 5, num_classes=3)
    assert batch["image"].shape == (5, 1, 2, 2) and batch["label"].shape == (5,) and len(batch["name"]) == 5
    assert len(set(batch["image"][:, 0, 0, 0].tolist())) == 5  # five different samples


def test_fixed_batch_of_batches_padded_to_their_own_length_keeps_the_first_batchs_samples() -> None:
    """Tokens padded to each batch's longest do not join: the first batch's samples, every key alike (not 5 labels
    beside 2 texts)."""
    def collate(samples: list[dict]) -> dict:
        longest = max(len(s["tokens"]) for s in samples)
        return {"tokens": torch.stack([nn.functional.pad(s["tokens"], (0, longest - len(s["tokens"])))
                                       for s in samples]), "label": torch.stack([s["label"] for s in samples])}

    data = [{"tokens": torch.ones(i + 1, dtype=torch.long), "label": torch.tensor(i % 2)} for i in range(9)]
    loader = DataLoader(data, batch_size=2, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    batch = covering_batch(loader, "label", 5, num_classes=2)
    assert len(batch["tokens"]) == len(batch["label"]) == 2


def test_parse_tree_picture_shows_every_image_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """ParseTreeCallback(num_images=8) over a validation loader of batch size 4: 8 panels (two rows of 4), not 4."""
    from zoo.aog_rcnn import callback

    logged = drawn_images(monkeypatch, callback)
    loader = DataLoader(scenes(10), batch_size=4, collate_fn=detection_collate)
    datamodule = SimpleNamespace(val_dataloader=lambda: loader, num_classes=1, class_names=["part"])
    none_found = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}

    class Detector(nn.Module):
        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return [none_found for _ in images]

    model = Detector()
    model.device = torch.device("cpu")
    trainer = stub_trainer(datamodule)
    trainer.lightning_module = model
    parse_trees = callback.ParseTreeCallback(num_images=8)
    parse_trees.draw(trainer, model, None)
    assert len(logged) == 1 and logged[0].shape[-2:] == (2 + 2 * (8 + 2), 2 + 4 * (8 + 2))  # 2 rows of 4 panels
