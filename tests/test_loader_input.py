"""Loaders of real data on disk refuse input they would read wrong, or fail on late, naming the file and the line:
IDX release files, users' series files (.csv / .npz) and a VOCdevkit with missing images."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from datamodules import DatasetLayoutError, DataSettingError, IDXDataModule, SeriesFileDataModule, VOCDataModule
from tests.helpers import write_idx_set


def series_rows(count: int = 20, length: int = 8) -> list[str]:
    """`count` CSV rows of a two-class series file: the label (alternating 0 / 1), then `length` values."""
    return [f"{i % 2}," + ",".join(f"{0.5 * j + i:g}" for j in range(length)) for i in range(count)]


def test_idx_num_test_is_checked_like_num_train_and_num_val(tmp_path: Path) -> None:
    """num_test=-1 kept all but the last test image (a slice), num_test=0 left the test split empty, silently."""
    write_idx_set(tmp_path, gz=False)
    for num_test in (-1, 0):
        with pytest.raises(ValueError, match=rf"num_test must be positive.*got 64, 4, None, {num_test}\."):
            IDXDataModule(tmp_path, num_val=4, num_test=num_test)
    data = IDXDataModule(tmp_path, num_val=4, num_test=5)
    data.setup()
    assert len(data.splits["test"]) == 5


def test_idx_errors_name_the_path_and_say_a_gzip_file_is_one(tmp_path: Path) -> None:
    """Errors named only the stem ("t10k-labels-idx1-ubyte: ..."), not which file of which root; a gzipped file
    without .gz was a bare "bad magic number 0x1f8b0800"."""
    write_idx_set(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one label short of the header's count
    with pytest.raises(DatasetLayoutError, match=rf"^'{re.escape(str(labels))}': the header announces 12 items"):
        IDXDataModule(tmp_path, num_val=4).setup()
    write_idx_set(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(gzip.compress(images.read_bytes()))  # gzipped, but the name says extracted
    found = rf"'{re.escape(str(images))}': bad magic number 0x1f8b0800, expected 0x00000803\. It is gzip-compressed"
    with pytest.raises(DatasetLayoutError, match=rf"{found} .* rename it train-images-idx3-ubyte\.gz"):
        IDXDataModule(tmp_path, num_val=4).setup()


@pytest.mark.parametrize("fractions", [{"val_fraction": -0.3}, {"val_fraction": 0.0}, {"test_fraction": 0.0},
                                       {"val_fraction": 0.6, "test_fraction": 0.5}, {"train_fraction": 0.0},
                                       {"train_fraction": 1.5}])
def test_series_file_fractions_are_range_checked(tmp_path: Path, fractions: dict[str, float]) -> None:
    """A negative or zero val_fraction / test_fraction became a split of one row silently (CSVTextDataModule refuses
    them); train_fraction 0 kept one row per class, 1.5 all rows."""
    path = tmp_path / "s.csv"
    path.write_text("\n".join(series_rows()) + "\n")
    name = next(iter(fractions))
    with pytest.raises(ValueError, match=rf"{name} .*must be in \(0, 1[)\]]"):
        SeriesFileDataModule(path, num_classes=2, **fractions)


def test_series_csv_errors_and_sample_names_give_the_files_own_lines(tmp_path: Path) -> None:
    """np.loadtxt skips '#' comments and blank lines, so "CSV lines" in errors (row + 1) and `sample_names` pointed
    above the line meant: a NaN on line 11 was said to be on line 9."""
    rows = series_rows()
    lines = ["# label, then 8 values", *rows[:4], "", *rows[4:]]  # row r is on line r + 2 (r < 4), r + 3 after
    lines[10] = "1," + ",".join(["nan"] * 8)  # line 11: row 8
    path = tmp_path / "s.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"rows \[8\] \(0-based; CSV lines \[11\]\)"):
        SeriesFileDataModule(path, num_classes=2)
    lines[10] = "1,0,0,x,0,0,0,0,0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"line 11, field 4 is no number \(could not convert string 'x'"):
        SeriesFileDataModule(path, num_classes=2)
    lines[10] = "1,0,0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"line 2 holds 9 fields .* 1 other row\(s\) do not \(line 11: 3 "):
        SeriesFileDataModule(path, num_classes=2)
    lines[10] = rows[8]
    path.write_text("\n".join(lines) + "\n")
    data = SeriesFileDataModule(path, num_classes=2)
    data.setup()
    for split in ("train", "val", "test"):
        for name, series in zip(data.sample_names(split), data.splits[split].tensors["series"]):
            row = int(series[0, 0])  # row r's first value is r (series_rows)
            assert name == f"row {row} (line {row + 2 if row < 4 else row + 3})"


@pytest.mark.parametrize("content, problem", [("", "holds no series: no data lines"),
                                              ("# only a comment\n\n", "holds no series: no data lines"),
                                              ("0\n1\n0\n1\n", r"rows with a label but no values \(T=0\)")])
def test_series_csv_without_series_is_refused(tmp_path: Path, content: str, problem: str) -> None:
    """An empty CSV raised a raw "cannot reshape tensor of 0 elements" at setup; label-only rows made a model of
    length 0."""
    path = tmp_path / "s.csv"
    path.write_text(content)
    with pytest.raises(DatasetLayoutError, match=problem):
        SeriesFileDataModule(path, num_classes=2).setup()


@pytest.mark.parametrize("shape, problem", [((0, 8), r"holds no series \(N=0\)"),
                                            ((6, 0), r"has series \(6, 1, 0\) \(N, C, T\) with no values")])
def test_series_npz_without_series_is_refused(tmp_path: Path, shape: tuple[int, int], problem: str) -> None:
    np.savez(tmp_path / "s.npz", series=np.zeros(shape), label=np.arange(shape[0]) % 2)
    with pytest.raises(DatasetLayoutError, match=problem):
        SeriesFileDataModule(tmp_path / "s.npz", num_classes=2).setup()


def test_series_labels_from_one_get_a_hint_to_shift_them(tmp_path: Path) -> None:
    """UCR files number classes 1..C: the error said only "labels span [1, 2], outside [0, 2)"."""
    path = tmp_path / "ucr.csv"
    path.write_text("\n".join(f"{int(row[0]) + 1}{row[1:]}" for row in series_rows()) + "\n")
    with pytest.raises(DataSettingError, match=r"labels span \[1, 2\], outside \[0, 2\)\. They look 1-based .* "
                                               r"subtract 1 from every label"):
        SeriesFileDataModule(path, num_classes=2)
    path.write_text("\n".join(f"{i % 3 + 1}{row[1:]}" for i, row in enumerate(series_rows())) + "\n")
    with pytest.raises(DataSettingError, match=r"labels span \[1, 3\], outside \[0, 2\)\.$"):  # not 1..C: no hint
        SeriesFileDataModule(path, num_classes=2)


def test_voc_refuses_missing_images_when_built(voc_root: Path) -> None:
    """Annotations were read at setup to fail early, but a missing JPEG failed only when the sample was loaded: a
    missing val or test image after training. Both are refused when the datamodule is built (before `fit` moves an
    earlier run to stale/)."""
    base = voc_root / "VOC2007"
    (base / "JPEGImages" / "000009.jpg").unlink()
    where = re.escape(str(base))
    listed = rf"split file '{where}/ImageSets/Main/val.txt' \(the val split\)"
    with pytest.raises(DatasetLayoutError, match=rf"(?s){listed} lists 1 image\(s\) of 1 that do not exist: "
                                                 rf"'{where}/JPEGImages/000009.jpg'.*Expected layout"):
        VOCDataModule(str(voc_root), train_split="train", val_split="val", test_split="test")
    (base / "ImageSets" / "Main" / "many.txt").write_text("\n".join(f"{n:06d}" for n in range(20, 28)) + "\n000005\n")
    with pytest.raises(DatasetLayoutError, match=r"lists 8 image\(s\) of 9 that do not exist: '[^']*/000020.jpg', "
                                                 r"('[^']*', ){3}'[^']*/000024.jpg', \.\.\."):
        VOCDataModule(str(voc_root), train_split="many", val_split="train", test_split="train")


def test_series_npz_that_is_truncated_or_corrupt_names_the_file(tmp_path: Path) -> None:
    """A truncated .npz (zipfile.BadZipFile), an empty one (EOFError) and a corrupt compressed one (zlib.error)
    escaped the reader's ValueError handling: "train.py: error: File is not a zip file", naming no file."""
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "good.npz", series=rng.normal(size=(200, 64)), label=np.arange(200) % 2)
    raw = (tmp_path / "good.npz").read_bytes()
    corrupt = bytes(raw[:200]) + bytes(b ^ 0x55 for b in raw[200:2000]) + bytes(raw[2000:])  # the zip index kept
    for name, content, problem in (("truncated", raw[: len(raw) // 2], "File is not a zip file"),
                                   ("empty", b"", "No data left in file"),
                                   ("corrupt", corrupt, "Error -3 while decompressing data")):
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        with pytest.raises(DatasetLayoutError, match=rf"Could not read series from '{re.escape(str(path))}' "
                                                     rf"\({problem}.*\)\.\nExpected layout"):
            SeriesFileDataModule(path, num_classes=2)
