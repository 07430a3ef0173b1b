"""rule_series: 1-D signals of beat-like local patterns whose class is decided by long-range rules over them, with
per-step pattern annotations and the ground-truth rule events; and a loader for users' own series (.npz / .csv).

A series has a regular rhythm (beat-to-beat interval P ~ U(20, 28) steps, 3 % jitter) of normal beats (narrow
upward spike) and, depending on the class, premature beats (wide, inverted, early: 0.5-0.55 P after the previous
beat). Classes:
    0 normal               only normal beats
    1 compensated          1-3 premature beats on every other beat, each followed by a compensatory pause
                           (next beat 1.45 P later)
    2 interpolated         1-2 premature beats squeezed between two normal beats (next beat 0.5 P later)
    3 bigeminy             a run of 4-5 premature beats on every other beat, each with its pause
So "premature" alone does not tell classes 1-3 apart: the timing after it, and how many there are, do; locally a
bigeminy run and a short run look the same. Any class may drop a beat (a gap of two intervals) away from the
premature ones. Signals carry amplitude jitter, white noise and a slow baseline wander. Batch fields: `series` (1, T),
`label`, `patterns` (2, T): 1 at each normal / premature beat's peak step (rows named by `pattern_names`),
`rule_events` (3, T): the steps where the three reference rules of `zoo.renn.RULE_SERIES_RULES` are true
(premature-then-pause, interpolated premature, frequent premature; the last one is a property of the whole series,
true at every step of a bigeminy series; rows named by `rule_event_names`). Models match their channels to these
rows by name, never by position.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules._base import (DatasetLayoutError, DataSettingError, DictDataModule, TensorDictDataset, check_labels,
                               check_split_sizes)
from datamodules.resumable import ResumableRandomSampler

CLASS_NAMES = ["normal", "compensated", "interpolated", "bigeminy"]
PATTERN_NAMES = ["normal_beat", "premature_beat"]  # the rows of `patterns`, in order
RULE_EVENT_NAMES = ["premature_then_pause", "premature_interpolated", "frequent_premature"]  # rows of `rule_events`
MAX_BEATS = 16


def _beat_schedule(label: torch.Tensor, period: torch.Tensor, drop_rate: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beat times, premature flags and dropped-beat flags (each (N, MAX_BEATS)) for each series' class."""
    n = len(label)
    interval = period[:, None] * (1 + 0.03 * torch.randn(n, MAX_BEATS, generator=generator))  # (N, M) RR before
    premature = torch.zeros(n, MAX_BEATS, dtype=torch.bool)
    beat = torch.arange(MAX_BEATS)
    # interpolated premature beats (class 2): one at index a in [2, 5], a second one at a + 3 for half of them
    first = torch.randint(2, 6, (n,), generator=generator)
    second = torch.where(torch.rand(n, generator=generator) < 0.5, first + 3, torch.full_like(first, -1))
    isolated = (beat == first[:, None]) | (beat == second[:, None])
    # runs of premature beats on every other beat (classes 1 and 3): 1-3 of them, or 4-5 (bigeminy)
    count = torch.where(label == 3, torch.randint(4, 6, (n,), generator=generator),
                        torch.randint(1, 4, (n,), generator=generator))
    start = torch.randint(1, 3, (n,), generator=generator)
    alternate = (beat >= start[:, None]) & ((beat - start[:, None]) % 2 == 0) & (beat < (start + 2 * count)[:, None])
    premature = torch.where((label == 2)[:, None], isolated, premature)
    premature = torch.where((label == 1)[:, None] | (label == 3)[:, None], alternate, premature)
    early = period[:, None] * torch.where((label == 2)[:, None], 0.5, 0.55)  # (N, 1) RR before a premature beat
    after = period[:, None] * torch.where((label == 2)[:, None], 0.5, 1.45)  # RR after it: interpolated / pause
    interval = torch.where(premature, early, interval)
    follows = torch.cat([torch.zeros(n, 1, dtype=torch.bool), premature[:, :-1]], 1)  # beat after a premature one
    interval = torch.where(follows, after, interval)
    offset = 5 + 10 * torch.rand(n, 1, generator=generator)
    times = offset + interval.cumsum(1) - interval[:, :1]  # (N, M) first beat at the offset
    # dropped beats (a gap of two intervals) in any class, never next to a premature beat
    precedes = torch.cat([premature[:, 1:], torch.zeros(n, 1, dtype=torch.bool)], 1)
    dropped = (torch.rand(n, MAX_BEATS, generator=generator) < drop_rate) & ~(premature | follows | precedes)
    dropped[:, 0] = False
    return times, premature, dropped


def generate(num_samples: int, length: int = 256, noise: float = 0.15, wander: float = 0.5, drop_rate: float = 0.1,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """Balanced classes; see the module docstring. Vectorised over series and beats."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.arange(num_samples) % len(CLASS_NAMES)
    label = label[torch.randperm(num_samples, generator=generator)]
    period = 20 + 8 * torch.rand(num_samples, generator=generator)
    times, premature, dropped = _beat_schedule(label, period, drop_rate, generator)
    inside = (times < length - 4) & ~dropped  # beats drawn: those that fit in the window and were not dropped
    steps = torch.arange(length, dtype=torch.float32)
    distance = steps[None, None, :] - times[:, :, None]  # (N, M, T)
    amplitude = 1 + 0.2 * (torch.rand(times.shape, generator=generator) - 0.5)  # (N, M)
    normal_shape = torch.exp(-0.5 * (distance / 1.5) ** 2) - 0.25 * torch.exp(-0.5 * ((distance - 4) / 2) ** 2)
    premature_shape = (0.8 * torch.exp(-0.5 * (distance / 2.6) ** 2)
                       - 0.3 * torch.exp(-0.5 * ((distance - 6) / 2.5) ** 2))
    shape = torch.where(premature[:, :, None], premature_shape, normal_shape) * (amplitude * inside)[:, :, None]
    signal = shape.sum(1)  # (N, T)
    cycle = 80 + 120 * torch.rand(num_samples, 1, generator=generator)
    phase = 2 * torch.pi * torch.rand(num_samples, 1, generator=generator)
    signal = signal + wander * torch.sin(2 * torch.pi * steps / cycle + phase)
    signal = signal + noise * torch.randn(signal.shape, generator=generator)
    # annotations: the peak step of every beat that fits
    peak = times.round().long().clamp(0, length - 1)
    patterns = torch.zeros(num_samples, len(PATTERN_NAMES), length)
    patterns.scatter_(2, torch.stack([peak, peak], 1),
                      torch.stack([inside & ~premature, inside & premature], 1).float())
    # rule events at premature peaks: followed by a pause (classes 1, 3) or interpolated (class 2)
    premature_peaks = patterns[:, 1]
    paused = premature_peaks * ((label == 1) | (label == 3)).float()[:, None]
    interpolated = premature_peaks * (label == 2).float()[:, None]
    frequent = (label == 3).float()[:, None].expand(-1, length)
    return {"series": signal[:, None], "label": label, "patterns": patterns,
            "rule_events": torch.stack([paused, interpolated, frequent], 1)}


@lru_cache(maxsize=8)
def cached_generate(num_samples: int, length: int, noise: float, wander: float, drop_rate: float, seed: int
                    ) -> dict[str, torch.Tensor]:
    return generate(num_samples, length, noise, wander, drop_rate, seed)


class SeriesDataModule(DictDataModule):
    """Base for 1-D series: `train_fraction` keeps a seeded subset of the training split while every epoch still
    draws `len(full train split)` samples (with replacement), so runs on 5 % or 100 % of the data get the same
    number of optimiser steps: a data-efficiency curve measures data, not budget. The subset is drawn with
    `subset_seed`, or, where it is None, with `seed + 99` (one subset per data seed, whatever `seed_everything`)."""

    num_channels = None
    image_size = None
    series_length: int
    train_fraction: float = 1.0
    seed: int = 0
    subset_seed: int | None = None  # the seed of the train_fraction subset; None: `seed + 99`
    pattern_names: Sequence[str] = ()  # public: the name of each row of the batches' `patterns` (none: no annotations)
    rule_event_names: Sequence[str] = ()  # public: the rule each row of the batches' `rule_events` is the truth of

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.split_rows: dict[str, torch.Tensor] = {}  # per split, the file row of each sample (files only)

    @property
    def model_inputs(self) -> dict[str, Any]:
        return {"in_chans": self.series_channels, "length": self.series_length}

    @staticmethod
    def _check_subset_seed(subset_seed: int | None) -> int | None:
        """`subset_seed` if it is None or an int >= 0 (torch seeds); else a ValueError naming the value."""
        if subset_seed is not None and (isinstance(subset_seed, bool) or not isinstance(subset_seed, int)
                                        or subset_seed < 0):
            raise ValueError(f"subset_seed must be an int >= 0 (the seed of the train_fraction subset) or None (drawn "
                             f"with seed + 99); got {subset_seed!r}.")
        return subset_seed

    def _subset_train(self) -> None:
        """Keep `train_fraction` of the training split (at least one sample per class), drawn with `subset_seed`, or
        `seed + 99` where it is None (the subsets recorded before subset_seed existed)."""
        full = self.splits["train"]
        self.epoch_samples = len(full)
        if self.train_fraction < 1.0:
            keep = max(len(CLASS_NAMES), int(round(self.train_fraction * len(full))))
            seed = self.seed + 99 if self.subset_seed is None else self.subset_seed
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:keep]  # (keep,)
            self.splits["train"] = TensorDictDataset({k: v[order] for k, v in full.tensors.items()})
            if "train" in self.split_rows:
                self.split_rows["train"] = self.split_rows["train"][order]

    def train_dataloader(self) -> DataLoader:
        dataset = self.split_samples("train")  # sets up, and names an empty split
        sampler = ResumableRandomSampler(dataset, replacement=len(dataset) < self.epoch_samples,
                                         num_samples=self.epoch_samples)
        return self.resumable_loader(dataset, sampler, batch_size=self.batch_size, num_workers=self.num_workers,
                                     drop_last=self.leaves_a_batch_of_one(self.epoch_samples))  # as every one


class RuleSeriesDataModule(SeriesDataModule):
    """The synthetic rule_series world (module docstring). Splits use seeds `seed`, `seed + 1`, `seed + 2`.

    Args:
        train_fraction: share of the training split kept (data-efficiency experiments); epochs keep their length.
        subset_seed: the seed of the subset `train_fraction` keeps; None (default): `seed + 99`, so every run on the
            same data keeps the same subset and a spread over `seed_everything` is one of initialisation and batch
            order only. Give it per seed (`benchmarks.renn_data_efficiency --subset-per-seed`) for a spread over
            subsets too. Unused at train_fraction 1.
    """

    num_classes = len(CLASS_NAMES)
    series_channels = 1
    class_names = CLASS_NAMES
    pattern_names = PATTERN_NAMES  # public: models match their pattern channels to the rows of `patterns` by name
    rule_event_names = RULE_EVENT_NAMES  # public: the rule each row of `rule_events` is the ground truth of

    def __init__(self, num_train: int = 2000, num_val: int = 500, num_test: int = 500, length: int = 256,
                 noise: float = 0.15, wander: float = 0.5, drop_rate: float = 0.1, train_fraction: float = 1.0,
                 seed: int = 0, batch_size: int = 64, num_workers: int = 0, subset_seed: int | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1]; got {train_fraction}.")
        self.subset_seed = self._check_subset_seed(subset_seed)
        if length < 128:
            raise ValueError(f"length must be >= 128 steps (several beats and a pause); got {length}.")
        # an empty test split generates fine (fit never reads it): num_test may be 0
        check_split_sizes(type(self).__name__, num_train=num_train, num_val=num_val, num_test=num_test,
                          test_optional=True)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.series_length, self.noise, self.wander, self.drop_rate = length, noise, wander, drop_rate
        self.train_fraction, self.seed = train_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for offset, (split, size) in enumerate(self.sizes.items()):
            data = cached_generate(size, self.series_length, self.noise, self.wander, self.drop_rate,
                                   self.seed + offset)
            self.splits[split] = TensorDictDataset(dict(data))
        self._subset_train()


SERIES_LAYOUT = """\
<path>.npz with arrays
  series:        (N, T) or (N, C, T) float  the signals, finite (no NaN padding: one length for every series)
  label:         (N,) int in [0, num_classes)
  patterns:      (N, K, T) in [0, 1]         optional per-step pattern annotations (ReNN's local loss)
  pattern_names: (K,) str                    optional: the pattern of each row of `patterns` (or the datamodule's
                                             pattern_names argument; else pattern_0, pattern_1, ...); models match
                                             their patterns to these names
or <path>.csv: one series per row, the label first, then T >= 1 values (no header, no empty or NaN cells);
  ',' delimited, '#' starts a comment, blank lines are skipped (errors name the file's own line numbers)
labels are class ids from 0 (a UCR file's 1..C: subtract 1)
"""


class SeriesFileDataModule(SeriesDataModule):
    """Users' own series from a .npz or .csv file (`SERIES_LAYOUT`); a seeded split into train/val/test.

    Args:
        pattern_names: the pattern of each row of the file's `patterns` (else the .npz's `pattern_names` array, else
            "pattern_0", "pattern_1", ...): ReNN matches its `pattern_names` to these by name.
        subset_seed: the seed of the subset `train_fraction` keeps of the training rows; None (default): `seed + 99`
            (`seed` also draws the split). Unused at train_fraction 1.

    `sample_names(split)` names each sample by its file row ("row 12", 0-based; a CSV's "row 12 (line 15)": the
    file's own line, counting the comment and blank lines the rows skip), for predictions.csv.

    Raises ValueError for fractions out of range: val_fraction and test_fraction in (0, 1) with a sum < 1 (as
    CSVTextDataModule), train_fraction in (0, 1] (as RuleSeriesDataModule).
    """

    def __init__(self, path: str | Path, num_classes: int, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 train_fraction: float = 1.0, seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                 pattern_names: list[str] | None = None, subset_seed: int | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        # a negative or zero fraction became one row silently (setup keeps one row per split at least)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum < 1 (the rest trains); "
                             f"got {val_fraction}, {test_fraction}.")
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1] (the share of the training rows kept); got "
                             f"{train_fraction}.")
        self.path, self.num_classes = Path(path), num_classes
        self.csv_lines: list[int] | None = None  # a CSV's file line (1-based) of each row; None for a .npz
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_fraction, self.seed = train_fraction, seed
        self.subset_seed = self._check_subset_seed(subset_seed)
        self.given_pattern_names = None if pattern_names is None else [str(n) for n in pattern_names]
        fields = self._read()
        self.series_channels, self.series_length = fields["series"].shape[1:]
        self.fields = fields

    def _read(self) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            raise DatasetLayoutError(f"Series file {str(self.path)!r} does not exist.", SERIES_LAYOUT)
        try:
            if self.path.suffix == ".npz":
                with np.load(self.path, allow_pickle=False) as archive:
                    arrays = {k: archive[k] for k in archive.files}
                file_names = arrays.pop("pattern_names", None)
            elif self.path.suffix == ".csv":
                table = self._read_csv()
                arrays, file_names = {"label": table[:, 0], "series": table[:, 1:]}, None
            else:
                raise ValueError(f"unsupported suffix {self.path.suffix!r}")
        except DatasetLayoutError:  # said already, naming the line
            raise
        # a truncated or non-zip .npz is a BadZipFile or an EOFError, a corrupt compressed one (savez_compressed) a
        # zlib.error, an unreadable file an OSError: they escaped with the reader's words alone ("File is not a zip
        # file"), naming no file
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DatasetLayoutError(f"Could not read series from {str(self.path)!r} ({err}).", SERIES_LAYOUT) from err
        missing = {"series", "label"} - set(arrays)
        if missing:
            raise DatasetLayoutError(f"{str(self.path)!r} lacks {sorted(missing)}.", SERIES_LAYOUT)
        series = self._array(arrays, "series", (2, 3), "(N, T) or (N, C, T) numbers")
        series = series[:, None] if series.ndim == 2 else series
        if 0 in series.shape:  # else a raw "cannot reshape tensor of 0 elements" in setup, or a model of length 0
            problem = ("holds no series (N=0)" if len(series) == 0 else
                       "has rows with a label but no values (T=0)" if self.csv_lines is not None else
                       f"has series {tuple(series.shape)} (N, C, T) with no values")
            raise DatasetLayoutError(f"{str(self.path)!r} {problem}; expected at least one series of T >= 1 values.",
                                     SERIES_LAYOUT)
        self._check_finite(series, "series", " UCR-style files pad shorter series with NaN: pad (e.g. repeat the "
                                             "last value) or truncate every series to one length first.")
        label = self._array(arrays, "label", (1,), f"(N,) int in [0, {self.num_classes})", along="N")
        self._check_finite(label, "label", "")
        if label.is_floating_point():
            self._refuse_rows(label != label.round(), "label", "", "hold non-integer values (labels must be integers)")
        self._check_labels(label.long())
        fields = {"series": series.float(), "label": label.long()}
        if "patterns" in arrays:
            patterns = self._array(arrays, "patterns", (3,), "(N, K, T) in [0, 1]", along="NT").float()
            self._check_finite(patterns, "patterns", "")
            if patterns.numel() and (patterns.min() < 0 or patterns.max() > 1):
                raise DatasetLayoutError(f"{str(self.path)!r}: array 'patterns' spans [{patterns.min():g}, "
                                         f"{patterns.max():g}]; expected (N, K, T) in [0, 1].", SERIES_LAYOUT)
            fields["patterns"] = patterns
        self.pattern_names = self._pattern_names(file_names, fields.get("patterns"))
        return fields

    def _read_csv(self) -> np.ndarray:
        """The table (N, 1 + T) of a .csv: ',' delimited, '#' starting a comment, lines blank after that skipped (as
        np.loadtxt reads them), keeping each row's line in the file (`csv_lines`): np.loadtxt's own numbers count
        neither skipped lines nor, in its conversion errors, from 1, so errors and `sample_names` would name the
        wrong line of a file with a comment header."""
        where = repr(str(self.path))
        try:
            text = self.path.read_text(encoding="utf-8-sig")  # universal newlines: one "\n" per line; a BOM dropped
        except UnicodeDecodeError as err:
            raise DatasetLayoutError(f"{where} is not UTF-8 text ({err}).", SERIES_LAYOUT) from err
        rows, lines = [], []
        for number, line in enumerate(text.split("\n"), 1):
            data = line.split("#", 1)[0]
            if data.strip():
                rows.append(data)
                lines.append(number)
        if not rows:
            raise DatasetLayoutError(f"{where} holds no series: no data lines (blank lines and '#' comments are "
                                     f"skipped).", SERIES_LAYOUT)
        fields = [row.count(",") + 1 for row in rows]
        ragged = [(n, f) for n, f in zip(lines, fields) if f != fields[0]]
        if ragged:
            shown = ", ".join(f"line {n}: {f}" for n, f in ragged[:5]) + (" ..." if len(ragged) > 5 else "")
            raise DatasetLayoutError(f"{where}: line {lines[0]} holds {fields[0]} fields (the label and "
                                     f"{fields[0] - 1} values) but {len(ragged)} other row(s) do not ({shown} "
                                     f"fields). Every series needs one length: pad or truncate them first.",
                                     SERIES_LAYOUT)
        try:
            table = np.loadtxt(rows, delimiter=",", ndmin=2, comments=None)
        except ValueError as err:  # "could not convert string 'a' to float64 at row 1, column 2.": rows from 0
            found = re.search(r"at row (\d+), column (\d+)", str(err))
            if found is None or int(found[1]) >= len(lines):
                raise
            raise DatasetLayoutError(f"Could not read series from {where}: line {lines[int(found[1])]}, field "
                                     f"{found[2]} is no number ({str(err)[: found.start()].strip()}).",
                                     SERIES_LAYOUT) from err
        self.csv_lines = lines
        return table

    def _check_labels(self, label: torch.Tensor) -> None:
        """`check_labels`, with a hint where the labels span [1, C]: a UCR-style file numbers its classes from 1."""
        try:
            check_labels(label, self.num_classes, str(self.path))
        except DataSettingError as err:
            if label.min() == 1 and label.max() == self.num_classes:
                raise DataSettingError(f"{err} They look 1-based (UCR files number classes from 1): subtract 1 from "
                                       f"every label (0-based class ids, 0..{self.num_classes - 1}).") from err
            raise

    def _pattern_names(self, file_names: np.ndarray | None, patterns: torch.Tensor | None) -> list[str]:
        """The name of each row of `patterns`: the `pattern_names` argument, the file's array, or pattern_<k>."""
        names = self.given_pattern_names
        if names is None and file_names is not None:
            if file_names.dtype.kind not in "US" or file_names.ndim != 1:
                raise DatasetLayoutError(f"{str(self.path)!r}: array 'pattern_names' is {file_names.shape} "
                                         f"{file_names.dtype}; expected (K,) strings.", SERIES_LAYOUT)
            names = [str(n) for n in file_names.tolist()]
        if patterns is None:
            if names:
                raise DatasetLayoutError(f"{str(self.path)!r} names patterns {names} but has no 'patterns' array.",
                                         SERIES_LAYOUT)
            return []
        if names is None:
            return [f"pattern_{k}" for k in range(patterns.shape[1])]
        if len(names) != patterns.shape[1] or len(set(names)) != len(names):
            raise DatasetLayoutError(f"{str(self.path)!r}: 'patterns' has {patterns.shape[1]} rows but the pattern "
                                     f"names are {names}; give one distinct name per row.", SERIES_LAYOUT)
        return names

    def _check_finite(self, values: torch.Tensor, name: str, hint: str) -> None:
        """Refuse NaN / inf in array `name` (N, ...) at load, naming the file rows (a NaN found in training would name
        a shuffled batch, not the row)."""
        if values.is_floating_point():
            self._refuse_rows(~torch.isfinite(values), name, hint, "hold NaN or inf values")

    def _refuse_rows(self, bad_values: torch.Tensor, name: str, hint: str, what: str) -> None:
        """Refuse array `name` where `bad_values` (N, ...) marks a value, naming the file rows (0-based) and, for a
        CSV, their lines in the file (1-based, comment and blank lines counted), the first ten of each."""
        bad = bad_values.reshape(len(bad_values), -1).any(1).nonzero().flatten().tolist()  # (R,) the bad rows
        if bad:
            lines = f"; CSV lines {[self.csv_lines[r] for r in bad[:10]]}" if self.csv_lines is not None else ""
            raise DatasetLayoutError(f"{str(self.path)!r}: {name} of {len(bad)} row(s) {what}: rows "
                                     f"{bad[:10]}{' ...' if len(bad) > 10 else ''} (0-based{lines}).{hint}",
                                     SERIES_LAYOUT)

    def _array(self, arrays: dict[str, np.ndarray], name: str, ndims: tuple[int, ...], expected: str,
               along: str = "") -> torch.Tensor:
        """Array `name` as a tensor, checked against `SERIES_LAYOUT`: numbers (bool, int or float) with one of
        `ndims` dimensions and, per letter of `along`, as many rows (N) or steps (T) as the series; the error names
        the array, its shape and dtype, and what the layout expects."""
        array, series = arrays[name], arrays["series"].shape
        if array.dtype.kind not in "biuf" or array.ndim not in ndims:
            raise DatasetLayoutError(f"{str(self.path)!r}: array {name!r} is {array.shape} {array.dtype}; expected "
                                     f"{expected}.", SERIES_LAYOUT)
        if ("N" in along and len(array) != series[0]) or ("T" in along and array.shape[-1] != series[-1]):
            raise DatasetLayoutError(f"{str(self.path)!r}: series {series} and {name} {array.shape} do not match; "
                                     f"expected {name} {expected} with the series' N{' and T' * ('T' in along)}.",
                                     SERIES_LAYOUT)
        return torch.as_tensor(array)

    def describe_split(self, split: str) -> str:
        return (f"the rows of {str(self.path)!r} ({len(self.fields['label'])}) left after val_fraction="
                f"{self.val_fraction} and test_fraction={self.test_fraction} (one row each at least)"
                if split == "train" else f"{split}_fraction of the rows of {str(self.path)!r}")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        order = torch.randperm(len(self.fields["label"]), generator=torch.Generator().manual_seed(self.seed))
        num_val = max(1, int(round(self.val_fraction * len(order))))
        num_test = max(1, int(round(self.test_fraction * len(order))))
        parts = {"val": order[:num_val], "test": order[num_val:num_val + num_test], "train": order[num_val + num_test:]}
        for split, ids in parts.items():
            self.splits[split] = TensorDictDataset({k: v[ids] for k, v in self.fields.items()})
            self.split_rows[split] = ids
        self._subset_train()

    def sample_names(self, split: str) -> list[str]:
        """Each sample's file row ("row 12", 0-based; a CSV's "row 12 (line 15)", its line in the file, comment and
        blank lines counted), by its "index" in `split`."""
        if split not in self.split_rows:
            self.setup()
        rows = self.split_rows[split].tolist()
        if self.csv_lines is None:
            return [f"row {r}" for r in rows]
        return [f"row {r} (line {self.csv_lines[r]})" for r in rows]
