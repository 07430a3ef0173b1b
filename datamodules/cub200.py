"""CUB-200-2011 from its on-disk release layout, with bounding boxes and the 15 part landmarks in every batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules._base import (DatasetLayoutError, DictDataModule, check_image_size, check_labels, check_max_vocab,
                               decode_tokens)
from datamodules.image_folder import image_transform, read_rgb

CUB_LAYOUT = """\
<root>/CUB_200_2011/ (or <root> itself)
  images.txt               <image_id> <relative path under images/>     (each id once; the other files
                           are matched to it by <image_id>, in any line order)
  image_class_labels.txt   <image_id> <class_id 1..200>
  train_test_split.txt     <image_id> <is_training_image 0|1>
  bounding_boxes.txt       <image_id> <x> <y> <width> <height>
  classes.txt              <class_id> <class name>           (optional; ids 1..C, each once)
  parts/part_locs.txt      <image_id> <part_id 1..15> <x> <y> <visible 0|1>   (all 15 parts of every image)
  attributes/image_attribute_labels.txt  <image_id> <attribute_id> <is_present 0|1> <certainty> <time>
                           (only with attributes=True; attribute names from attributes.txt beside or above)
  images/<class folder>/<image>.jpg"""
REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
            "parts/part_locs.txt")


def find_cub_root(root: str | Path) -> Path:
    """`root` or `root`/CUB_200_2011, whichever holds the release's index files."""
    root = Path(root)
    for candidate in (root / "CUB_200_2011", root):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetLayoutError(f"No CUB-200-2011 images.txt under {str(root)!r}.", CUB_LAYOUT)


def read_lines(path: Path, layout: str = CUB_LAYOUT) -> list[str]:
    """The lines of a UTF-8 text file (the release's files are ASCII; a byte-order mark, as older Notepad saves,
    is dropped); bytes that are not UTF-8 raise a DatasetLayoutError naming the file and the line, not a bare
    UnicodeDecodeError from deep inside setup."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetLayoutError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}, "
                                 f"{data[err.start:err.start + 1]!r}); save the file as UTF-8.", layout) from err


def read_names(path: Path, what: str) -> list[str]:
    """`<id> <name>` lines (classes.txt, attributes.txt) as names by id: entry k is id k + 1, whatever the line
    order. Ids must be 1..N, each once: a gap or a repeat would shift every later name onto another class or
    attribute; a line without a name, or without an integer id, raises naming the file and line."""
    named: dict[int, tuple[str, int]] = {}  # id -> (name, line number)
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetLayoutError(f"{path}:{number}: expected '<{what}_id> <{what} name>' with an integer id, got "
                                     f"{line!r}.", CUB_LAYOUT)
        key = int(fields[0])
        if key in named:
            raise DatasetLayoutError(f"{path}:{number}: {what} id {key} is listed again (first on line "
                                     f"{named[key][1]}); each id once.", CUB_LAYOUT)
        named[key] = (fields[1].strip(), number)
    if not named:
        raise DatasetLayoutError(f"CUB file {str(path)!r} lists no {what} names; remove it or list them.", CUB_LAYOUT)
    expected = set(range(1, len(named) + 1))
    if set(named) != expected:
        raise DatasetLayoutError(f"{path}: its {len(named)} {what} ids must be 1..{len(named)}, without gaps; "
                                 f"{sorted(expected - set(named))[:5]} are missing and "
                                 f"{sorted(set(named) - expected)[:5]} listed instead.", CUB_LAYOUT)
    return [named[key][0] for key in range(1, len(named) + 1)]


def read_table(path: Path, columns: int, dtype: type = float, extra_fields: bool = False) -> np.ndarray:
    """Whitespace table with integer ids in column 0 and `dtype` (finite) numbers after; malformed lines raise with
    file and line number. `extra_fields`: lines may carry more fields than `columns`, which are ignored."""
    if not path.is_file():
        raise DatasetLayoutError(f"CUB file {str(path)!r} is missing.", CUB_LAYOUT)
    rows = []
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns and not (extra_fields and len(fields) > columns):
            raise DatasetLayoutError(f"{path}:{number}: expected {columns} fields, got {len(fields)}: {line!r}",
                                     CUB_LAYOUT)
        try:
            row = [int(fields[0]), *(dtype(f) for f in fields[1:columns])]
            valid = dtype is int or all(map(math.isfinite, row))
        except ValueError:
            valid = False
        if not valid:
            kind = "integers" if dtype is int else "an integer id, then finite numbers"
            raise DatasetLayoutError(f"{path}:{number}: expected {columns} fields of {kind}, got {line!r}",
                                     CUB_LAYOUT)
        rows.append(row)
    return np.asarray(rows, dtype=np.float64 if dtype is float else np.int64).reshape(-1, columns)


CAPTION_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3 of the captions' vocabulary, before its words
NOT_VISIBLE = 1  # the release's certainty codes: 1 not visible, 2 guessing, 3 probably, 4 definitely


def read_cub_attributes(root: Path, labels: np.ndarray, is_train: np.ndarray, image_ids: np.ndarray,
                        min_classes: int = 10) -> tuple[np.ndarray, list[str]]:
    """Concept Bottleneck Models' CUB concepts, by Koh et al.'s rule (their code: CUB/generate_new_data.py,
    `get_class_attributes_data`): each attribute is voted per class over the `is_train` images, counting its
    present and absent labels but not an "absent" marked not visible (certainty 1); the class has it when present
    counts are at least the absent ones (a tie, no counted label included, is present). Attributes present in at
    least `min_classes` classes are kept (112 of 312 on the full release) and each image gets its class's votes.
    Returns (N, A) in {0, 1} in images.txt order and the kept attributes' names.

    Lines are `<image_id> <attribute_id> <is_present 0|1> <certainty 1..4> [<time> ...]`, fields split on any
    whitespace; what follows the certainty (the time, and the extra fields of a few release lines, a known defect
    of the file) is not read."""
    path = root / "attributes" / "image_attribute_labels.txt"
    if not path.is_file():
        raise DatasetLayoutError(f"CUB file {str(path)!r} is missing (attributes=True).", CUB_LAYOUT)
    table = read_table(path, 4, int, extra_fields=True)  # image_id attribute_id is_present certainty
    if not len(table):
        raise DatasetLayoutError(f"CUB file {str(path)!r} lists no attribute labels (attributes=True).", CUB_LAYOUT)
    position = {int(image_id): i for i, image_id in enumerate(image_ids)}
    rows = np.array([position.get(int(i), -1) for i in table[:, 0]])
    table, rows = table[rows >= 0], rows[rows >= 0]  # images.txt decides which images there are (a subset keeps all)
    if (table[:, 1] < 1).any():
        raise DatasetLayoutError(f"{path} names attribute ids below 1.", CUB_LAYOUT)
    bad = ~np.isin(table[:, 2], (0, 1)) | ~np.isin(table[:, 3], (1, 2, 3, 4))
    if bad.any():
        raise DatasetLayoutError(f"{path}: <is_present> must be 0 or 1 and <certainty> 1..4 (1 not visible .. 4 "
                                 f"definitely); got '{' '.join(map(str, table[bad][0]))}'.", CUB_LAYOUT)
    num_classes, num_attributes = int(labels.max()) + 1, int(table[:, 1].max())
    counted = is_train[rows] & ((table[:, 2] == 1) | (table[:, 3] != NOT_VISIBLE))  # training labels, seen
    counts = np.zeros((num_classes, num_attributes, 2), dtype=np.int64)  # (C, A, absent / present)
    np.add.at(counts, (labels[rows[counted]], table[counted, 1] - 1, table[counted, 2]), 1)
    votes = counts[..., 1] >= counts[..., 0]  # (C, A): majority, ties present (Koh et al.)
    kept = np.flatnonzero(votes.sum(0) >= min_classes)
    if not len(kept):
        raise DatasetLayoutError(f"No CUB attribute is present in at least min_attribute_classes={min_classes} of the "
                                 f"{num_classes} classes (by the training split's votes), so no concept is kept; "
                                 "lower min_attribute_classes for a subset of the classes.", CUB_LAYOUT)
    names_file = next((f for f in (root / "attributes" / "attributes.txt", root / "attributes.txt",
                                   root.parent / "attributes.txt") if f.is_file()), None)
    names = read_names(names_file, "attribute") if names_file else [f"attribute {a + 1}" for a in range(num_attributes)]
    if len(names) < num_attributes:
        raise DatasetLayoutError(f"{names_file} names {len(names)} attributes but {path} uses attribute ids up to "
                                 f"{num_attributes}; use the attributes.txt of the same release (312 names).",
                                 CUB_LAYOUT)
    return votes[labels][:, kept].astype(np.float32), [names[a] for a in kept]


class CUBIndex:
    """The parsed index files: per image its path, label (0-based), split flag, box and landmarks."""

    NUM_PARTS = 15

    def __init__(self, root: Path) -> None:
        lines, first_line = [], {}  # first_line: image id -> its images.txt line number
        for number, line in enumerate(read_lines(root / "images.txt"), 1):
            fields = line.split(maxsplit=1)
            if fields and (len(fields) != 2 or not fields[0].isdigit()):
                raise DatasetLayoutError(f"{root / 'images.txt'}:{number}: expected '<image_id> <path>' with an "
                                         f"integer id, got {line!r}.", CUB_LAYOUT)
            if fields and int(fields[0]) in first_line:  # the other tables would be blamed for it otherwise
                raise DatasetLayoutError(f"{root / 'images.txt'}:{number}: image id {fields[0]} is listed again "
                                         f"(first on line {first_line[int(fields[0])]}); each image id once.",
                                         CUB_LAYOUT)
            if fields:
                lines.append(fields)
                first_line[int(fields[0])] = number
        if not lines:
            raise DatasetLayoutError(f"CUB file {str(root / 'images.txt')!r} lists no image.", CUB_LAYOUT)
        ids = np.array([int(f[0]) for f in lines], dtype=np.int64)
        self.image_ids = ids
        self.paths = [root / "images" / f[1].strip() for f in lines]
        position = {image_id: i for i, image_id in enumerate(ids)}
        missing = [path for path in self.paths if not path.is_file()]
        if missing:  # said now, not when a loader first reads one (a subset made by deleting class folders)
            raise DatasetLayoutError(f"{len(missing)} of the {len(self.paths)} images listed in "
                                     f"{root / 'images.txt'} are missing, e.g. {[str(m) for m in missing[:3]]}; to use "
                                     "a subset, list only its images in images.txt.", CUB_LAYOUT)

        def aligned(table: np.ndarray, name: str) -> np.ndarray:
            """The table's rows in images.txt order: images.txt decides which images there are, so a subset only
            trims images.txt; an image it lists that the table lacks is an error naming both."""
            table = table[np.isin(table[:, 0].astype(np.int64), ids)]
            lacking = np.setdiff1d(ids, table[:, 0].astype(np.int64))
            if len(lacking) or len(table) != len(ids):
                detail = f"lacks image ids {lacking[:5].tolist()}" if len(lacking) else "lists an image id twice"
                raise DatasetLayoutError(f"{root / name} {detail} (of those in {root / 'images.txt'}).", CUB_LAYOUT)
            order = np.array([position[int(i)] for i in table[:, 0]])
            out = np.empty_like(table[:, 1:])
            out[order] = table[:, 1:]
            return out

        self.labels = aligned(read_table(root / "image_class_labels.txt", 2, int), "image_class_labels.txt")[:, 0] - 1
        split = aligned(read_table(root / "train_test_split.txt", 2, int), "train_test_split.txt")[:, 0]  # (N,)
        if not np.isin(split, (0, 1)).all():  # a 2 would silently be a test image
            bad = ~np.isin(split, (0, 1))
            raise DatasetLayoutError(f"{root / 'train_test_split.txt'}: <is_training_image> must be 1 (train) or 0 "
                                     f"(test); image ids {ids[bad][:5].tolist()} have {split[bad][:5].tolist()}.",
                                     CUB_LAYOUT)
        self.is_train = split == 1
        self.boxes = aligned(read_table(root / "bounding_boxes.txt", 5), "bounding_boxes.txt")  # (N, 4) x y w h
        self.landmarks = self._read_parts(root / "parts" / "part_locs.txt", ids, position)  # (N, 15, 3)
        self.captions: torch.Tensor | None = None  # (N, R, L) sentence ids, filled when sentences are present
        self.attributes: np.ndarray | None = None  # (N, A) class-level concepts, filled with attributes=True
        classes_file = root / "classes.txt"  # names by their <class_id>, not by line order
        # without it, the 1-based <class_id> of image_class_labels.txt names label c (0-based): "1" is class id 1
        self.class_names = read_names(classes_file, "class") if classes_file.is_file() \
            else [str(c + 1) for c in range(int(self.labels.max()) + 1)]

    def _read_parts(self, path: Path, ids: np.ndarray, position: dict[int, int]) -> np.ndarray:
        """(N, 15, 3) x, y, visible per images.txt row and part. As the other index files, images.txt decides which
        images there are (rows of other images are dropped) and each of them needs its rows: the release has all
        15 parts of every image, <visible> 0 for a part not seen, so a missing (image, part) row is an error, not a
        part silently not visible; a repeated one is an error too (which row would count?), and <visible> is 0 or 1."""
        locs = read_table(path, 5)  # image_id part_id x y visible
        rows = np.array([position.get(int(i), -1) for i in locs[:, 0]], dtype=np.int64)
        locs, rows = locs[rows >= 0], rows[rows >= 0]  # the images images.txt lists
        parts = locs[:, 1].astype(np.int64) - 1
        if (parts < 0).any() or (parts >= self.NUM_PARTS).any():
            raise DatasetLayoutError(f"{path} names part ids outside 1..15.", CUB_LAYOUT)
        if not np.isin(locs[:, 4], (0, 1)).all():
            bad = locs[~np.isin(locs[:, 4], (0, 1))][0]
            raise DatasetLayoutError(f"{path}: <visible> must be 0 or 1; image id {int(bad[0])} part {int(bad[1])} has "
                                     f"{bad[4]:g}.", CUB_LAYOUT)
        seen = np.zeros((len(ids), self.NUM_PARTS), dtype=np.int64)  # (N, 15) rows per image and part
        np.add.at(seen, (rows, parts), 1)
        if (seen > 1).any():
            row, part = np.argwhere(seen > 1)[0]
            raise DatasetLayoutError(f"{path} lists (image id {int(ids[row])}, part {part + 1}) "
                                     f"{int(seen[row, part])} times; each (image, part) once.", CUB_LAYOUT)
        if (seen == 0).any():
            lacking = ids[(seen == 0).all(1)]
            partial = ids[(seen == 0).any(1) & (seen > 0).any(1)]
            detail = (f"lacks image ids {lacking[:5].tolist()}" if len(lacking) else
                      f"lacks some of the 15 parts of image ids {partial[:5].tolist()}")
            raise DatasetLayoutError(f"{path} {detail} (of those in {path.parent.parent / 'images.txt'}); the release "
                                     "has all 15 part rows of every image (<visible> 0 for a part not seen).",
                                     CUB_LAYOUT)
        landmarks = np.zeros((len(ids), self.NUM_PARTS, 3))
        landmarks[rows, parts] = locs[:, 2:]
        return landmarks


class CUBDataset(Dataset):
    """Images (optionally cropped to the bird box) resized to a square; box and landmarks in output pixels."""

    def __init__(self, index: CUBIndex, rows: np.ndarray, image_size: int, crop_to_box: bool) -> None:
        self.index, self.rows, self.image_size, self.crop_to_box = index, rows, image_size, crop_to_box
        self.transform = image_transform(image_size, augment=False)  # no flips: landmarks would need flipping too

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[i])
        image = read_rgb(self.index.paths[row])
        x, y, w, h = self.index.boxes[row]
        if self.crop_to_box:
            image = image.crop((int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))))
            origin, extent = np.array([int(x), int(y)]), np.array(image.size)
        else:
            origin, extent = np.zeros(2), np.array(image.size)
        to_out = self.image_size / extent  # (2,) x and y scale
        marks = self.index.landmarks[row]  # (15, 3): x, y, visible
        moved = (marks[:, :2] - origin) * to_out  # (15, 2) in output pixels
        # a part clicked outside the crop (a tail tip past the bird's box) is not in the image: not visible
        visible = (marks[:, 2] > 0) & ((moved >= 0) & (moved <= self.image_size)).all(1)
        xy = np.where(visible[:, None], moved, 0.0)
        box = np.concatenate([(np.array([x, y]) - origin) * to_out, (np.array([x + w, y + h]) - origin) * to_out])
        return {
            "image": self.transform(image),
            "label": torch.tensor(int(self.index.labels[row])),
            "object_box": torch.as_tensor(box, dtype=torch.float32).clamp(0, self.image_size),
            "landmarks": torch.as_tensor(xy, dtype=torch.float32),
            "landmark_visible": torch.as_tensor(visible),
            "index": torch.tensor(row),
            **({"captions": self.index.captions[row]} if self.index.captions is not None else {}),
            **({"attributes": torch.as_tensor(self.index.attributes[row])} if self.index.attributes is not None
               else {}),
        }


SENTENCES_LAYOUT = """\
<sentences_root>/                 (Reed et al. 2016, e.g. cvpr2016_cub/text_c10)
  <class folder>/<image name>.txt   one sentence per line (10 per image), same paths as images/ with .txt
"""
CAPTION_PAD, CAPTION_BOS, CAPTION_EOS, CAPTION_UNK = 0, 1, 2, 3


def read_sentences(text_root: Path, image_paths: list[Path], images_root: Path) -> list[list[list[str]]]:
    """Per image, its sentences as word lists, from the .txt beside the image's path under `text_root`.

    A line without a word ("...", emoji, blank) is no sentence: encoded it would be <bos> <eos>, a reference row that
    training takes as a target (the model learns to stop at once) while evaluation drops it as no reference. An
    image whose file holds no word at all has no sentences, as an empty file: all-padding caption rows."""
    from datamodules.text import tokenize

    out = []
    for path in image_paths:
        text_file = text_root / path.relative_to(images_root).with_suffix(".txt")
        if not text_file.is_file():
            raise DatasetLayoutError(f"CUB sentence file {str(text_file)!r} does not exist.", SENTENCES_LAYOUT)
        out.append([words for line in read_lines(text_file, SENTENCES_LAYOUT) if (words := tokenize(line))])
    return out


def encode_captions(sentences: list[list[list[str]]], vocabulary: dict[str, int], per_image: int,
                    max_len: int) -> torch.Tensor:
    """(N, per_image, max_len) ids: <bos> words <eos>, truncated; missing sentences are all padding."""
    captions = torch.zeros(len(sentences), per_image, max_len, dtype=torch.long)
    for i, image_sentences in enumerate(sentences):
        for r, words in enumerate(image_sentences[:per_image]):
            ids = [CAPTION_BOS, *[vocabulary.get(w, CAPTION_UNK) for w in words][: max_len - 2], CAPTION_EOS]
            captions[i, r, : len(ids)] = torch.tensor(ids)
    return captions


class CUB200DataModule(DictDataModule):
    """CUB-200-2011: official train/test split; validation is the test split unless `val_fraction` > 0.

    Args:
        root: the folder holding CUB_200_2011/ (or that folder itself).
        image_size: output side in pixels.
        crop_to_box: crop each image to its bird box first (common for part-based models).
        val_fraction: hold out this random fraction of the training images (drawn with `seed`) as validation.
        sentences_root: Reed et al.'s text_c10 folder; by default `text_c10` beside or inside the CUB folder is
            used when present (`describe_sentences` says which). Then batches hold `captions` (10 sentences per
            image, ids of `vocabulary`, built from the training split's sentences, without the `val_fraction` held
            out: <pad>, <bos>, <eos>, <unk>, then words by frequency). A textual model's `vocab_size` must be at
            least len(vocabulary) (`TextualSystem` checks it at fit start).
        mean / std: per-channel normalisation of the [0, 1] images (lists), "pretrained" (mean only: the model's
            backbone's timm pretrained mean and std, resolved by train.py), or None: none (`DictDataModule`).
        attributes: batches hold `attributes` (A,), the concept bottleneck paper's class-level attributes (see
            `read_cub_attributes`; voted over the training split, so without the `val_fraction` held out), named by
            `attribute_names`; min_attribute_classes: its filter (10 in the paper).

    `class_names` come from classes.txt by <class_id> ("001.Black_footed_Albatross", ...); without it they are the
    <class_id>s "1", "2", ... as image_class_labels.txt writes them (label 0 is named "1", the release's class 1)."""

    num_channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        crop_to_box: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
        sentences_root: str | None = None,
        sentences_per_image: int = 10,
        max_sentence_len: int = 32,
        max_vocab: int = 5000,
        mean: list[float] | str | None = None,
        std: list[float] | str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        attributes: bool = False,
        min_attribute_classes: int = 10,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        self.set_normalization(mean, std)
        check_image_size(image_size, type(self).__name__)
        check_max_vocab(max_vocab, CAPTION_SPECIALS, type(self).__name__)  # checked with or without sentences
        base = find_cub_root(root)
        missing = [f for f in REQUIRED if not (base / f).is_file()]
        if missing:
            raise DatasetLayoutError(f"CUB folder {str(base)!r} lacks {missing}.", CUB_LAYOUT)
        self.index = CUBIndex(base)
        self.class_names = self.index.class_names
        self.num_classes, self.image_size = len(self.class_names), image_size
        check_labels(torch.as_tensor(self.index.labels), self.num_classes, "CUB image_class_labels.txt")
        self.crop_to_box, self.val_fraction, self.seed = crop_to_box, val_fraction, seed
        empty_boxes = self.index.image_ids[(self.index.boxes[:, 2:] <= 0).any(1)]
        if crop_to_box and len(empty_boxes):  # the crop would be empty and its scale to the output size infinite
            raise DatasetLayoutError(f"{base / 'bounding_boxes.txt'}: image ids {empty_boxes[:10].tolist()} have a "
                                     "box of zero width or height; crop_to_box needs a positive <width> <height>.",
                                     CUB_LAYOUT)
        candidates = [Path(sentences_root)] if sentences_root else [base / "text_c10", base.parent / "text_c10"]
        if sentences_root and not Path(sentences_root).is_dir():
            raise DatasetLayoutError(f"CUB sentences folder {sentences_root!r} does not exist.", SENTENCES_LAYOUT)
        self.sentence_folders = candidates  # where sentences were looked for (`describe_sentences`)
        self.sentences_root = next((c for c in candidates if c.is_dir()), None)
        self.sentence_shape, self.max_vocab = (sentences_per_image, max_sentence_len), max_vocab
        self.vocabulary: list[str] = []
        if self.sentences_root is not None:
            self._load_captions(base / "images")
        self.attribute_names: list[str] = []
        if attributes:  # voted over the training split only: a held-out validation image's labels are not read
            in_train = np.zeros(len(self.index.image_ids), dtype=bool)
            in_train[self.split_rows()["train"]] = True
            self.index.attributes, self.attribute_names = read_cub_attributes(
                base, self.index.labels, in_train, self.index.image_ids, min_attribute_classes)

    def _load_captions(self, images_root: Path) -> None:
        """Read every image's sentences, build the vocabulary from the training ones, store `index.captions`."""
        from collections import Counter

        sentences = read_sentences(self.sentences_root, self.index.paths, images_root)
        # the training split's words only (less a held-out val_fraction, as the attributes' votes)
        counts = Counter(w for i in self.split_rows()["train"] for s in sentences[i] for w in s)
        words = counts.most_common(self.max_vocab - len(CAPTION_SPECIALS))
        self.vocabulary = [*CAPTION_SPECIALS, *[w for w, _ in words]]
        lookup = {w: i for i, w in enumerate(self.vocabulary)}
        self.index.captions = encode_captions(sentences, lookup, *self.sentence_shape)

    def describe_sentences(self) -> str:
        """Where the batches' `captions` come from, or where they were looked for (the error of a model that needs
        sentences quotes it)."""
        if self.sentences_root is not None:
            return f"sentences from {str(self.sentences_root)!r}"
        looked = [str(c) for c in self.sentence_folders]
        return f"no sentence folder (Reed et al.'s text_c10) found; looked for {looked} (sentences_root names another)"

    def decode(self, tokens: torch.Tensor) -> str:
        """The words of a sentence (L,) of `vocabulary` ids (a reference or a generated one), up to <eos>."""
        return " ".join(decode_tokens(tokens, self.vocabulary, end_token=CAPTION_EOS, skip=(CAPTION_PAD, CAPTION_BOS)))

    def sample_names(self, split: str) -> list[str]:
        """Each image's path under images/ by sample index (CUB samples are indexed by their images.txt row)."""
        return [path.parent.name + "/" + path.name for path in self.index.paths]

    def describe_split(self, split: str) -> str:
        marked = "the images train_test_split.txt marks is_training_image={}".format
        if split == "train":
            return marked(1) + (f", less the val_fraction={self.val_fraction} held out" if self.val_fraction else "")
        if split == "val" and self.val_fraction > 0:
            return f"val_fraction={self.val_fraction} of {marked(1)} (drawn with seed={self.seed})"
        return marked(0)

    def split_rows(self) -> dict[str, np.ndarray]:
        """The images.txt rows of each split (see `describe_split`); the same every call (seeded)."""
        train = np.flatnonzero(self.index.is_train)
        test = np.flatnonzero(~self.index.is_train)
        val = test
        if self.val_fraction > 0:
            rng = np.random.default_rng(self.seed)
            held = rng.random(len(train)) < self.val_fraction
            train, val = train[~held], train[held]
        return {"train": train, "val": val, "test": test}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, rows in self.split_rows().items():
            self.splits[split] = CUBDataset(self.index, rows, self.image_size, self.crop_to_box)
