"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), optionally a class subset."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from datamodules._base import DictDataModule, TensorDictDataset


class DigitsDataModule(DictDataModule):
    """Digits as (1, S, S) float images in [0, 1]; labels re-indexed over `classes` (the original kept as "digit").

    Args:
        classes: digits to keep, e.g. [3, 8] for L2X's 3-vs-8 task; None keeps all ten.
        image_size: 8 (native) or larger, upsampled with `upsample_mode`.
        val_fraction / test_fraction: stratified split fractions, drawn with `seed`.
        mean / std: per-channel normalisation of the [0, 1] images (lists), "pretrained" (mean only: the model's
            backbone's timm pretrained mean and std, resolved by train.py), or None: none (`DictDataModule`).

    `class_names` are the kept digits ("3", "8").
    """

    num_channels = 1

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        image_size: int = 8,
        upsample_mode: str = "nearest",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        mean: list[float] | str | None = None,
        std: list[float] | str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        self.set_normalization(mean, std)
        self.classes = list(range(10)) if classes is None else [int(c) for c in classes]
        bad = [c for c in self.classes if not 0 <= c <= 9]
        if bad or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError(f"classes must be at least two distinct digits in 0..9; got {list(classes or [])}.")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the native size); got {image_size}.")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum < 1; got "
                             f"{val_fraction}, {test_fraction}.")
        self.num_classes, self.image_size, self.upsample_mode = len(self.classes), image_size, upsample_mode
        self.class_names = [str(c) for c in self.classes]
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        keep = torch.isin(torch.as_tensor(digits.target), torch.tensor(self.classes))
        images = torch.as_tensor(digits.images, dtype=torch.float32)[keep][:, None] / 16.0  # (N, 1, 8, 8)
        if self.image_size != 8:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode=self.upsample_mode)
        digit = torch.as_tensor(digits.target)[keep]
        to_label = torch.full((10,), -1, dtype=torch.long)
        to_label[self.classes] = torch.arange(len(self.classes))
        label = to_label[digit]  # position of each digit in `classes`
        index = torch.arange(len(label))
        rest, test = train_test_split(index, test_size=self.test_fraction, stratify=label, random_state=self.seed)
        train, val = train_test_split(rest, test_size=self.val_fraction / (1 - self.test_fraction),
                                      stratify=label[rest], random_state=self.seed)
        fields = {"image": images, "label": label, "digit": digit}
        for split, ids in (("train", train), ("val", val), ("test", test)):
            self.splits[split] = TensorDictDataset({k: v[ids] for k, v in fields.items()})
