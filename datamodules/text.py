"""Text classification data as fixed-length token ids (0 = padding, 1 = unknown): the aclImdb release (Maas et al.
2011, the L2X paper's IMDB) read from its on-disk layout, labelled sentences from one CSV/TSV file (e.g. Rotten
Tomatoes, `benchmarks/data/get_rotten_tomatoes.sh`), and a small synthetic sentiment corpus whose label is carried
by known cue words (ground truth for which tokens matter)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import re
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from datamodules._base import (DatasetLayoutError, DataSettingError, DictDataModule, TensorDictDataset, check_max_vocab,
                               check_split_sizes, decode_tokens)

PAD, UNK = "<pad>", "<unk>"
IMDB_LAYOUT = """\
<root>/                      (the extracted aclImdb_v1.tar.gz)
  train/pos/<id>_<rating>.txt
  train/neg/<id>_<rating>.txt
  test/pos/<id>_<rating>.txt
  test/neg/<id>_<rating>.txt
"""
_WORD = re.compile(r"(?:[^\W_]|')+")  # letters and digits of any script, and apostrophes
# The typographic apostrophes written for ' (right single quotation mark, modifier letter apostrophe): "don’t" is
# the word "don't", not "don" + "t" (U+2019 is punctuation) nor a word of its own "donʼt" (U+02BC is a letter)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})


TOKENIZER = 2  # the version of `tokenize` checkpoints are written with (1: ’ and ʼ were no apostrophes)


def tokenize(text: str, version: int = TOKENIZER) -> list[str]:
    """Lower-cased words (runs of Unicode letters, digits and apostrophes; "café naïve" stays two words, composed
    as NFC first so a decomposed "i" + diaeresis is one letter; the typographic apostrophes ’ and ʼ read as ' from
    `version` 2 on); IMDB's `<br />` line breaks are dropped. On ASCII text the same words as the ASCII pattern
    `[a-z0-9']+` before it, so ASCII corpora encode as they did. A model keeps the words of the version it was
    trained with (`TokenDataModule`)."""
    text = unicodedata.normalize("NFC", text)
    return _WORD.findall((text.translate(_APOSTROPHES) if version >= 2 else text).lower().replace("<br />", " "))


def encode(texts: Sequence[list[str]], vocabulary: dict[str, int], max_len: int) -> torch.Tensor:
    """(N, max_len) ids: truncated or padded with 0; words outside the vocabulary map to 1."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for row, words in enumerate(texts):
        coded = [vocabulary.get(w, 1) for w in words[:max_len]]
        ids[row, : len(coded)] = torch.tensor(coded, dtype=torch.long)
    return ids


def vocabulary_lookup(vocabulary: Sequence[str]) -> dict[str, int]:
    """word -> id of a vocabulary (id -> word), for `encode`: padding, unknown and the "" fillers map to no word."""
    return {word: i for i, word in enumerate(vocabulary) if i >= 2 and word}


def encode_texts(texts: Sequence[str], vocabulary: Sequence[str], max_len: int,
                 tokenizer: int = TOKENIZER) -> torch.Tensor:
    """(N, max_len) token ids of raw texts, tokenised and encoded as the datamodules do, with a trained model's
    vocabulary and tokenizer version: a checkpoint keeps both under its datamodule's class name, e.g.
    ``state = torch.load(path)["IMDBDataModule"]; encode_texts(["A moving film."], state["vocabulary"], 400,
    state["tokenizer"])``."""
    return encode([tokenize(text, tokenizer) for text in texts], vocabulary_lookup(vocabulary), max_len)


def build_vocabulary(texts: Sequence[list[str]], max_vocab: int) -> list[str]:
    """id -> word: padding, unknown, the `max_vocab - 2` most frequent words of `texts`, then "" up to `max_vocab`
    (a fixed size, so models can be built before the data is read)."""
    frequent = [word for word, _ in Counter(word for words in texts for word in words).most_common(max_vocab - 2)]
    return [PAD, UNK, *frequent] + [""] * (max_vocab - 2 - len(frequent))


class TokenDataModule(DictDataModule):
    """Base for token datasets: `vocabulary` (id -> word), `decode`, and the model inputs vocab_size / max_len.

    A vocabulary built from the data it reads (`set_texts`) is part of every checkpoint: Lightning saves
    `state_dict()` ({"vocabulary": words, "tokenizer": version}) under the datamodule's class name and, for fit
    (resumed), validate, test and predict with a `ckpt_path`, calls `load_state_dict` after `setup` and before it
    builds any loader. The splits are then encoded with the checkpoint's words and tokenizer, whatever files, rows or
    seed gave the texts: a model's token ids keep the meanings it learnt (the data's own words would give the same
    ids other words, silently). A checkpoint without that state (written before it was saved) reads the data as it
    was read then (`load_missing_state`: tokenizer 1, the data's own vocabulary)."""

    num_classes = 2
    num_channels = None
    image_size = None
    class_names = ["negative", "positive"]
    vocabulary: list[str]

    def __init__(self, max_len: int, batch_size: int, num_workers: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.max_len = max_len
        self.loaded_vocabulary: list[str] | None = None  # a checkpoint's words (`load_state_dict`), used by setup
        self.tokenizer = TOKENIZER  # the `tokenize` version texts are read with (a checkpoint's: `load_state_dict`)
        self._words: list[str] = []  # every distinct word of the texts set up (their first max_len words)
        self._word_ids: dict[str, torch.Tensor] = {}  # split -> (N, max_len) int32 indices into _words, -1 = padding
        self._labels: dict[str, torch.Tensor] = {}  # split -> (N,) class ids

    def set_texts(self, texts: dict[str, Sequence[list[str]]], labels: dict[str, torch.Tensor],
                  max_vocab: int) -> None:
        """Fill `splits` from each split's texts (as words) and labels: encoded with the checkpoint's words where
        `load_state_dict` gave them, else with the `max_vocab` most frequent words of the "train" texts. The texts'
        first `max_len` words are kept (as indices into their distinct words), so `load_state_dict` re-encodes the
        splits without reading the data again."""
        position: dict[str, int] = {}
        for split, rows in texts.items():
            ids = torch.full((len(rows), self.max_len), -1, dtype=torch.int32)  # (N, max_len)
            for row, words in enumerate(rows):
                kept = [position.setdefault(word, len(position)) for word in words[: self.max_len]]
                ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
            self._word_ids[split] = ids
        self._words, self._labels = list(position), dict(labels)
        self.vocabulary = (list(self.loaded_vocabulary) if self.loaded_vocabulary is not None
                           else build_vocabulary(texts["train"], max_vocab))
        self._encode_splits()

    def _encode_splits(self) -> None:
        """`splits` as `encode` gives them with `vocabulary` (vectorised: one id per distinct word, then a gather)."""
        lookup = vocabulary_lookup(self.vocabulary)
        table = torch.tensor([lookup.get(word, 1) for word in self._words] + [0], dtype=torch.long)  # -1 -> 0 (pad)
        for split, ids in self._word_ids.items():
            self.splits[split] = TensorDictDataset({"tokens": table[ids.long()], "label": self._labels[split]})

    def state_dict(self) -> dict[str, Any]:
        """{"vocabulary": id -> word} once the data is set up (or a checkpoint's words were loaded); else empty (a
        datamodule whose words are fixed, or not read yet, saves nothing)."""
        if not self._word_ids and self.loaded_vocabulary is None:
            return {}
        return {"vocabulary": list(self.vocabulary), "tokenizer": self.tokenizer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a checkpoint's tokenizer version and vocabulary: the splits already set up are read again with
        another tokenizer, encoded again with the words, and a later `setup` uses both (the words instead of a
        vocabulary built from the training texts). A vocabulary of another size than this datamodule's (its
        `max_vocab`) is refused."""
        tokenizer = int(state_dict.get("tokenizer", TOKENIZER))
        if tokenizer not in (1, TOKENIZER):
            raise DataSettingError(f"{type(self).__name__}: the checkpoint's texts were read with tokenizer "
                                   f"{tokenizer}; this version reads 1 to {TOKENIZER}.")
        if tokenizer != self.tokenizer:
            self.tokenizer = tokenizer
            if self._word_ids:  # read with another tokenizer: read again
                self.splits, self._word_ids = {}, {}
                self.setup()
        words = state_dict.get("vocabulary")
        if words is None:
            return
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words) \
                or list(words[:2]) != [PAD, UNK]:
            raise DataSettingError(f"{type(self).__name__}: the checkpoint's vocabulary is not a list of words "
                                   f"starting with {PAD!r}, {UNK!r}.")
        if len(words) != len(self.vocabulary):
            raise DataSettingError(f"{type(self).__name__}: the checkpoint's vocabulary holds {len(words)} words; "
                                   f"this datamodule's holds {len(self.vocabulary)} (max_vocab). Give "
                                   f"max_vocab={len(words)}, the checkpoint's.")
        self.loaded_vocabulary = list(words)
        self.vocabulary = list(words)
        if self._word_ids:
            self._encode_splits()

    def load_missing_state(self) -> None:
        """A checkpoint written before the datamodule saved its state (`zoo.weights.restore_datamodule_state`): its
        texts were read with tokenizer 1 and its vocabulary built from the data, as it is then."""
        self.load_state_dict({"tokenizer": 1})

    @property
    def model_inputs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocabulary), "max_len": self.max_len}

    def decode(self, tokens: torch.Tensor) -> str:
        """The words of token ids (L,), padding dropped."""
        return " ".join(decode_tokens(tokens, self.vocabulary))

    def decode_selection(self, tokens: torch.Tensor, selection: torch.Tensor) -> str:
        """The text with selected words in **bold** (markdown, as TensorBoard's text tab renders it)."""
        words = [f"**{self.vocabulary[int(t)]}**" if s > 0.5 else self.vocabulary[int(t)]
                 for t, s in zip(tokens, selection) if int(t) != 0]
        return " ".join(words)


class IMDBDataModule(TokenDataModule):
    """aclImdb movie reviews, positive = 1. A validation split is drawn from the release's train folder with `seed`;
    the vocabulary is the `max_vocab - 2` most frequent words of the training split alone (fixed size, so models can
    be built before reading), or a restored checkpoint's (`TokenDataModule`). `sample_names(split)` names each review
    by its file under `root`.

    Args:
        root: the extracted aclImdb folder.
        max_len: tokens kept per review (400 in the L2X paper): a longer review keeps its first `max_len` words,
            where the authors' Keras `pad_sequences` (truncating="pre") keeps its last.
    """

    def __init__(self, root: str | Path, max_len: int = 400, max_vocab: int = 20000, val_fraction: float = 0.1,
                 seed: int = 0, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__(max_len, batch_size, num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        check_max_vocab(max_vocab, [PAD, UNK], type(self).__name__)
        # 0 or -0.5 held out one review, silently; 1 leaves no training review, which the empty split's error names
        if isinstance(val_fraction, bool) or not 0 < val_fraction <= 1:
            raise DataSettingError(f"IMDBDataModule: val_fraction must be in (0, 1] (the share of the release's train "
                                   f"reviews held out for validation, e.g. 0.1); got {val_fraction!r}.")
        self.root, self.max_vocab, self.val_fraction, self.seed = Path(root), max_vocab, val_fraction, seed
        self.vocabulary = [PAD, UNK] + [""] * (max_vocab - 2)  # filled from the training reviews in setup
        self.names: dict[str, list[str]] = {}  # split -> each review's file, filled in setup
        self._check_folders()  # here, not at setup: before a run starts anything (the L2X black box's training)

    def _check_folders(self) -> None:
        if not self.root.is_dir():
            raise DatasetLayoutError(f"IMDB root {str(self.root)!r} does not exist.", IMDB_LAYOUT)
        for split in ("train", "test"):
            for polarity in ("neg", "pos"):
                if not (self.root / split / polarity).is_dir():
                    raise DatasetLayoutError(f"IMDB folder {str(self.root / split / polarity)!r} does not exist.",
                                             IMDB_LAYOUT)

    def describe_split(self, split: str) -> str:
        if split == "test":
            return f"the reviews of {str(self.root / 'test')!r}"
        reviews = f"the reviews of {str(self.root / 'train')!r}"
        return f"{reviews} left after val_fraction={self.val_fraction}" if split == "train" else \
            f"val_fraction={self.val_fraction} of {reviews}"

    def _read(self, split: str) -> tuple[list[list[str]], torch.Tensor, list[str]]:
        """The split's reviews as words, their labels (N,), and each review's file under the root."""
        texts, labels, names = [], [], []
        for label, polarity in ((0, "neg"), (1, "pos")):
            folder = self.root / split / polarity
            files = sorted(folder.glob("*.txt"))
            if not files:
                raise DatasetLayoutError(f"IMDB folder {str(folder)!r} holds no .txt reviews.", IMDB_LAYOUT)
            for path in files:
                try:
                    texts.append(tokenize(path.read_text(encoding="utf-8"), self.tokenizer))
                except UnicodeDecodeError as err:
                    raise DatasetLayoutError(f"IMDB review {str(path)!r} is not UTF-8 text ({err}).", IMDB_LAYOUT)
                labels.append(label)
                names.append(path.relative_to(self.root).as_posix())
        return texts, torch.tensor(labels), names

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self._check_folders()
        released_texts, released_labels, released_names = self._read("train")
        test_texts, test_labels, test_names = self._read("test")
        order = torch.randperm(len(released_texts), generator=torch.Generator().manual_seed(self.seed))
        num_val = max(1, int(round(self.val_fraction * len(released_texts))))
        parts = {"train": order[num_val:].tolist(), "val": order[:num_val].tolist()}
        texts = {split: [released_texts[i] for i in ids] for split, ids in parts.items()} | {"test": test_texts}
        labels = {split: released_labels[ids] for split, ids in parts.items()} | {"test": test_labels}
        self.names = {split: [released_names[i] for i in ids] for split, ids in parts.items()} | {"test": test_names}
        # The vocabulary of the training split alone (or a checkpoint's): a word seen only in validation is <unk>, as
        # it would be for a model trained here and shown new text (its embedding row would otherwise never train).
        self.set_texts(texts, labels, self.max_vocab)

    def sample_names(self, split: str) -> list[str]:
        """Each review's file under `root` (e.g. "test/pos/0_9.txt"), by sample index in `split`."""
        self.setup()
        return self.names[split]


TABLE_LAYOUT = """\
<path>                        one table, a header row naming the columns, one labelled text per row
  <name>.csv  or  <name>.tsv  (comma- or tab-separated, quoted as Python's csv module reads it: a text holding the
                              delimiter or a line break, or opening with ", is quoted whole, "" for each " inside)
  optionally compressed: <name>.csv.gz, <name>.csv.bz2, <name>.tsv.gz, <name>.tsv.bz2
"""
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open}
_SHOWN = 5  # bad lines listed in an error


def _table_delimiter(path: Path) -> str:
    """The delimiter of CSV/TSV file `path` ("," or a tab), from its name (.csv / .tsv, optionally .gz / .bz2),
    without reading it; a DatasetLayoutError names a missing file or an unknown format (`CSVTextDataModule` checks
    its path with it at construction, `_parse_table` before reading)."""
    if not path.is_file():
        raise DatasetLayoutError(f"Text table {str(path)!r} does not exist.", TABLE_LAYOUT)
    compression = path.suffix if path.suffix in _OPENERS else ""
    kind = Path(path.name.removesuffix(compression)).suffix
    if kind not in (".csv", ".tsv"):
        raise DatasetLayoutError(f"{str(path)!r} is neither .csv nor .tsv (optionally .gz / .bz2).", TABLE_LAYOUT)
    return "\t" if kind == ".tsv" else ","


def _parse_table(path: Path) -> tuple[list[str], list[list[str]], list[int], str]:
    """The header, each record's fields (blank lines skipped, as csv.DictReader does), the line each record starts on
    (the header is line 1; a quoted field may run over several) and the delimiter of a CSV/TSV file, compressed or
    not. A DatasetLayoutError names a missing file, an unknown format (`_table_delimiter`) or a file that cannot be
    read."""
    delimiter = _table_delimiter(path)
    records, first_lines = [], []
    try:
        with _open_table(path) as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, [])
            read = reader.line_num  # lines read so far
            for fields in reader:
                if fields:
                    records.append(fields)
                    first_lines.append(read + 1)
                read = reader.line_num
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetLayoutError(f"Could not read {str(path)!r} ({type(err).__name__}: {err}).", TABLE_LAYOUT) from err
    return header, records, first_lines, delimiter


def _as_row(header: Sequence[str], fields: Sequence[str]) -> dict[str | None, Any]:
    """One record as csv.DictReader gives it: fields past the header as a list under None, missing ones None."""
    row: dict[str | None, Any] = dict(zip(header, fields))
    if len(fields) > len(header):
        row[None] = list(fields[len(header):])
    for name in header[len(fields):]:
        row[name] = None
    return row


def _check_columns(path: Path, header: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DatasetLayoutError(f"{str(path)!r} has no column {missing}; its columns are {list(header)}.",
                                 TABLE_LAYOUT)


def read_table(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV/TSV file (compressed or not) as csv.DictReader gives them; a DatasetLayoutError names a
    missing file, an unknown format or the columns the file has when one of `columns` is missing. The rows are not
    checked (`read_text_table` checks those of a text table)."""
    header, records, _, _ = _parse_table(path)
    _check_columns(path, header, columns)
    return [_as_row(header, fields) for fields in records]


def _shown(lines: Sequence[int]) -> str:
    return ", ".join(str(line) for line in lines[:_SHOWN]) + (", ..." if len(lines) > _SHOWN else "")


def _rows_inside(fields: Sequence[str], header: Sequence[str], text_column: str, label_column: str,
                 known: set[str], delimiter: str) -> list[tuple[int, int, str]]:
    """The lines inside a record's fields that read as rows of their own (as many fields as the header, a text, a
    label the file uses), each as (the line its field opens on, that line, both counted from the record's first line;
    its text). Only a quoted field holds a line break, so the record's lines are its fields' lines."""
    found, offset = [], 0  # offset: line breaks of the record before this field
    for value in fields:
        parts = value.split("\n")
        for k, part in enumerate(parts[1:], 1):
            fields_alone = next(csv.reader([part.rstrip("\r")], delimiter=delimiter), [])
            alone = _as_row(header, fields_alone)  # (padded to the header: count the line's own fields)
            if (len(fields_alone) == len(header) and alone[label_column] in known
                    and (alone[text_column] or "").strip()):
                found.append((offset, offset + k, part.rstrip("\r")))
        offset += len(parts) - 1
    return found


def _open_table(path: Path) -> Any:
    """A CSV/TSV file (compressed or not) opened for csv: text, newline="" (csv splits the lines), utf-8-sig (the
    byte-order mark Excel writes before the header would otherwise stick to the first column name)."""
    compression = path.suffix if path.suffix in _OPENERS else ""
    return _OPENERS.get(compression, open)(path, "rt", encoding="utf-8-sig", newline="")


def _file_lines(path: Path) -> list[str]:
    """A CSV/TSV file's lines as written (compressed or not), line ends kept, split where csv counts a line: at \n,
    \r and \r\n only (str.splitlines also splits at \x85, \u2028, \x0c, ..., which texts hold, and cut records
    apart from csv's line numbers)."""
    with _open_table(path) as handle:
        return list(handle)


def _quoted_as_csv_writes(record: str, delimiter: str) -> bool:
    """Whether a record's text parses under csv's strict quoting: a quoted field closes before a delimiter or a line
    end. A stray opening quote closes where the next " happens to be, mid-text ('Wonderful" acting.'), which strict
    parsing refuses; csv.writer's own quoting passes."""
    try:
        list(csv.reader(io.StringIO(record), delimiter=delimiter, strict=True))
    except csv.Error:
        return False
    return True


def read_text_table(path: Path, text_column: str, label_column: str, labels: Sequence[str] = ()
                    ) -> tuple[list[dict[str, str]], list[int]]:
    """The rows of a labelled text table (`read_table`) and the line each starts on (the header is line 1), refusing
    with a DatasetLayoutError naming the file and lines what would otherwise be read as other texts, silently:

    - a quoted field running over lines that read as rows of their own (a stray opening " in a text swallows the
      rows after it up to the next ", their labels lost): continuation lines with as many fields as the header, a
      text and a label of the file's (or of `labels`), refused naming the line the field opens on where the record
      is not quoted as csv quotes (a stray quote closes at the next ", mid-text: 'Wonderful" acting.', '"Boring"
      said') or lacks a field or a known label (a quote closing at a line's end: 'my 55 inch TV"'), else (a
      text's own "1,500 miles for this?", "Story,4") warned of and read as written: csv.writer's files load, however
      many such lines a text holds. A quoted text holding line breaks and no such line is read
      as it is (csv's quoting, .tsv as .csv: the layout promises it);
    - a record with more fields than the header (an unquoted delimiter in a text: "fresh,Dull, slow." kept the text
      "Dull" and dropped the rest; in a text before the label, the label was a piece of the text); empty fields past
      the header (a trailing delimiter) are taken.

    A record with fewer fields has None for the missing ones, as csv.DictReader gives: a row without a label is
    `every_label`'s to name, or dropped as other labels are; a kept row without a text is refused at setup.
    """
    header, records, first_lines, delimiter = _parse_table(path)
    _check_columns(path, header, [text_column, label_column])
    rows = [_as_row(header, fields) for fields in records]
    shown_delimiter = "a tab" if delimiter == "\t" else "a comma"

    known = {row[label_column] for row in rows if row[label_column]} | set(labels)  # "": a row without a label
    swallowing, lone = [], []  # (line the quoted field opens on, the first line inside it that reads as a row, it,
    # how many lines inside it read as rows)
    lines: list[str] | None = None  # the file's lines, read again only where a record looks like swallowed rows
    for index, (fields, first_line) in enumerate(zip(records, first_lines)):
        found = _rows_inside(fields, header, text_column, label_column, known, delimiter)
        if not found:
            continue
        # such lines may be a text's own ("1,500 miles", "Story,4"): quoted as csv quotes, it is
        lines = lines if lines is not None else _file_lines(path)
        end = first_lines[index + 1] - 1 if index + 1 < len(first_lines) else len(lines)
        strict = _quoted_as_csv_writes("".join(lines[first_line - 1:end]), delimiter)
        # csv.writer writes every field, the label too: a swallowing quote may not
        complete = len(fields) >= len(header) and rows[index][label_column] in known
        (lone if strict and complete else swallowing).append(
            (first_line + found[0][0], first_line + found[0][1], found[0][2], len(found)))
    if lone:
        opens, inner, text, count = lone[0]
        more = f" (and {count - 1} more such line(s))" if count > 1 else ""
        warnings.warn(f"{str(path)!r}: {len(lone)} quoted text(s) hold a line that reads as a row of its own, "
                      f"opening on lines {_shown([s[0] for s in lone])} (the header is line 1): the text opening on "
                      f"line {opens} holds line {inner}, {text!r}{more}. Read as written (one text); if a stray \" "
                      f"opened it, the rows after it up to the next \" are part of that text.", stacklevel=2)
    if swallowing:
        opens, inner, text, _ = swallowing[0]
        raise DatasetLayoutError(
            f"{str(path)!r}: {len(swallowing)} quoted field(s) run on over lines that read as rows of their own, "
            f"opening on lines {_shown([s[0] for s in swallowing])} (the header is line 1): the field opening on line "
            f"{opens} holds line {inner}, {text!r}. A stray \" opening a text makes the rows after it, up to the next "
            f'", part of that text. Quote such a text whole with "" for each " inside ("""Wonderful"", he said."), '
            'or remove the stray ".', TABLE_LAYOUT)

    overlong = [i for i, row in enumerate(rows) if any(row.get(None) or [])]  # empty fields past the header pass
    if overlong:
        first = overlong[0]
        raise DatasetLayoutError(
            f"{str(path)!r}: {len(overlong)} line(s) hold more fields than the header's {len(header)} {header}: "
            f"lines {_shown([first_lines[i] for i in overlong])} (the header is line 1); line {first_lines[first]} "
            f"reads as {records[first]}. A text holding {shown_delimiter} must be quoted whole (\"...\", with \"\" "
            "for each \" inside), as Python's csv module writes it.", TABLE_LAYOUT)
    return rows, first_lines


def every_label(rows: Sequence[dict[str, str | None]], path: Path, column: str) -> set[str]:
    """The distinct values of `column` in `rows` (the classes of `labels: null`). A row without one (a short row,
    which csv gives None, or an empty field) raises a DatasetLayoutError naming the file, the first such rows (as
    `sample_names` counts them: from 0, after the header) and the column: an empty label is almost always a data
    error, not a class."""
    unlabelled = [i for i, row in enumerate(rows) if not row[column]]
    if unlabelled:
        shown = ", ".join(str(i) for i in unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        raise DatasetLayoutError(f"{str(path)!r}: {len(unlabelled)} row(s) have no label in column {column!r}: rows "
                                 f"{shown} (counted from 0 after the header). Fill or remove them, or list the labels "
                                 "to keep (`labels`: rows with other labels are dropped).", TABLE_LAYOUT)
    return {row[column] for row in rows}


class CSVTextDataModule(TokenDataModule):
    """Labelled texts from one CSV/TSV table (e.g. Rotten Tomatoes review sentences, fresh / rotten), as token ids
    for L2X and text classifiers. The file has no split: train / val / test are drawn with `seed`; the vocabulary is
    the `max_vocab - 2` most frequent words of the training split only, or a restored checkpoint's (`TokenDataModule`).

    Args:
        path: .csv or .tsv, optionally .gz / .bz2 compressed (`TABLE_LAYOUT`).
        text_column / label_column: the columns holding the text and the label.
        labels: label values to keep, in class-id order (rows with other labels are dropped, e.g. Rotten Tomatoes'
            "plot"); None: every value in the file, sorted.
        max_len: tokens kept per text (longer texts are cut, shorter ones padded).
    """

    def __init__(self, path: str | Path, text_column: str = "text", label_column: str = "label",
                 labels: Sequence[str] | None = None, max_len: int = 50, max_vocab: int = 20000,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, batch_size: int = 64,
                 num_workers: int = 0) -> None:
        super().__init__(max_len, batch_size, num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        check_max_vocab(max_vocab, [PAD, UNK], type(self).__name__)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum < 1; got "
                             f"{val_fraction}, {test_fraction}.")
        self.path, self.text_column, self.label_column = Path(path), text_column, label_column
        # whatever `labels` is, a mistyped path fails here, not at setup after a fit moved the earlier run to stale/
        _table_delimiter(self.path)
        if labels is None:  # the classes must be known before setup (the CLI links num_classes into the model)
            rows, _ = read_text_table(self.path, text_column, label_column)
            labels = sorted(every_label(rows, self.path, label_column))
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be at least two distinct values; got {list(labels)}.")
        self.class_names, self.num_classes = [str(label) for label in labels], len(labels)
        self.max_vocab, self.val_fraction, self.test_fraction, self.seed = max_vocab, val_fraction, test_fraction, seed
        self.vocabulary = [PAD, UNK] + [""] * (max_vocab - 2)  # filled from the training texts in setup
        self.names: dict[str, list[str]] = {}  # split -> each text's row in the file, filled in setup

    def describe_split(self, split: str) -> str:
        fractions = f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction}"
        return (f"the rows of {str(self.path)!r} with a listed label left after {fractions} (one row each at least)"
                if split == "train" else f"{split}_fraction of the rows of {str(self.path)!r} ({fractions})")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rows, first_lines = read_text_table(self.path, self.text_column, self.label_column, self.class_names)
        class_of = {name: i for i, name in enumerate(self.class_names)}
        kept_rows = [i for i, row in enumerate(rows) if row[self.label_column] in class_of]  # rows of the file
        kept = [rows[i] for i in kept_rows]
        empty = [first_lines[i] for i in kept_rows if not (rows[i][self.text_column] or "").strip()]
        if empty:  # each would train as a sample of padding alone, keeping its label
            raise DatasetLayoutError(
                f"{str(self.path)!r}: {len(empty)} line(s) with a kept label have no text in column "
                f"{self.text_column!r} (an empty field, or fewer fields than the header): lines {_shown(empty)} (the "
                "header is line 1). Fill in or remove them.", TABLE_LAYOUT)
        absent = sorted(set(self.class_names) - {row[self.label_column] for row in kept})
        if absent:
            seen = sorted({row[self.label_column] for row in rows})
            raise ValueError(f"{str(self.path)!r}: no row has label {absent} in column {self.label_column!r}; its "
                             f"labels are {seen[:20]}.")
        texts = [tokenize(row[self.text_column], self.tokenizer) for row in kept]
        labels = torch.tensor([class_of[row[self.label_column]] for row in kept])
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.seed))
        num_val, num_test = (max(1, int(round(f * len(texts)))) for f in (self.val_fraction, self.test_fraction))
        parts = {"val": order[:num_val], "test": order[num_val : num_val + num_test],
                 "train": order[num_val + num_test :]}
        self.names = {split: [f"row {kept_rows[i]}" for i in ids.tolist()] for split, ids in parts.items()}
        # the vocabulary of the training split alone (or a checkpoint's)
        self.set_texts({split: [texts[i] for i in ids.tolist()] for split, ids in parts.items()},
                       {split: labels[ids] for split, ids in parts.items()}, self.max_vocab)

    def sample_names(self, split: str) -> list[str]:
        """Each text's row in the file ("row 12": the 13th row after the header, 0-based, counting the rows of
        every label, dropped ones too), by sample index in `split`."""
        self.setup()
        return self.names[split]


POSITIVE_CUES = ["good", "great", "excellent", "wonderful", "superb", "brilliant", "moving", "delightful"]
NEGATIVE_CUES = ["bad", "awful", "boring", "terrible", "poor", "dull", "weak", "tedious"]
FILLER = ("the a an this that film movie story plot actor actress scene scenes script director camera music score "
          "ending start middle character characters cast role roles dialogue screen picture show series sequel it "
          "was is were be been has had have with and but or of in on at to for from by about as than then very "
          "quite rather really just also some many most more less every each one two three first last long short "
          "old new young time year day night city house family friend friends world life people man woman child "
          "watch watched saw see seen think thought felt feel made make makes shot shots lines end").split()


def synthetic_sentiment(num_samples: int, max_len: int = 32, cues_per_text: tuple[int, int] = (1, 3),
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Texts of neutral filler words with 1-3 cue words of the label's polarity at random positions.

    Returns tokens (N, max_len), label (N,), relevant (N, max_len) bool (the cue positions); ids index
    `SYNTHETIC_VOCABULARY`. Texts are 60-100% of max_len long.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.6 * max_len), max_len + 1, (num_samples,), generator=generator)
    label = torch.randint(0, 2, (num_samples,), generator=generator)
    first_filler = 2 + len(POSITIVE_CUES) + len(NEGATIVE_CUES)
    tokens = torch.randint(first_filler, first_filler + len(FILLER), (num_samples, max_len), generator=generator)
    positions = torch.arange(max_len)
    tokens = tokens.masked_fill(positions >= lengths[:, None], 0)  # (N, L) padded after each text's length
    # Cue positions: the first n of a random permutation of each text's own positions.
    num_cues = torch.randint(cues_per_text[0], cues_per_text[1] + 1, (num_samples,), generator=generator)
    keys = torch.rand(num_samples, max_len, generator=generator).masked_fill(positions >= lengths[:, None], 2.0)
    rank = keys.argsort(1).argsort(1)  # (N, L) rank of each position among the text's positions
    relevant = rank < num_cues[:, None]
    cue_base = torch.where(label == 1, 2, 2 + len(POSITIVE_CUES))  # (N,) first id of the label's cue words
    cues = cue_base[:, None] + torch.randint(0, len(POSITIVE_CUES), (num_samples, max_len), generator=generator)
    tokens = torch.where(relevant, cues, tokens)
    return {"tokens": tokens, "label": label, "relevant": relevant}


SYNTHETIC_VOCABULARY = [PAD, UNK, *POSITIVE_CUES, *NEGATIVE_CUES, *FILLER]


class SyntheticSentimentDataModule(TokenDataModule):
    """The synthetic sentiment corpus (`synthetic_sentiment`): CPU-sized text with known relevant tokens."""

    def __init__(self, num_train: int = 4000, num_val: int = 1000, num_test: int = 1000, max_len: int = 32,
                 seed: int = 0, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__(max_len, batch_size, num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        # an empty test split generates fine (fit never reads it): num_test may be 0
        check_split_sizes(type(self).__name__, num_train=num_train, num_val=num_val, num_test=num_test,
                          test_optional=True)
        self.sizes, self.seed = {"train": num_train, "val": num_val, "test": num_test}, seed
        self.vocabulary = SYNTHETIC_VOCABULARY

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for offset, (split, size) in enumerate(self.sizes.items()):
            self.splits[split] = TensorDictDataset(synthetic_sentiment(size, self.max_len, seed=self.seed + offset))
