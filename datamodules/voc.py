"""PASCAL VOC detection in its release layout (VOCdevkit/VOC2007 or VOC2012), read without downloading anything.

Boxes come from Annotations/<id>.xml (VOC's 1-based pixel corners, shifted to 0-based xyxy as torchvision's
references do); objects marked difficult are left out of training targets by default and kept, flagged, for
evaluation. Images are returned at their own size: the detector's transform resizes them.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import hflip, to_tensor

from datamodules._base import DatasetLayoutError, DetectionDataModule, check_image_size
from datamodules.image_folder import read_rgb

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_LAYOUT = """\
<root>/                       VOCdevkit/VOC2007 (or a VOCdevkit folder holding VOC<year>/)
  Annotations/<id>.xml        one per image: <object><name>, <difficult>, <bndbox> xmin ymin xmax ymax
  JPEGImages/<id>.jpg
  ImageSets/Main/<split>.txt  image ids, one per line (train, val, trainval; test only in VOC2007)"""


def find_voc_root(root: str | Path, year: str) -> Path:
    """The folder holding Annotations/ (root itself, root/VOC<year> or root/VOCdevkit/VOC<year>)."""
    base = Path(root)
    if re.fullmatch(r"VOC\d{4}", base.name) and base.name != f"VOC{year}" and (base / "Annotations").is_dir():
        raise DatasetLayoutError(f"VOC root {str(base)!r} is {base.name}, but year={year!r} asks for VOC{year}: give "
                                 f"the VOCdevkit folder (or VOC{year} itself), or year={base.name[3:]!r}.", VOC_LAYOUT)
    for candidate in (base, base / f"VOC{year}", base / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "Annotations").is_dir():
            missing = [d for d in ("JPEGImages", "ImageSets/Main") if not (candidate / d).is_dir()]
            if missing:
                raise DatasetLayoutError(f"VOC folder {str(candidate)!r} lacks {missing}.", VOC_LAYOUT)
            return candidate
    problem = "does not exist" if not base.exists() else f"holds no Annotations/ (nor VOC{year}/Annotations/)"
    raise DatasetLayoutError(f"VOC root {str(base)!r} {problem}.", VOC_LAYOUT)


def read_ids(root: Path, split: str, used_as: str | None = None) -> list[str]:
    """The image ids ImageSets/Main/<split>.txt lists; `used_as`: the module's split that reads it ("val"), named
    in the error with the option that picks the list and the lists there are."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        where = ""
        if used_as is not None:
            lists = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)  # not the class lists
            where = (f" (the {used_as} split's list): give data.init_args.{used_as}_split the name of a list in "
                     f"{str(path.parent)!r} (there: {lists})")
        raise DatasetLayoutError(f"VOC split file {str(path)!r} does not exist{where}.", VOC_LAYOUT)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    # a class list (`<class>_<set>.txt`: "<id> 1 | 0 | -1") names every image with a flag: -1 the class is absent
    # (0: only difficult instances of it); its images are those without -1
    ids = [row[0] for row in rows if len(row) < 2 or row[1] != "-1"]
    if not ids:
        raise DatasetLayoutError(f"VOC split file {str(path)!r} lists no images.", VOC_LAYOUT)
    return ids


def check_images(root: Path, ids: list[str], split: str, name: str) -> None:
    """Refuse a split whose list names images JPEGImages/ lacks or images without their Annotations/<id>.xml: one
    existence check per file (none is opened), where the loader would otherwise fail only on reaching it, a missing
    val or test image after training. The error names the split and its list, the first five missing files and how
    many are missing."""
    listed = root / "ImageSets" / "Main" / f"{name}.txt"
    for folder, suffix, what in (("JPEGImages", "jpg", "that do not exist"),
                                 ("Annotations", "xml", "whose annotation does not exist")):
        missing = [path for path in (root / folder / f"{i}.{suffix}" for i in ids) if not path.is_file()]
        if missing:
            shown = ", ".join(repr(str(path)) for path in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DatasetLayoutError(f"VOC split file {str(listed)!r} (the {split} split) lists {len(missing)} "
                                     f"image(s) of {len(ids)} {what}: {shown}. Restore them (a partial extraction?) "
                                     f"or list only the images there are.", VOC_LAYOUT)


def read_annotation(path: Path) -> dict[str, torch.Tensor]:
    """boxes (n, 4) 0-based xyxy, labels (n,) in 1..20, difficult (n,) bool; errors name the file and object.
    Boxes reaching past the image's <size> are clipped to it, with a warning naming them (a box outside the image
    can never be matched by a detection, which the detector keeps inside); a box empty inside the image is refused."""
    if not path.is_file():
        raise DatasetLayoutError(f"VOC annotation {str(path)!r} does not exist.", VOC_LAYOUT)
    try:
        annotation = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetLayoutError(f"VOC annotation {str(path)!r} is not valid XML: {err}", VOC_LAYOUT) from err
    objects = annotation.findall("object")
    try:  # <size>: every release file has it
        width, height = (float(annotation.findtext(f"size/{k}")) for k in ("width", "height"))
    except (TypeError, ValueError):
        width = height = None
    boxes, labels, difficult, clipped = [], [], [], []
    for number, obj in enumerate(objects):  # a handful of objects per file, read once
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DatasetLayoutError(f"{path}: object {number} has class {name!r}, not one of the 20 VOC classes.",
                                     VOC_LAYOUT)
        try:
            corners = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError) as err:
            raise DatasetLayoutError(f"{path}: object {number} ({name}) has no valid <bndbox> xmin/ymin/xmax/ymax.",
                                     VOC_LAYOUT) from err
        x1, y1, x2, y2 = corners[0] - 1, corners[1] - 1, corners[2], corners[3]
        where = ""
        if width is not None and height is not None:  # a box past the image could never be matched: clip it
            inside = (max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height))
            if inside != (x1, y1, x2, y2):
                clipped.append(f"object {number} ({name}) {corners}")
                x1, y1, x2, y2 = inside
                where = f" inside the {width:g}x{height:g} image"
        if not (x2 > x1 and y2 > y1):
            raise DatasetLayoutError(f"{path}: object {number} ({name}) has an empty box {corners}{where}.",
                                     VOC_LAYOUT)
        boxes.append([x1, y1, x2, y2])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    if clipped:
        warnings.warn(f"{path}: clipped to the {width:g}x{height:g} image (<size>): {'; '.join(clipped)}.",
                      stacklevel=2)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels).long(),
            "difficult": torch.tensor(difficult, dtype=torch.bool)}


class VOCDataset(Dataset):
    """(image (3, H, W) float, target {"boxes", "labels", "difficult", "index"}) per listed image."""

    def __init__(self, root: Path, ids: list[str], keep_difficult: bool, flip: bool,
                 targets: list[dict[str, torch.Tensor]] | None = None) -> None:
        self.root, self.ids, self.keep_difficult, self.flip = root, ids, keep_difficult, flip
        # `targets`: the ids' annotations read already (`VOCDataModule` reads them when built); else read here, all
        # at once: fail early, not mid-epoch
        self.targets = targets if targets is not None else [read_annotation(root / "Annotations" / f"{i}.xml")
                                                            for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        path = self.root / "JPEGImages" / f"{self.ids[index]}.jpg"
        if not path.is_file():
            raise DatasetLayoutError(f"VOC image {str(path)!r} (listed in the split file) does not exist.",
                                     VOC_LAYOUT)
        image = to_tensor(read_rgb(path))
        target = dict(self.targets[index])
        if not self.keep_difficult:
            keep = ~target["difficult"]
            target = {k: v[keep] for k, v in target.items()}
        if self.flip and torch.rand(()) < 0.5:
            image = hflip(image)
            width = image.shape[-1]
            target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
                [width, 0, width, 0])
        target["index"] = torch.tensor(index)
        return image, target


# The splits each release's standard protocol uses: VOC2007 published its test annotations, later years did not.
YEAR_SPLITS = {"2007": {"train": "trainval", "val": "test", "test": "test"},
               "2012": {"train": "train", "val": "val", "test": "val"}}


class VOCDataModule(DetectionDataModule):
    """PASCAL VOC detection from a local VOCdevkit (no download).

    Args:
        root: VOCdevkit/VOC<year>, or a folder holding it.
        year: "2007" or "2012" (picks the sub-folder when `root` is above it, and the default splits).
        train_split / val_split / test_split: ImageSets/Main list names; None takes the year's standard protocol:
            VOC2007 trains on trainval and validates and tests on test; the other years' releases have no public
            test annotations (only train / val / trainval), so they train on train and validate and test on val.
            Either way validation runs on the split that is tested: choose no checkpoint by it (configs/aog_rcnn/
            voc.yaml keeps the last one).
        image_size: the detector's input size (linked into the model; images are resized by the detector).
        keep_difficult: keep "difficult" objects in training targets (VOC evaluation ignores them either way).
        flip: random horizontal flips in training.

    The folder is checked when the module is built (`read_split`), as the CUB, IDX and series loaders are: the split
    file of every split it uses, each listed image's JPEG and annotation, and each annotation's classes and boxes,
    so `train.py fit` says a broken folder before it moves an earlier run to stale/.
    """

    num_channels = 3
    num_classes = len(VOC_CLASSES)
    class_names = list(VOC_CLASSES)

    def __init__(self, root: str = "data/VOCdevkit/VOC2007", year: str = "2007", train_split: str | None = None,
                 val_split: str | None = None, test_split: str | None = None, image_size: int = 480,
                 keep_difficult: bool = False, flip: bool = True, batch_size: int = 4, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        check_image_size(image_size, type(self).__name__)  # the detector's input size, linked into the model
        self.image_size = image_size
        self.root = find_voc_root(root, year)
        defaults = YEAR_SPLITS.get(str(year), YEAR_SPLITS["2012"])
        given = {"train": train_split, "val": val_split, "test": test_split}
        self.split_names = {split: name or defaults[split] for split, name in given.items()}
        self.listed: dict[str, tuple[list[str], list[dict[str, torch.Tensor]]]] = {}  # split file -> ids, targets
        for split, name in self.split_names.items():
            if name not in self.listed:
                self.listed[name] = read_split(self.root, split, name)

    def sample_names(self, split: str) -> list[str]:
        """Each image's id (JPEGImages/<id>.jpg) by sample index, as the split file lists them."""
        return list(self.listed[self.split_names[split]][0])

    def setup(self, stage: str | None = None) -> None:
        for split, name in self.split_names.items():
            if split not in self.splits:
                ids, targets = self.listed[name]
                # evaluation keeps difficult objects flagged, training drops them unless asked
                keep = self.hparams.keep_difficult or split != "train"
                self.splits[split] = VOCDataset(self.root, ids, keep, flip=self.hparams.flip and split == "train",
                                                targets=targets)


def read_split(root: Path, split: str, name: str) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """The ids split file `name` lists and their annotations (`read_annotation`), refusing a missing list, image or
    annotation (`check_images`) and a malformed annotation (an unknown class, an empty box) by name.

    Read when the datamodule is built, not at setup: `train.py fit` builds it before it moves an earlier run to
    stale/, and a layout error found at setup came after that move (a good run's checkpoints gone to stale/ for a
    missing test.txt). The cost is the one setup paid before (one existence check per file, every annotation parsed
    once: about a second for VOC2007's 10k XML files); setup reuses what was read."""
    ids = read_ids(root, name, split)
    check_images(root, ids, split, name)  # every file of the list at once: a count and the first five
    return ids, [read_annotation(root / "Annotations" / f"{i}.xml") for i in ids]
