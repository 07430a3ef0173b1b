"""Shared fixtures: tiny datasets written in the real on-disk formats, and a clean working directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n auto`) each worker gets its share of the cores for torch's intra-op threads: the
    models here are small, so one thread per worker and a worker per core beat two threads fighting over each core
    (OpenMP threads spin while they wait)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def cpu_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CLI run of a test trains on the CPU (configs leave the accelerator to Lightning, which picks a GPU when
    there is one); a `--trainer.accelerator` on the command line still wins. Trainers a test builds itself pass
    `accelerator="cpu"`; subprocess runs pass `--trainer.accelerator=cpu`."""
    import zoo.cli.lightning

    monkeypatch.setattr(zoo.cli.lightning, "TRAINER_DEFAULTS", {**zoo.cli.lightning.TRAINER_DEFAULTS,
                                                                "accelerator": "cpu"})


@pytest.fixture(autouse=True)
def own_rendezvous_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's spawned DDP processes meet on a port of their own. Lightning's launcher writes MASTER_PORT into
    this process's environment at its first multi-process run, so without this every later DDP test of the same
    xdist worker would reuse that port, which the last run's sockets may still hold."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))  # restored (removed) after the test


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder_root(tmp_path: Path) -> Path:
    """root/{train,val}/{cat,dog}/*.jpg and .png, 3 train and 2 val images per class."""
    root = tmp_path / "imagefolder"
    for split, count in (("train", 3), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                write_image(root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}", (40, 30), seed=100 * c + i)
    return root


# The 15 CUB part names, in part_id order, as in parts/parts.txt of the release.
CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat"]


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    """A 3-class, 8-image CUB_200_2011 folder in the release's format (images 60x40, odd ids shuffled)."""
    base = tmp_path / "cub" / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    image_ids = [3, 1, 2, 4, 8, 5, 7, 6]  # files are keyed by id, not by line order
    images, labels, split, boxes, locs = [], [], [], [], []
    for n, image_id in enumerate(image_ids):
        cls = n % 3
        rel = f"{classes[cls]}/{classes[cls].split('.')[1]}_{image_id:04d}_{image_id}.jpg"
        write_image(base / "images" / rel, (60, 40), seed=image_id)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {cls + 1}")
        split.append(f"{image_id} {int(n < 5)}")
        boxes.append(f"{image_id} 10.0 5.0 40.0 30.0")
        for part in range(1, 16):
            visible = int((part + image_id) % 3 != 0)
            x, y = (12.0 + part, 6.0 + part) if visible else (0.0, 0.0)
            locs.append(f"{image_id} {part} {x} {y} {visible}")
    (base / "parts").mkdir(parents=True)
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes),
                        ("classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)]),
                        ("parts/part_locs.txt", locs),
                        ("parts/parts.txt", [f"{i + 1} {p}" for i, p in enumerate(CUB_PARTS)])):
        (base / name).write_text("\n".join(lines) + "\n")
    return base.parent


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temporary directory so checkpoints/ and logs land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


IMDB_REVIEWS = {
    "pos": ["A wonderful, moving film.<br />Great cast!", "Great story and great music.", "Loved it: superb acting."],
    "neg": ["Boring and awful.<br /><br />Bad script.", "The plot was bad, the music worse.", "Awful, just awful."],
}


def write_imdb(root: Path, reviews: dict[str, dict[str, list[str]]]) -> Path:
    """An aclImdb folder in the release's layout, {train,test}/{pos,neg}/<id>_<rating>.txt, from split -> polarity
    -> review texts."""
    for split, by_polarity in reviews.items():
        for polarity, texts in by_polarity.items():
            folder = root / split / polarity
            folder.mkdir(parents=True)
            for i, text in enumerate(texts):
                (folder / f"{i}_{9 if polarity == 'pos' else 2}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def imdb_root(tmp_path: Path) -> Path:
    """An aclImdb folder in the release's layout: {train,test}/{pos,neg}/<id>_<rating>.txt, 3 reviews each."""
    return write_imdb(tmp_path / "aclImdb", {"train": IMDB_REVIEWS, "test": IMDB_REVIEWS})


def voc_annotation(image_id: str, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    """An Annotations/<id>.xml in the VOC release's format (1-based pixel corners)."""
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
             "<size><width>64</width><height>48</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "\n".join(parts) + "\n</annotation>\n"


VOC_OBJECTS = {
    "000005": [("chair", (10, 8, 40, 30), 0), ("person", (30, 5, 60, 45), 1)],
    "000007": [("car", (2, 10, 50, 40), 0)],
    "000009": [("dog", (5, 5, 30, 30), 0), ("cat", (33, 10, 62, 44), 0)],
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2007 with three 64x48 JPEGs, their XML annotations and ImageSets/Main/{train,val,test}.txt."""
    base = tmp_path / "VOCdevkit" / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for n, (image_id, objects) in enumerate(VOC_OBJECTS.items()):
        write_image(base / "JPEGImages" / f"{image_id}.jpg", (64, 48), seed=n)
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_annotation(image_id, objects))
    for split, ids in (("train", ["000005", "000007"]), ("val", ["000009"]), ("test", ["000009"])):
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return tmp_path / "VOCdevkit"
