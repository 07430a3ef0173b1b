"""Training loaders that Lightning resumes mid-epoch, so a run resumed from a checkpoint written inside an epoch
(`val_check_interval` < 1, `max_steps`) trains on the rest of that epoch's batches in the order the interrupted run
drew them, and ends bit-identical to a run that never died.

Lightning saves a loader's `state_dict()` in every checkpoint and calls `load_state_dict` on resume (a loader without
them restarts the epoch's iterator: the remaining batches are drawn anew, and Lightning warns). The state here is the
epoch's shuffle seed and how many of its samples were trained on; the shuffle draws exactly what torch's
`RandomSampler` draws, when it draws it, so runs that never resume see the same batches as before.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterator

import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, RandomSampler


class ResumableRandomSampler(RandomSampler):
    """torch's RandomSampler (its seed drawn from the global generator at the epoch's first index, as there) that
    remembers the epoch's seed and can start an epoch part-way (`resume(seed, start)`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed: int | None = None  # the current epoch's
        self._resume: tuple[int, int] | None = None

    def resume(self, seed: int, start: int) -> None:
        """The next epoch is the one drawn from `seed`, from its `start`-th sample on."""
        self._resume = (seed, start)

    def __iter__(self) -> Iterator[int]:  # a generator: the seed is drawn at the first index, as RandomSampler does
        if self.generator is not None:  # the caller's own generator: its stream, as RandomSampler (not resumable)
            self.seed = None
            yield from super().__iter__()
            return
        if self._resume is not None:
            (self.seed, start), self._resume = self._resume, None
        else:
            self.seed, start = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        seeded = copy.copy(self)
        seeded.generator = torch.Generator().manual_seed(self.seed)
        yield from itertools.islice(RandomSampler.__iter__(seeded), start, None)


class ResumableDataLoader(DataLoader):
    """A DataLoader with Lightning's resumable-loader interface: `state_dict()` holds the epoch's shuffle seed, how
    many of its samples the fit loop has trained on (`epoch_progress()`'s batches x batch size) and whether the epoch
    was over, and `load_state_dict` makes the next epoch continue from there. Its sampler must be a
    `ResumableRandomSampler`; under DDP (where Lightning puts a DistributedSampler in its place) a resume inside an
    epoch draws the rest anew, with a warning, as Lightning's own loaders do.

    Args:
        epoch_progress: (batches of the current epoch trained on so far, batches the epoch trains), given this
            loader's length in batches (for before Lightning has counted them).
        replays_a_trained_epoch: given this loader's length, whether the next iterator is one Lightning builds for
            an epoch already trained on (a resume from a checkpoint written at its last batch): drawn off-stream.
        Other arguments: DataLoader's.
    """

    def __init__(self, *args: Any, epoch_progress: Callable[..., tuple[int, int | float]] | None = None,
                 replays_a_trained_epoch: Callable[[int], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_progress, self.replays_a_trained_epoch = epoch_progress, replays_a_trained_epoch
        self._resuming = False

    def state_dict(self) -> dict[str, Any]:
        if self.epoch_progress is None or self.batch_size is None:
            return {}
        trained, total = self.epoch_progress()
        seed = self.sampler.seed if isinstance(self.sampler, ResumableRandomSampler) else None
        return {"seed": seed, "samples": trained * self.batch_size, "finished": trained >= total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state["finished"]:  # written at an epoch's end: the next epoch starts anew
            return
        if state["seed"] is None or not isinstance(self.sampler, ResumableRandomSampler):
            rank_zero_warn("The checkpoint was written inside an epoch by a loader that cannot resume it (a "
                           "distributed sampler, or the sampler's own generator): the epoch's remaining batches are "
                           "drawn anew, so the run will not end bit-identical to one that never stopped.")
            return
        self.sampler.resume(state["seed"], state["samples"])
        self._resuming = True
        if self.num_workers > 0:  # the shuffle resumes; what worker processes draw (random augmentation) does not
            rank_zero_warn("Resuming inside an epoch with num_workers > 0: the epoch's order goes on where it was, but "
                           "random augmentation drawn in the loader's worker processes after this point differs from "
                           "the run that never stopped (their random streams are not in a checkpoint); with "
                           "num_workers=0, or without random augmentation, the resumed run is bit-identical.")

    def __iter__(self) -> Any:
        if self._resuming:
            self._resuming = False
            with isolate_rng():  # the resumed epoch's iterator draws its worker seed off the run's stream
                return super().__iter__()
        if self.replays_a_trained_epoch is not None and self.replays_a_trained_epoch(len(self)):
            # an iterator for an epoch whose every batch was trained on: Lightning builds one (and reads nothing from
            # it) when it resumes from a checkpoint written at the epoch's last batch (validation there, before the
            # epoch ended). A run that never stopped builds none, so it must draw nothing from the run's stream (its
            # worker seed moved every later epoch's shuffle)
            with isolate_rng():
                return super().__iter__()
        return super().__iter__()
