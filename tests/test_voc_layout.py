"""VOCDataModule checks its folder when built, as the CUB, IDX and series loaders do: `train.py fit` builds the
datamodule before it moves an earlier run to stale/, and a missing split file, image or annotation, or an annotation
of an unknown class, was found only at setup, after that move (a good run's checkpoints left under stale/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from datamodules import DatasetLayoutError, VOCDataModule
from tests.conftest import voc_annotation

SPLITS = {"train_split": "train", "val_split": "val", "test_split": "test"}


def test_a_missing_split_file_is_refused_when_built(voc_root: Path) -> None:
    """The test split's list (VOC2007's protocol validates and tests on test.txt) missing: refused by name, with the
    option that picks it and the lists there are."""
    main = voc_root / "VOC2007" / "ImageSets" / "Main"
    (main / "test.txt").unlink()
    said = (rf"(?s){re.escape(str(main))}/test.txt' does not exist \(the test split's list\): give "
            r"data.init_args.test_split .*\['train', 'val'\]")
    with pytest.raises(DatasetLayoutError, match=said):
        VOCDataModule(str(voc_root), **SPLITS)


def test_missing_images_and_annotations_are_refused_when_built(voc_root: Path) -> None:
    base = voc_root / "VOC2007"
    (base / "Annotations" / "000007.xml").unlink()
    with pytest.raises(DatasetLayoutError, match=rf"train.txt' \(the train split\) lists 1 image\(s\) of 2 whose "
                                                 rf"annotation does not exist: '{re.escape(str(base))}/Annotations/"
                                                 r"000007.xml'"):
        VOCDataModule(str(voc_root), **SPLITS)
    (base / "Annotations" / "000007.xml").write_text(voc_annotation("000007", [("car", (2, 10, 50, 40), 0)]))
    (base / "JPEGImages" / "000009.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val.txt' \(the val split\) lists 1 image\(s\) of 1 that do not "
                                                 r"exist: '.*/JPEGImages/000009.jpg'"):
        VOCDataModule(str(voc_root), **SPLITS)


def test_an_annotation_of_an_unknown_class_is_refused_when_built(voc_root: Path) -> None:
    """Every annotation is read when the module is built (setup reuses it: no second parse)."""
    (voc_root / "VOC2007" / "Annotations" / "000009.xml").write_text(
        voc_annotation("000009", [("unicorn", (1, 1, 5, 5), 0)]))
    with pytest.raises(DatasetLayoutError, match=r"000009.xml: object 0 has class 'unicorn', not one of the 20"):
        VOCDataModule(str(voc_root), **SPLITS)
    good = VOCDataModule(str(voc_root), train_split="train", val_split="train", test_split="train", flip=False)
    good.setup()
    assert good.sample_names("val") == ["000005", "000007"]
    assert good.splits["train"].targets is good.listed["train"][1]  # read once, when built
