"""Resumes and run reports that must not depend on precision or process count: a `64-true` fit resumed from
last.ckpt is bit-identical to the run that never stopped (its weights were rounded to float32 at the load) and takes
its owed ReduceLROnPlateau step with the monitored value unrounded; compare / ablate's sample counter reports a
spawned fit that had nothing left to train, and counts every rank's validation samples once."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.helpers import gloo_ranks
from zoo.cli.compare import SampleCounter
from zoo.engine.plateau import take_plateau_steps

CONFIG = str(REPO / "configs/baselines/parts_world.yaml")
# value-dependent: a loss below the best by any amount is an improvement, so `best` is the monitored value itself
PLATEAU = ("--model.init_args.scheduler={class_path: torch.optim.lr_scheduler.ReduceLROnPlateau, init_args: "
           "{patience: 0, factor: 0.5, threshold: 0.0}}")


def fake_trainer(global_step: int = 0, current_epoch: int = 0) -> SimpleNamespace:
    """What SampleCounter reads of a trainer: its progress and the metrics a spawned worker sends back."""
    return SimpleNamespace(global_step=global_step, current_epoch=current_epoch, callback_metrics={},
                           sanity_checking=False, world_size=2)


def test_a_spawned_fit_that_had_ended_reports_its_last_weights() -> None:
    """An ablate point resumed under ddp_spawn after its fit had ended (result.json lost): Lightning skips the whole
    fit loop, `on_train_end` included, so the worker sent nothing back, and the main process's trainer (step 0 under
    ddp_spawn) gave `weights: ""`. The worker now reports at `on_fit_end` with its trainer's progress, as the
    single-process run reads its own trainer's."""
    worker, main = SampleCounter("train"), SampleCounter("train")  # the worker's copy, the main process's
    ended = fake_trainer(global_step=2, current_epoch=1)  # 2 steps a rank, epoch 0 done: `current_epoch` one past
    worker.on_fit_end(ended, None)
    spawned_main = fake_trainer()  # no loop progress in the main process
    spawned_main.callback_metrics.update(ended.callback_metrics)  # what Lightning returns from rank zero
    assert main.last_weights(spawned_main) == "last (epoch 0, step 2)"
    alone = SampleCounter("train")  # one process: the same fit reads its trainer (4 steps of 8 samples)
    alone.on_fit_end(fake_trainer(global_step=4, current_epoch=1), None)
    assert alone.last_weights(fake_trainer(global_step=4, current_epoch=1)) == "last (epoch 0, step 4)"
    counted = SampleCounter("train")  # a fit that trained: its last batch's progress, not overwritten at fit end
    counted._progress = (2, 12)
    counted.on_fit_end(fake_trainer(global_step=12, current_epoch=3), None)
    assert counted.last_weights(fake_trainer()) == "last (epoch 2, step 12)"


def count_validation(batch_sizes: list[int]) -> int:
    """One gloo rank's validation of `batch_sizes` through SampleCounter's hooks: the samples it reports."""
    counter, trainer = SampleCounter("val"), fake_trainer()
    module = SimpleNamespace(device=torch.device("cpu"), batch_size=len)
    for index, size in enumerate(batch_sizes):
        counter.on_validation_batch_start(trainer, module, [0] * size, index)
        counter.on_validation_batch_end(trainer, module, None, [0] * size, index)
    counter.on_validation_end(trainer, module)
    return counter.samples(trainer)


def test_every_rank_counts_its_own_validation_samples(tmp_path: Path) -> None:
    """9 validation samples on 2 ranks: the evaluation loaders do not repeat samples to even the ranks out (5 and 4),
    and rank zero's 5 times the world size counted 10. Each rank's own, summed when validation ends: 9 on both."""
    assert gloo_ranks(tmp_path, count_validation, [[5], [4]]) == [9, 9]


def test_the_owed_plateau_step_takes_the_value_unrounded() -> None:
    """The owed step's value (a float64 val/loss under 64-true, as the checkpoint holds it) was made a float32
    tensor: the scheduler's `best` differed from the run that never stopped (1.793125867843628 for
    1.7931259274482727)."""
    value = 1.7931259274482727
    assert float(torch.tensor(value)) != value  # a value float32 rounds
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1)], lr=0.1), threshold=0.0)
    progress = SimpleNamespace(increment_ready=lambda: None, increment_completed=lambda: None)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(scheduler_progress=progress)),
                              lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    module = SimpleNamespace(trainer=trainer, lr_scheduler_step=lambda sched, metric: sched.step(metric))
    taken: dict[int, int] = {}
    take_plateau_steps(module, {"0": [0, value]}, taken)
    assert scheduler.best == value and taken == {0: 0}


def test_a_64_true_resume_is_bit_identical(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning loads a checkpoint's weights before its precision plugin converts the System: under 64-true the
    float64 weights went into float32 parameters, so a fit resumed from last.ckpt had every weight rounded (22 of 22
    parameter tensors differed by ~1e-8). Stopped at epoch 0's end and resumed to 2 epochs: the same weights and the
    same scheduler state as the run that never stopped. A compare `checkpoint:` run under 64-true (loaded before its
    trainer converts the System) scores the weights as saved too."""
    from train import main

    compare = importlib.import_module("zoo.cli.compare")  # the module: zoo.cli's `compare` is its function

    def fit(name: str, *extra: str) -> dict[str, Any]:
        main(["fit", "--config", CONFIG, PLATEAU, "--data.init_args.num_train=16", "--data.init_args.num_val=8",
              "--data.init_args.batch_size=8", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
              "--trainer.deterministic=true", "--trainer.precision=64-true", "--trainer.enable_progress_bar=false",
              f"--trainer.logger.init_args.name={name}", *extra])
        return torch.load(in_tmp_dir / "checkpoints" / name / "checkpoints" / "last.ckpt", weights_only=True)

    whole = fit("whole")
    fit("stopped", "--trainer.max_epochs=1")
    resumed = fit("stopped", "--ckpt_path=last")
    assert all(tensor.dtype == torch.float64 for tensor in resumed["state_dict"].values() if tensor.is_floating_point())
    differ = [key for key, tensor in whole["state_dict"].items() if not torch.equal(tensor, resumed["state_dict"][key])]
    assert not differ, f"{len(differ)} of {len(whole['state_dict'])} tensors differ: {differ[:8]}"
    assert whole["lr_schedulers"] == resumed["lr_schedulers"]

    loaded: dict[str, torch.Tensor] = {}

    def load(system: torch.nn.Module, *args: Any) -> None:
        load_system_weights(system, *args)
        loaded.update(system.state_dict())

    load_system_weights = compare.load_system_weights
    monkeypatch.setattr(compare, "load_system_weights", load)
    spec = in_tmp_dir / "spec.yaml"
    spec.write_text(yaml.safe_dump({"compare": {"name": "scored", "runs": {"whole": {
        "config": CONFIG, "checkpoint": str(in_tmp_dir / "checkpoints" / "whole" / "checkpoints" / "last.ckpt")}}}}))
    main(["compare", "--config", str(spec), "--no_explain", "--data.init_args.num_train=16",
          "--data.init_args.num_val=8", "--data.init_args.batch_size=8", "--trainer.accelerator=cpu",
          "--trainer.precision=64-true", "--trainer.enable_progress_bar=false"])
    differ = [key for key, tensor in whole["state_dict"].items() if not torch.equal(tensor, loaded[key])]
    assert loaded and not differ, f"{len(differ)} of {len(whole['state_dict'])} tensors differ: {differ[:8]}"
