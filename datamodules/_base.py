"""What every datamodule shares: dict samples, loaders, input normalisation, class names, and the error for a dataset
folder that is not as expected."""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.resumable import ResumableDataLoader, ResumableRandomSampler


def whole_number(value: Any, minimum: int = 1) -> bool:
    """`value` is an integer >= `minimum` of any integer type (Python's, NumPy's: `operator.index`), not a bool, a
    float or None (zoo.checks.positive_int, which datamodules do not import)."""
    try:
        return not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        return False


def check_batch_size(batch_size: Any, owner: str) -> None:
    """Refuse a batch size that is not a whole number >= 1 (a bool, a float, None) when the datamodule is built: a
    null reached the loaders (DataLoader's batch_size=None yields unbatched samples) and the first step failed with
    a traceback about an image's shape. Any integer type is taken (`operator.index`: NumPy's too)."""
    if not whole_number(batch_size):
        raise ValueError(f"{owner}: batch_size must be a whole number >= 1; got {batch_size!r}.")


def check_image_size(image_size: Any, owner: str) -> None:
    """Refuse an image side that is not a whole number >= 1 when the datamodule is built: 0 or -8 was stored as
    given and failed in PIL's resize ("height and width must be > 0") inside the first epoch, after `train.py fit`
    had moved an earlier run to stale/."""
    if not whole_number(image_size):
        raise ValueError(f"{owner}: image_size must be a whole number of pixels >= 1; got {image_size!r}.")


def check_max_vocab(max_vocab: Any, specials: Sequence[str], owner: str) -> None:
    """Refuse a vocabulary size that leaves no room for a word beside the `specials` (padding, unknown, ...) when the
    datamodule is built: `max_vocab` <= len(specials) built a vocabulary of the specials alone, every word read as
    <unk>, and a model trained on constant inputs with no error."""
    minimum = len(specials) + 1
    if not whole_number(max_vocab, minimum):
        raise DataSettingError(f"{owner}: max_vocab must be a whole number >= {minimum} ({', '.join(specials)} and at "
                               f"least one word); got {max_vocab!r}. Give the vocabulary size to keep, e.g. 20000.")


def check_split_sizes(owner: str, *, num_train: Any, num_val: Any, num_test: Any, test_optional: bool) -> None:
    """Refuse split sizes of a generated (synthetic) datamodule that are not whole numbers >= 1 when it is built: 0
    or a negative size failed only at setup (an IndexError, or torch.arange's "upper bound and lower bound
    inconsistent"), inside a fit, after `train.py fit` moved an earlier run to stale/ and after earlier ablate points
    trained. `test_optional`: num_test may be 0 where the datamodule generates an empty test split fine (fit never
    reads it; test and predict then refuse the empty split, `DictDataModule.split_samples`)."""
    for split, value in (("train", num_train), ("val", num_val), ("test", num_test)):
        minimum = 0 if split == "test" and test_optional else 1
        if not whole_number(value, minimum):
            note = ("; 0: none, and test and predict have nothing to read" if minimum == 0 else
                    "; setup generates the test split too" if split == "test" else "")
            raise DataSettingError(f"{owner}: num_{split} (the samples generated for the {split!r} split{note}) must "
                                   f"be a whole number >= {minimum}; got {value!r}.")


class DatasetLayoutError(FileNotFoundError, ValueError):
    """A dataset folder that is missing or not in the expected on-disk layout; the message shows the layout. Without
    `expected_layout`: a file that is where the layout puts it but cannot be read (a truncated image, `read_rgb`).

    Also a ValueError (as io.UnsupportedOperation is both an OSError and a ValueError): a file that is there but
    malformed (a bad line, an array of the wrong shape) is bad input as much as a missing one, and callers that
    catch ValueError for bad content keep working."""

    def __init__(self, problem: str, expected_layout: str | None = None) -> None:
        # no layout: a file that is where the layout puts it but cannot be read (a truncated image); the one-argument
        # form is also how pickling and DataLoader workers build the error again from its message
        super().__init__(problem if expected_layout is None else f"{problem}\nExpected layout:\n"
                                                                 f"{expected_layout.rstrip()}")
        self.problem = problem  # what is wrong, without the layout (a caller that says it in its own words)


class DataSettingError(ValueError):
    """Data that does not fit the datamodule's settings, found when the data is read (at setup, inside a fit): labels
    outside `num_classes`, a split left empty, a held-out size larger than the data; or a split size no data could
    fill, refused when the datamodule is built (`check_split_sizes`). The command line says it in one line, as a
    configuration error, not with a traceback."""


class TensorDictDataset(Dataset):
    """Samples cut from a dict of equally long tensors; uint8 images are scaled to float [0, 1] on access."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All fields need the same length; got {lengths}.")
        self.tensors = tensors
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {k: v[index] for k, v in self.tensors.items()}
        if "image" in sample and sample["image"].dtype == torch.uint8:
            sample["image"] = sample["image"].float() / 255.0
        sample["index"] = torch.tensor(index)
        return sample


def decode_tokens(tokens: torch.Tensor | Sequence[int], vocabulary: Sequence[str] | None = None, *,
                  end_token: int | None = None, skip: Sequence[int | None] = (0,)) -> list[str]:
    """The words of one token row (L,): cut before `end_token`, ids in `skip` (padding, the start token) dropped,
    each id looked up in `vocabulary` ("<unk>" outside it) or, without a vocabulary, written as the id ("12": word
    n-grams and id n-grams match alike, which is how the sentence metrics score ids). The one decoder of token ids:
    the datamodules' `decode`, the textual metrics and the textual pictures all use it."""
    words = []
    for token in tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens:
        if token == end_token:
            break
        if token not in skip:
            words.append(str(token) if vocabulary is None else
                         vocabulary[token] if 0 <= token < len(vocabulary) else "<unk>")
    return words


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Labels must lie in [0, num_classes): caught here instead of as a device-side assert in the loss."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataSettingError(f"{source}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}).")


PREDICT_SPLIT = "test"  # what `predict` runs on
PRETRAINED = "pretrained"  # `mean: pretrained`: the mean/std the model's backbone was pretrained with
TORCHVISION = "torchvision:"  # backbone names of torchvision models (zoo.backbones)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pretrained_normalization(backbone: str, channels: int | None = None) -> tuple[list[float], list[float]]:
    """The per-channel mean and std a timm backbone was pretrained with (its `pretrained_cfg`), e.g. ImageNet's for
    "resnet18" (and for any "torchvision:<name>" backbone); read from timm's tables, nothing downloads. Images of
    another number of `channels` (grey) get one value each, timm's average over the channels."""
    from timm.models import get_pretrained_cfg

    if backbone.startswith(TORCHVISION):  # torchvision's ImageNet classification weights all use ImageNet's
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        cfg = get_pretrained_cfg(backbone)
        if cfg is None or cfg.mean is None or cfg.std is None:
            raise ValueError(f"Backbone {backbone!r} has no timm pretrained config with a mean and std; give the "
                             f"data's mean and std as lists instead of {PRETRAINED!r}.")
        mean, std = [float(m) for m in cfg.mean], [float(s) for s in cfg.std]
    if channels is not None and channels != len(mean):
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std


class NormalizedDataset(Dataset):
    """A dataset's samples with their float "image" (C, H, W) normalised per channel: (image - mean) / std."""

    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean = torch.as_tensor(mean, dtype=torch.float32).clone()[:, None, None]  # (C, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).clone()[:, None, None]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[index])
        sample["image"] = (sample["image"] - self.mean) / self.std
        return sample


class DictDataModule(pl.LightningDataModule):
    """Base for datamodules whose datasets yield dicts; subclasses fill `self.splits` in `setup`.

    Subclasses know `num_classes`, `num_channels`, `image_size` and `class_names` at construction, so the CLI can
    link them into the model before any data is loaded.

    Image datamodules take `mean` and `std` (per channel, images in [0, 1]; None: no normalisation) and pass them
    to `set_normalization`; the loaders then yield `(image - mean) / std` (`splits` keep the raw images, and
    `denormalize` undoes it for pictures). `mean: pretrained` takes both from the model's backbone's timm
    `pretrained_cfg`: `train.py` resolves it with `use_pretrained_normalization(<backbone name>)` (the backbone of
    the System's model), which Python code calls itself.
    """

    num_classes: int
    num_channels: int | None  # None for data that is not images (vectors, token ids)
    image_size: int | None

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        check_batch_size(batch_size, type(self).__name__)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.splits: dict[str, Dataset] = {}
        self.mean: list[float] | str | None = None
        self.std: list[float] | None = None

    @property
    def class_names(self) -> list[str]:
        """Name of every class id, in id order ("0", "1", ... where the data names none); linked into the System's
        `class_names` by the CLI, so checkpoints and predictions carry them."""
        return getattr(self, "_class_names", None) or [str(c) for c in range(self.num_classes)]

    @class_names.setter
    def class_names(self, names: Sequence[str]) -> None:
        self._class_names = [str(n) for n in names]

    # ------------------------------------------------------------------------------------------- normalisation
    def set_normalization(self, mean: Sequence[float] | str | None, std: Sequence[float] | str | None) -> None:
        """Normalise images by per-channel `mean` and `std` (one value or one per channel); `mean="pretrained"`
        (std None or "pretrained") waits for `use_pretrained_normalization`; None, None: no normalisation."""
        if mean == PRETRAINED or std == PRETRAINED:
            if mean != PRETRAINED or std not in (None, PRETRAINED):
                raise ValueError(f"mean: {PRETRAINED} takes the std from the backbone too; got mean={mean!r}, "
                                 f"std={std!r}.")
            self.mean, self.std = PRETRAINED, None
            return
        if isinstance(mean, str) or isinstance(std, str):  # `--data.init_args.mean imagenet`
            raise ValueError(f"mean and std are lists of per-channel values, or mean: {PRETRAINED} (the backbone's); "
                             f"got mean={mean!r}, std={std!r}.")
        if (mean is None) != (std is None):
            raise ValueError(f"Give both mean and std (or neither); got mean={mean!r}, std={std!r}.")
        if mean is not None:
            mean, std = [float(m) for m in mean], [float(s) for s in std]
            channels = getattr(self, "num_channels", None)
            if len(mean) != len(std) or len(mean) not in (1, channels) or min(std) <= 0:
                raise ValueError(f"mean and std need 1 or {channels} (the images' channels) values each, std > 0; "
                                 f"got mean={mean}, std={std}.")
        self.mean, self.std = mean, std

    def use_pretrained_normalization(self, backbone: str) -> None:
        """Resolve `mean: pretrained` with the timm `pretrained_cfg` of `backbone` (no-op for any other mean)."""
        if self.mean == PRETRAINED:
            self.set_normalization(*pretrained_normalization(backbone, getattr(self, "num_channels", None)))

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) as the loaders yield them back in [0, 1] pixel values (for pictures)."""
        if self.mean is None or self.mean == PRETRAINED:
            return images
        mean = images.new_tensor(self.mean)[:, None, None]
        std = images.new_tensor(self.std)[:, None, None]
        return images * std + mean

    @property
    def model_inputs(self) -> dict[str, Any]:
        """What the data fixes about a model's input beyond channels and size (e.g. num_features, vocab_size);
        linked into the System's `data_inputs` by the CLI."""
        return {}

    collate_fn: Any = None  # DataLoader's default; detection datamodules batch variable-size targets as lists

    def describe_split(self, split: str) -> str:
        """Where the samples of `split` come from (the files and settings that choose them); the error for an empty
        split quotes it, so subclasses that draw splits from files or fractions say how."""
        return "the datamodule's split settings"

    def split_samples(self, split: str) -> Dataset:
        """The samples of `split` as the loaders yield them (normalised when a mean and std are set). An empty split
        raises here, naming it and where its samples come from, before a sampler fails on it ("num_samples=0")."""
        if split not in self.splits:
            self.setup("fit" if split in ("train", "val") else split)
        if len(self.splits[split]) == 0:
            sizes = {name: len(data) for name, data in self.splits.items()}
            raise DataSettingError(f"{type(self).__name__}: the {split!r} split has no samples; it holds "
                             f"{self.describe_split(split)}. Split sizes: {sizes}.")
        if self.mean == PRETRAINED:
            raise ValueError(f"{type(self).__name__} has mean: {PRETRAINED}, not resolved yet: train.py resolves it "
                             f"from the model's backbone; in Python call use_pretrained_normalization(<backbone>).")
        return self.normalized(self.splits[split])

    def normalized(self, dataset: Dataset) -> Dataset:
        """`dataset` as the loaders yield it: normalised when a mean and std are set (`set_normalization`)."""
        return dataset if self.mean is None else NormalizedDataset(dataset, self.mean, self.std)

    def train_samples(self, augment: bool = True) -> Dataset:
        """The training samples as the loaders yield them; `augment=False`: without random augmentation, so a sample
        reads the same every time (what a model built from training images reads: ProtoPNet's push and its pictures
        of the pushed sources, as the paper's push loader reads the unaugmented training set). Datamodules that
        augment override this; without augmentation both are the training split."""
        return self.split_samples("train")

    def _loader(self, split: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        """Shuffled: a loader Lightning resumes mid-epoch (`datamodules.resumable`); else the evaluation order."""
        dataset = self.split_samples(split)
        # workers start anew with every iterator (not persistent): each iterator draws its worker seed from the
        # run's stream, the same number of draws whether the run was resumed or not (persistent workers drew once,
        # and a resumed run, which skips the sanity check's isolated draw, once more: every later shuffle moved)
        settings = dict(batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                        persistent_workers=False, collate_fn=self.collate_fn, drop_last=drop_last)
        if shuffle:  # no `shuffle=` given: Lightning reads shuffling from the RandomSampler (DDP: its own, shuffled)
            return self.resumable_loader(dataset, ResumableRandomSampler(dataset), **settings)
        return DataLoader(dataset, sampler=self._evaluation_sampler(dataset), **settings)

    def resumable_loader(self, dataset: Dataset, sampler: ResumableRandomSampler, **settings: Any) -> DataLoader:
        """A training loader of `sampler`'s shuffles that a run resumed from a checkpoint written inside an epoch
        continues where the interrupted run was (`ResumableDataLoader`)."""
        return ResumableDataLoader(dataset, sampler=sampler, epoch_progress=self._epoch_progress,
                                   replays_a_trained_epoch=self._replays_a_trained_epoch, **settings)

    def _replays_a_trained_epoch(self, length: int) -> bool:
        """Whether the fit is resuming "mid-epoch" an epoch whose every batch was trained on (a checkpoint written by
        validation at its last batch, before the epoch ended): Lightning then builds one iterator for that epoch
        and reads nothing from it. Not a run resumed at an epoch's end (its next iterator is the next epoch's)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return False
        loop, epochs = trainer.fit_loop, trainer.fit_loop.epoch_progress.total
        # Lightning's "restarted mid-epoch" (`_FitLoop.update_restart_stage`), which it decides only after building
        # this iterator: the epoch was started and not processed
        mid_epoch = (loop.restarting and epochs.started == epochs.ready and epochs.processed == epochs.started - 1
                     and epochs.completed == epochs.processed)
        trained, total = self._epoch_progress(length)
        return mid_epoch and 0 < total <= trained

    def _epoch_progress(self, length: int | None = None) -> tuple[int, int | float]:
        """(training batches of the current epoch trained on so far, batches the epoch trains: Lightning's count,
        after `limit_train_batches`); (0, 0) without a trainer. Before Lightning has counted them (a resumed fit's
        first iterator), the count of a loader of `length` batches under `limit_train_batches`, as Lightning counts."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        total, limit = trainer.num_training_batches, trainer.limit_train_batches
        if not math.isfinite(total) and length is not None and limit is not None:
            total = min(length, limit) if isinstance(limit, int) else int(length * limit)
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed, total

    def _evaluation_sampler(self, dataset: Any) -> Sampler | None:
        """Under distributed training, a sampler that gives each rank its own samples, none twice: Lightning's
        injected `DistributedSampler` pads the shards by repeating samples, so with N not a multiple of the world
        size the validation and test metrics (summed over ranks) counted some samples twice and differed from a
        one-process evaluation. Ranks may then run one batch fewer; nothing in an evaluation step is collective (the
        metrics reduce at the epoch's end). None with one process (a sequential loader, as before)."""
        replicas = self._sampler_replicas()
        if replicas == 1:
            return None
        if len(dataset) < replicas:  # a rank would get no sample: Lightning's padded sampler, and say so
            rank_zero_warn(f"The evaluation split holds {len(dataset)} samples for {replicas} processes: each rank "
                           "evaluates one (repeated) sample, so metrics count some samples twice.")
            return None
        from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

        rank = self.trainer.distributed_sampler_kwargs.get("rank", self.trainer.global_rank)
        return UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of `batch_size`; the last, partial batch is kept unless it would hold exactly
        one sample, which is dropped (that sample still comes up in other epochs' batches): BatchNorm in training
        mode cannot normalise a batch of one ("Expected more than 1 value per channel"), so a split of
        n * batch_size + 1 samples crashed the last step of every epoch. Any other remainder is kept, so other
        splits' batches are as before. Under distributed training Lightning injects a `DistributedSampler`
        (drop_last=False: every rank gets ceil(N / world size) samples, padded by repetition) and keeps this
        loader's drop_last, so the rule applies to that per-rank length. A split of at most `batch_size` samples
        (per rank) is never emptied."""
        samples = len(self.split_samples("train"))
        return self._loader("train", shuffle=True, drop_last=self.leaves_a_batch_of_one(samples))

    def leaves_a_batch_of_one(self, samples: int) -> bool:
        """Whether an epoch of `samples` training samples (split by the ranks, see `train_dataloader`) would end
        with a batch of one: the training loader then drops it."""
        per_rank = -(-samples // self._sampler_replicas())  # ceil(N / W)
        return per_rank > self.batch_size and per_rank % self.batch_size == 1

    def _sampler_replicas(self) -> int:
        """Into how many shards Lightning's injected `DistributedSampler` splits a loader of this datamodule: the
        attached trainer's `num_replicas` (its world size) where it injects one, else 1 (no trainer yet, one
        process, or `use_distributed_sampler=False`, where each rank iterates the loader as built)."""
        trainer = getattr(self, "trainer", None)
        kwargs = None if trainer is None else trainer.distributed_sampler_kwargs  # None: not a parallel strategy
        injects = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
        return int(kwargs.get("num_replicas", 1)) if kwargs and injects else 1

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(PREDICT_SPLIT, shuffle=False)

    def sample_names(self, split: str) -> list[str] | None:
        """A name for each sample of `split` by its "index" (e.g. the image's file), or None where samples have none;
        predictions.csv prints it."""
        return None


def detection_collate(samples: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """Detection batches: {"images": [(C, H, W)], "targets": [{"boxes": (n, 4) xyxy, "labels": (n,) in 1..C, ...}]}
    (torchvision's detection input; objects per image vary)."""
    return {"images": [image for image, _ in samples], "targets": [target for _, target in samples]}


class DetectionDataModule(DictDataModule):
    """Base for detection data: samples are (image, target) pairs, batched by `detection_collate`.

    `num_classes` counts object classes; labels run 1..num_classes (0 is torchvision's background)."""

    collate_fn = staticmethod(detection_collate)
    class_names: list[str]
