"""What every datamodule shares: dict samples, loaders, and the error for a dataset folder that is not as expected."""

from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder that is missing or not in the expected on-disk layout; the message shows the layout."""

    def __init__(self, problem: str, expected_layout: str) -> None:
        super().__init__(f"{problem}\nExpected layout:\n{expected_layout.rstrip()}")


class TensorDictDataset(Dataset):
    """Samples cut from a dict of equally long tensors; uint8 images are scaled to float [0, 1] on access."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All fields need the same length; got {lengths}.")
        self.tensors = tensors
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {k: v[index] for k, v in self.tensors.items()}
        if "image" in sample and sample["image"].dtype == torch.uint8:
            sample["image"] = sample["image"].float() / 255.0
        sample["index"] = torch.tensor(index)
        return sample


def decode_tokens(tokens: torch.Tensor | Sequence[int], vocabulary: Sequence[str] | None = None, *,
                  end_token: int | None = None, skip: Sequence[int | None] = (0,)) -> list[str]:
    """The words of one token row (L,): cut before `end_token`, ids in `skip` (padding, the start token) dropped,
    each id looked up in `vocabulary` ("<unk>" outside it) or, without a vocabulary, written as the id ("12": word
    n-grams and id n-grams match alike, which is how the sentence metrics score ids). The one decoder of token ids:
    the datamodules' `decode`, the textual metrics and the textual pictures all use it."""
    words = []
    for token in tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens:
        if token == end_token:
            break
        if token not in skip:
            words.append(str(token) if vocabulary is None else
                         vocabulary[token] if 0 <= token < len(vocabulary) else "<unk>")
    return words


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Labels must lie in [0, num_classes): caught here instead of as a device-side assert in the loss."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{source}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}).")


class DictDataModule(pl.LightningDataModule):
    """Base for datamodules whose datasets yield dicts; subclasses fill `self.splits` in `setup`.

    Subclasses know `num_classes`, `num_channels` and `image_size` at construction, so the CLI can link them into
    the model before any data is loaded.
    """

    num_classes: int
    num_channels: int | None  # None for data that is not images (vectors, token ids)
    image_size: int | None

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.splits: dict[str, Dataset] = {}

    @property
    def model_inputs(self) -> dict[str, Any]:
        """What the data fixes about a model's input beyond channels and size (e.g. num_features, vocab_size);
        linked into the System's `data_inputs` by the CLI."""
        return {}

    collate_fn: Any = None  # DataLoader's default; detection datamodules batch variable-size targets as lists

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup("fit" if split in ("train", "val") else split)
        return DataLoader(
            self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def detection_collate(samples: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """Detection batches: {"images": [(C, H, W)], "targets": [{"boxes": (n, 4) xyxy, "labels": (n,) in 1..C, ...}]}
    (torchvision's detection input; objects per image vary)."""
    return {"images": [image for image, _ in samples], "targets": [target for _, target in samples]}


class DetectionDataModule(DictDataModule):
    """Base for detection data: samples are (image, target) pairs, batched by `detection_collate`.

    `num_classes` counts object classes; labels run 1..num_classes (0 is torchvision's background)."""

    collate_fn = staticmethod(detection_collate)
    class_names: list[str]
