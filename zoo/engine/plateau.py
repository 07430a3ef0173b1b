"""ReduceLROnPlateau across a resume: the epoch-end step a checkpoint was written before is taken when the run resumes.

Lightning steps a plateau scheduler after the epoch's validation and its `on_train_epoch_end` hooks, so every
checkpoint written at an epoch's end (ModelCheckpoint at validation end or at train epoch end, last.ckpt) holds the
scheduler before that epoch's step; and a resumed fit skips the step, since the monitored value is not in the
checkpoint (Lightning #14699). A run resumed from such a checkpoint trained on with one reduction (one bad epoch) too
few. The System writes the monitored values of the steps still owed into the checkpoint (`PLATEAU_KEY`) and takes
those steps when the fit resumes, through `lr_scheduler_step` as Lightning would.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

PLATEAU_KEY = "zoo_plateau_owed"  # checkpoint entry: {scheduler index: monitored value} of the steps still owed


def plateau_steps_owed(trainer: pl.Trainer, stepped: dict[int, int]) -> dict[int, float]:
    """{index in `trainer.lr_scheduler_configs`: monitored value} of the epoch-interval plateau schedulers Lightning
    will step at the end of this epoch and has not stepped yet (`stepped`: index -> the epoch it last stepped in);
    empty outside a fit or before the epoch's last training batch. Reads the monitored values (a host read, at
    checkpoint time only)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.state.fn != TrainerFn.FITTING or not loop._num_ready_batches_reached():
        return {}
    epoch, owed = trainer.current_epoch, {}
    for index, config in enumerate(trainer.lr_scheduler_configs):
        value = trainer.callback_metrics.get(config.monitor) if config.reduce_on_plateau else None
        # Lightning's rule (`_update_learning_rates`): epoch interval, every `frequency` epochs, the monitor logged
        if (value is not None and config.interval == "epoch" and (epoch + 1) % config.frequency == 0
                and stepped.get(index) != epoch):
            owed[index] = float(value)
    return owed


def take_owed_plateau_steps(module: pl.LightningModule, owed: dict[Any, float]) -> None:
    """Step each scheduler of `owed` (what `plateau_steps_owed` wrote into the checkpoint) with its monitored value,
    through the module's `lr_scheduler_step` and counted in the loop's scheduler progress, as Lightning steps it."""
    trainer = module.trainer
    progress = trainer.fit_loop.epoch_loop.scheduler_progress
    for index, value in owed.items():
        progress.increment_ready()
        module.lr_scheduler_step(trainer.lr_scheduler_configs[int(index)].scheduler, torch.tensor(value))
        progress.increment_completed()
