"""Images in torchvision's ImageFolder layout (root/<split>/<class>/<image>), resized to a square."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from datamodules._base import DatasetLayoutError, DictDataModule, check_image_size

IMAGE_FOLDER_LAYOUT = """\
<root>/
  train/<class name>/<image>.jpg|.png|...   one folder per class
  val/<class name>/<image>                  the same class folders
  test/<class name>/<image>                 optional: test and predict read it (without it, val/)
  hidden entries (names starting with ".", e.g. .ipynb_checkpoints/, ._x.jpg) are skipped"""

DEFAULT_TEST_DIR = "test"  # the test split's folder when test_dir is not set (else: the val split)

# Modes whose pixels exceed 8 bits, with the value read as white: 16-bit grey (PNG and TIFF; older Pillows read them
# as "I", 32-bit int), and float grey in [0, 1] as torchvision takes float images.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8_bits(img: Image.Image) -> Image.Image:
    """A wide grey image (`WIDE_MODES`) scaled to 8-bit "L" by its mode's range: PIL's own conversion clips every
    value above 255 to white. Values outside the range (genuine 32-bit data, float images in [0, 255]) raise
    instead of being clipped; other modes are returned as they are."""
    if img.mode not in WIDE_MODES:
        return img
    top, values = WIDE_MODES[img.mode], np.asarray(img, dtype=np.float64)
    if values.size and not (np.isfinite(values).all() and 0 <= values.min() and values.max() <= top):
        raise ValueError(f"mode {img.mode!r} pixel values span [{values.min():g}, {values.max():g}]; read as grey "
                         f"in [0, {top:g}], so convert the file to 8 or 16 bits (or floats in [0, 1]).")
    return Image.fromarray(np.round(values * (255 / top)).astype(np.uint8), "L")


def read_rgb(path: str | Path) -> Image.Image:
    """Open an image fully (so truncated files fail here) with an error naming the file; 16-bit and float grey
    images are scaled to 8 bits by their range (`to_8_bits`), not clipped. A file that cannot be read (truncated,
    not an image) raises a DatasetLayoutError, the error of bad dataset files, with no layout: the ImageFolder, CUB and
    VOC loaders all read with this function, and the file is where their layouts put it."""
    try:
        with Image.open(path) as img:
            return to_8_bits(img).convert("RGB")
    except (OSError, ValueError) as err:  # DatasetLayoutError: the CLI says it in one line, without a traceback
        advice = ". Replace or remove the file." if isinstance(err, OSError) else ""  # a ValueError gives its own
        raise DatasetLayoutError(f"Cannot read image {str(path)!r}: {err}{advice}") from err


def visible(path: str | Path, root: Path) -> bool:
    """No part of `path` below `root` is hidden (starts with "."): notebook checkpoints, macOS ._ files."""
    return not any(part.startswith(".") for part in Path(path).relative_to(root).parts)


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden class folders (e.g. .ipynb_checkpoints/), which it would otherwise
    count as a class, or fail on when they hold no image; hidden files are skipped by `visible`."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = [c for c in super().find_classes(directory)[0] if not c.startswith(".")]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any visible class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def image_transform(image_size: int, augment: bool) -> transforms.Compose:
    steps = [transforms.Resize((image_size, image_size))]
    if augment:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor()])


class FolderDataset(Dataset):
    """An ImageFolder yielding dict samples; unreadable images raise with their path."""

    def __init__(self, folder: ImageFolder, transform: transforms.Compose) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, label = self.folder.samples[index]
        return {"image": self.transform(read_rgb(path)), "label": torch.tensor(label), "index": torch.tensor(index)}


def scan_folder(root: Path, split: str) -> ImageFolder:
    """The images of `root/split`; a missing or empty folder raises with the layout."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"ImageFolder split folder {str(split_dir)!r} does not exist.", IMAGE_FOLDER_LAYOUT)
    try:
        return VisibleImageFolder(str(split_dir), loader=read_rgb, is_valid_file=lambda path: visible(path, split_dir)
                                  and has_file_allowed_extension(path, IMG_EXTENSIONS))
    except FileNotFoundError as err:
        raise DatasetLayoutError(f"{str(split_dir)!r} holds no class folders with images ({err}).",
                                 IMAGE_FOLDER_LAYOUT) from err


class ImageFolderDataModule(DictDataModule):
    """Classification on an ImageFolder tree; classes come from the train split's folder names. Hidden folders and
    files (names starting with ".", e.g. Jupyter's .ipynb_checkpoints/ or macOS's ._<image>) are skipped, as
    torchvision users expect, instead of becoming a class or failing the scan.

    Args:
        root: folder holding the split folders.
        image_size: images are resized to image_size x image_size.
        train_dir / val_dir / test_dir: split folder names. test_dir None: `root/test` where it is a folder, else
            the val split (said once, when the test or predict split is first read); `test` and `predict` read the
            test split. A test_dir that is given must exist.
        augment: random horizontal flips on the training split.
        mean / std: per-channel normalisation of the [0, 1] images (lists), "pretrained" (mean only: the model's
            backbone's timm pretrained mean and std, resolved by train.py), or None: none (`DictDataModule`).

    `class_names` are the train split's class folder names, in ImageFolder's (sorted) id order.
    """

    num_channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        augment: bool = False,
        mean: list[float] | str | None = None,
        std: list[float] | str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        self.set_normalization(mean, std)
        check_image_size(image_size, type(self).__name__)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetLayoutError(f"ImageFolder root {root!r} does not exist.", IMAGE_FOLDER_LAYOUT)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.folders = {split: scan_folder(self.root, d) for split, d in self.split_dirs.items()}
        self.classes = self.folders["train"].classes
        if len(self.classes) < 2:  # else torchmetrics' "num_classes ... larger than 1", naming no folder
            raise DatasetLayoutError(f"ImageFolder split folder {str(self.root / train_dir)!r} holds one class folder "
                                     f"({self.classes}); classification needs two or more.", IMAGE_FOLDER_LAYOUT)
        for split, folder in self.folders.items():
            if folder.classes != self.classes:
                raise DatasetLayoutError(
                    f"Split {split!r} ({str(self.root / self.split_dirs[split])!r}) has classes {folder.classes}, "
                    f"train has {self.classes}: they must match.", IMAGE_FOLDER_LAYOUT)
        # test_dir None: the README's layout root/{train,val[,test]}: test/ where it is there and laid out as train/
        # (it was never read: test and predict read val/ and said nothing), else val/, said when first read
        # what the first read of the test split says (and how), once: None when it reads the split asked for
        self.test_note = self.find_test_folder(val_dir) if test_dir is None else None
        self.num_classes, self.image_size, self.augment = len(self.classes), image_size, augment
        self.class_names = self.classes

    def find_test_folder(self, val_dir: str) -> tuple[Callable[[str], Any], str] | None:
        """With test_dir unset: the test split reads `root/test` where it holds train's class folders; else it reads
        the val split, and what is returned is what the first read of the test split says and how (info where there
        is no test/, a warning where one misfits; None: nothing to say). A test/ laid out otherwise (unlabelled
        images, some classes only, empty) is not an error, as it was not before test/ was read: fit never reads the
        test split."""
        val = str(self.root / val_dir)
        if not (self.root / DEFAULT_TEST_DIR).is_dir():
            return rank_zero_info, f"no {DEFAULT_TEST_DIR!r} folder in {str(self.root)!r} (and test_dir is not set): " \
                                   f"test and predict read the val split, {val!r}."
        try:
            folder = scan_folder(self.root, DEFAULT_TEST_DIR)
        except DatasetLayoutError as err:
            problem = err.problem
        else:
            if folder.classes == self.classes:
                self.split_dirs["test"], self.folders["test"] = DEFAULT_TEST_DIR, folder
                return None
            problem = f"its classes {folder.classes} are not train's {self.classes}"
        return rank_zero_warn, f"{str(self.root / DEFAULT_TEST_DIR)!r} is not laid out as train/ ({problem}), so " \
                               f"test and predict read the val split, {val!r}; set test_dir: {DEFAULT_TEST_DIR} to be " \
                               f"refused with what is wrong."

    def split_samples(self, split: str) -> Dataset:
        """`DictDataModule.split_samples`; the first read of the test split (test, predict) that reads the val folder
        says so and why (`find_test_folder`), once and on rank zero."""
        if split == "test" and self.test_note is not None:
            say, note = self.test_note
            self.test_note = None  # said once
            say(f"ImageFolderDataModule: {note}")
        return super().split_samples(split)

    def sample_names(self, split: str) -> list[str]:
        """Each image's path under `root` (e.g. "val/cat/0.png"), by sample index."""
        return [str(Path(path).relative_to(self.root)) for path, _ in self.folders[split].samples]

    def train_samples(self, augment: bool = True) -> Dataset:
        """The training split; `augment=False`: the same images without the random flips (`DictDataModule`)."""
        samples = self.split_samples("train")  # the split's checks, and the loaders' samples
        if augment or not self.augment:
            return samples
        return self.normalized(FolderDataset(self.folders["train"], image_transform(self.image_size, augment=False)))

    def setup(self, stage: str | None = None) -> None:
        for split, folder in self.folders.items():
            self.splits.setdefault(split, FolderDataset(folder, image_transform(self.image_size,
                                                                                self.augment and split == "train")))

