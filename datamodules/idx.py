"""IDX image sets (MNIST, Fashion-MNIST, KMNIST): grey 28x28 images read from the release files on disk, replicated to
3 channels and resized for pretrained backbones. Nothing downloads: `benchmarks/data/get_fashion_mnist.sh` fetches
Fashion-MNIST with apt-get."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules._base import DatasetLayoutError, DataSettingError, DictDataModule, check_labels

LAYOUT = """<root>/
  train-images-idx3-ubyte[.gz]   magic 0x00000803, count, rows, cols, then count*rows*cols bytes
  train-labels-idx1-ubyte[.gz]   magic 0x00000801, count, then count label bytes
  t10k-images-idx3-ubyte[.gz]
  t10k-labels-idx1-ubyte[.gz]
(the MNIST / Fashion-MNIST / KMNIST release files, gzipped or extracted)"""

CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip stream


# the four release files (`LAYOUT`), each <stem> or <stem>.gz
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find(root: Path, stem: str) -> Path:
    """The path of `<root>/<stem>` (extracted, looked up first) or `<root>/<stem>.gz`; a DatasetLayoutError where
    neither is a file. Nothing is read (`IDXDataModule.__init__` checks the four files with it)."""
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    raise DatasetLayoutError(f"Neither {stem} nor {stem}.gz is in {str(root)!r}.", LAYOUT)


def _open(root: Path, stem: str) -> tuple[Path, bytes]:
    """The path and (decompressed) bytes of `<root>/<stem>` or `<root>/<stem>.gz` (`_find`)."""
    path = _find(root, stem)
    try:
        return path, gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DatasetLayoutError(f"{str(path)!r} is not a readable gzip file ({err}).", LAYOUT) from err


def read_idx(root: Path, stem: str, magic: int) -> tuple[Path, torch.Tensor]:
    """One IDX file's path and its contents as a uint8 tensor: (N, rows, cols) for images (magic 0x803), (N,) for
    labels (magic 0x801). Errors name the file's path (the stem alone does not say which root, nor .gz or not)."""
    path, data = _open(root, stem)
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', data[:4])[0]:08x}" if len(data) >= 4 else "a file shorter than 4 bytes"
        hint = (f" It is gzip-compressed (it starts with 0x1f8b) but not named .gz: rename it {path.name}.gz (read "
                f"as gzip) or decompress it." if data[:2] == GZIP_MAGIC else "")
        raise DatasetLayoutError(f"{str(path)!r}: bad magic number {found}, expected 0x{magic:08x}.{hint}", LAYOUT)
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = header + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise DatasetLayoutError(f"{str(path)!r}: the header announces {shape[0]} items of shape {shape[1:]} "
                                 f"({expected} bytes with the header) but the file holds {len(data)} bytes.", LAYOUT)
    return path, torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


class IDXImages(Dataset):
    """uint8 grey images (N, h, w) kept small in memory; each sample is made on access: float in [0, 1], resized to
    `image_size` (bilinear) and replicated to 3 channels (the datamodule's loaders normalise it)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int) -> None:
        self.images, self.labels, self.image_size = images, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index].float()[None, None] / 255.0  # (1, 1, h, w)
        if image.shape[-1] != self.image_size or image.shape[-2] != self.image_size:
            image = F.interpolate(image, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return {"image": image[0].expand(3, -1, -1), "label": self.labels[index].long(),  # (3, S, S)
                "index": torch.tensor(index)}


class IDXDataModule(DictDataModule):
    """MNIST-layout IDX files under `root` as (3, S, S) images for pretrained backbones.

    Args:
        root: folder holding the four release files (see `LAYOUT`), .gz or extracted; they are looked up when the
            datamodule is built (a missing one is said before a fit moves an earlier run), read at setup.
        dataset: "fashion_mnist", "mnist" or "kmnist": names the classes; `class_names` overrides.
        image_size: side the 28x28 images are resized to (e.g. 64-96 for an ImageNet MobileNetV2).
        mean / std: per-channel normalisation applied after resizing (lists), "pretrained" (mean only: the model's
            backbone's pretrained mean and std, e.g. ImageNet's for torchvision weights), or None: [0, 1] pixels.
        num_train: a seeded subset of the training images (after the validation images are set apart); None: all.
        num_val: training images set apart for validation (seeded).
        num_test: the first `num_test` t10k images (>= 1); None: all 10,000.
    """

    num_channels = 3

    def __init__(
        self,
        root: str | Path,
        dataset: str = "fashion_mnist",
        class_names: Sequence[str] | None = None,
        image_size: int = 64,
        mean: Sequence[float] | str | None = None,
        std: Sequence[float] | str | None = None,
        num_train: int | None = None,
        num_val: int = 5000,
        num_test: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters(ignore=["class_names"])  # keys cached helpers; the names are the model's hparam
        if class_names is None and dataset not in CLASS_NAMES:
            raise ValueError(f"Unknown dataset {dataset!r}: choose one of {sorted(CLASS_NAMES)} or give class_names.")
        self.class_names = list(class_names) if class_names is not None else CLASS_NAMES[dataset]
        self.set_normalization(mean, std)
        # num_test=-1 dropped the last test image silently (a slice), 0 left the test split empty
        if image_size < 1 or num_val < 1 or any(n is not None and n < 1 for n in (num_train, num_test)):
            raise ValueError(f"image_size, num_val, num_train and num_test must be positive (num_train and num_test "
                             f"may be None: all); got {image_size}, {num_val}, {num_train}, {num_test}.")
        self.root, self.num_classes, self.image_size = Path(root), len(self.class_names), image_size
        self.num_train, self.num_val, self.num_test, self.seed = num_train, num_val, num_test, seed
        # a mistyped root fails here, as CUB's and VOC's do: at setup it failed after a fit had moved the earlier
        # run to stale/ (files are only looked up: read, and checked, at setup)
        if not self.root.is_dir():
            raise DatasetLayoutError(f"IDX root {str(self.root)!r} is not a folder.", LAYOUT)
        for stem in STEMS:
            _find(self.root, stem)

    def _read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images_path, images = read_idx(self.root, f"{split}-images-idx3-ubyte", IMAGES_MAGIC)
        labels_path, labels = read_idx(self.root, f"{split}-labels-idx1-ubyte", LABELS_MAGIC)
        if len(images) != len(labels):
            raise DatasetLayoutError(f"{split}: {len(images)} images but {len(labels)} labels ({str(images_path)!r}, "
                                     f"{str(labels_path)!r}).", LAYOUT)
        check_labels(labels.long(), self.num_classes, str(labels_path))
        return images, labels

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels = self._read("train")
        if self.num_val >= len(labels):
            raise DataSettingError(f"num_val={self.num_val} leaves no training images out of {len(labels)}.")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[: self.num_val], order[self.num_val :][: self.num_train]
        test_images, test_labels = self._read("t10k")
        test_images, test_labels = test_images[: self.num_test], test_labels[: self.num_test]
        self.splits = {"train": self._dataset(images[train], labels[train]),
                       "val": self._dataset(images[val], labels[val]), "test": self._dataset(test_images, test_labels)}

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor) -> IDXImages:
        return IDXImages(images, labels, self.image_size)
