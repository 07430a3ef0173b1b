"""ReduceLROnPlateau across a resume: the epoch-end steps Lightning skips after a resume are taken.

Lightning steps an epoch-interval plateau scheduler in the fit loop's `on_advance_end`, after the epoch's validation
and its `on_train_epoch_end` hooks, and never while the loop is restarting (the monitored value is not in the
checkpoint, Lightning #14699), which covers the whole first epoch of a resumed fit. Two steps were lost:

- the step of the epoch a checkpoint was written at the end of (ModelCheckpoint at validation end, last.ckpt): the
  checkpoint holds the scheduler before it. The System writes the step's epoch and monitored value into the
  checkpoint (`PLATEAU_KEY`) and takes it when a fit resumes from it (`ZooSystem.on_train_start`);
- the step at the end of the epoch a fit resumed inside: the System takes it at that epoch's end
  (`ZooSystem.on_train_epoch_end`, its validation's value in hand).

A resumed run then trains at the rates of the run that never stopped (without them: one reduction, one bad epoch, too
few, and every later tensor different).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

PLATEAU_KEY = "zoo_plateau_owed"  # checkpoint entry: {scheduler index: [epoch, monitored value]} of the steps owed


def due_plateau_steps(trainer: pl.Trainer, taken: dict[int, int], at_epoch_end: bool = False
                      ) -> dict[int, list[float]]:
    """{index in `trainer.lr_scheduler_configs`: [epoch, monitored value]} of the plateau steps due at the end of the
    current epoch and not taken yet by the System (`taken`: index -> the epoch of its last step taken here); Lightning
    takes them itself after the epoch's `on_train_epoch_end` hooks, unless the loop is restarting. Due, as Lightning's
    `_update_learning_rates` has it: an epoch-interval ReduceLROnPlateau, every `frequency` epochs, its monitor
    logged. Empty outside a fit, before the epoch's last training batch and, for a checkpoint, once the epoch is
    completed (its steps are behind it then: a last.ckpt written when fit ends, `trainer.save_checkpoint` after it).
    `at_epoch_end` (`on_train_epoch_end`, before Lightning's step): the epoch's progress is not read, since the
    epoch after a checkpoint written at an epoch's last batch runs with its progress counted as completed. Reads the
    monitored values on the host (at checkpoints and epoch ends only). A checkpoint written at an epoch's last
    training batch, before its validation, owes the step with the value logged before (Lightning's resume does not
    run that validation again)."""
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    if (trainer.state.fn != TrainerFn.FITTING or not loop.epoch_loop._num_ready_batches_reached()
            or (not at_epoch_end and progress.completed >= progress.started)):
        return {}
    epoch, due = trainer.current_epoch, {}
    for index, config in enumerate(trainer.lr_scheduler_configs):
        value = trainer.callback_metrics.get(config.monitor) if config.reduce_on_plateau else None
        if (value is not None and config.interval == "epoch" and (epoch + 1) % config.frequency == 0
                and taken.get(index) != epoch):
            due[index] = [epoch, float(value)]
    return due


def take_plateau_steps(module: pl.LightningModule, steps: dict[Any, Any], taken: dict[int, int]) -> None:
    """Step each scheduler of `steps` ({index: [epoch, monitored value]}, `due_plateau_steps` or a checkpoint's
    `PLATEAU_KEY`) with its value, through the module's `lr_scheduler_step` and counted in the loop's scheduler
    progress, as Lightning steps it; each noted in `taken` (index -> epoch), so that no step is taken twice."""
    trainer = module.trainer
    progress = trainer.fit_loop.epoch_loop.scheduler_progress
    for index, (epoch, value) in steps.items():
        progress.increment_ready()
        # float64: the value as the checkpoint holds it (a 64-true monitor's was rounded to float32 here, and the
        # scheduler's `best` differed from the run that never stopped); a float32 monitor's converts exactly
        value = torch.tensor(value, dtype=torch.float64)
        module.lr_scheduler_step(trainer.lr_scheduler_configs[int(index)].scheduler, value)
        progress.increment_completed()
        taken[int(index)] = int(epoch)
