"""What rank zero reads of a split and what a checkpoint evaluates under, outside the training loop: the pictures'
fixed batch and CBM's intervention curve read the whole split whatever the process count (`whole_split_loader`),
and `validate` / `test` of a checkpoint use the epoch schedules it was trained under (`ZooSystem.enter_schedules`)."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from datamodules import PartsWorldDataModule
from zoo.engine.callbacks import FixedBatchCallback


def shard_loader(loader: DataLoader, rank: int = 0) -> DataLoader:
    """`loader` as a datamodule builds it under two-process DDP: this rank's half (`_evaluation_sampler`)."""
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn)


def small_data(**kwargs: Any) -> PartsWorldDataModule:
    data = PartsWorldDataModule(**({"num_classes": 4, "num_train": 16, "num_val": 24, "num_test": 8,
                                    "batch_size": 8, "image_size": 32} | kwargs))
    data.setup("fit")
    return data


def test_whole_split_loader_reads_every_sample_of_a_shard_loader_in_order() -> None:
    from zoo.engine.callbacks import whole_split_loader

    data = small_data()
    sequential = data.val_dataloader()
    assert whole_split_loader(sequential) is sequential  # one process: the loader itself
    shard = shard_loader(sequential, rank=1)
    assert len(torch.cat([batch["index"] for batch in shard])) == 12  # a rank's half
    whole = whole_split_loader(shard)
    assert whole.batch_size == 8 and whole.collate_fn is shard.collate_fn
    assert torch.cat([batch["index"] for batch in whole]).tolist() == list(range(24))


class Sharded:
    """A datamodule whose validation loader is rank zero's half of the split, as under two-process DDP."""

    def __init__(self, data: PartsWorldDataModule) -> None:
        self.data, self.num_classes = data, data.num_classes

    def val_dataloader(self) -> DataLoader:
        return shard_loader(self.data.val_dataloader())


def test_the_fixed_batch_is_the_same_with_a_sharded_validation_loader() -> None:
    """Under DDP the validation loader holds rank zero's shard: the pictures showed its first samples (classes
    2, 2, 1, 3, ...) instead of the first image of each class, unlike a one-process run."""
    data = small_data()
    module = SimpleNamespace(target_key="label")
    one_process = FixedBatchCallback().fixed_batch(SimpleNamespace(lightning_module=module, datamodule=data))
    sharded = FixedBatchCallback().fixed_batch(SimpleNamespace(lightning_module=module, datamodule=Sharded(data)))
    assert one_process["label"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert torch.equal(sharded["index"], one_process["index"]) and torch.equal(sharded["image"], one_process["image"])


def test_the_intervention_curve_reads_the_whole_split_with_a_sharded_loader(tmp_path: Path) -> None:
    """CBM's curve is computed on rank zero alone: from its shard, k = 0 was not the task accuracy and the curve
    changed with the process count."""
    from zoo.cbm.callback import InterventionCallback
    from zoo.cbm.system import CBMSystem

    torch.manual_seed(0)
    data = small_data(num_train=32)
    cbm = CBMSystem(model_name="cbm_tinycnn", num_classes=4, image_size=32,
                    optimizer=functools.partial(torch.optim.Adam, lr=0.01))
    quiet_trainer(tmp_path, max_epochs=8, limit_val_batches=0).fit(cbm, datamodule=data)  # not one class for all
    accuracy = quiet_trainer(tmp_path).validate(cbm, datamodule=data, verbose=False)[0]["val/acc"]
    curves = []
    for datamodule in (data, Sharded(data)):
        callback = InterventionCallback(num_points=5)
        trainer = SimpleNamespace(is_global_zero=True, datamodule=datamodule, sanity_checking=False, loggers=[],
                                  limit_val_batches=1.0, fast_dev_run=False, default_root_dir=str(tmp_path))
        callback.run(trainer, cbm, "val")
        curves.append(callback.curves["val"])
    assert curves[0]["acc"][0] == pytest.approx(accuracy, abs=1e-6)  # k = 0: nothing corrected
    assert curves[1]["acc"] == pytest.approx(curves[0]["acc"], abs=1e-6)


def distillation_system() -> pl.LightningModule:
    from losses.renn import LogicRuleDistillation, PartsWorldColourRule
    from zoo.renn.system import RuleLossSystem

    return RuleLossSystem("baseline_tinycnn", num_classes=4, image_size=32,
                          loss=LogicRuleDistillation([PartsWorldColourRule()]))


def icnn_system() -> pl.LightningModule:
    from losses.icnn import FilterPartLoss
    from zoo.icnn.system import ICNNSystem

    return ICNNSystem("icnn_tinycnn", num_classes=4, image_size=32, loss=FilterPartLoss(weight=1.0),
                      model_kwargs={"tau_scale": 16.0})


def quiet_trainer(tmp_path: Path, **overrides: Any) -> pl.Trainer:
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    return pl.Trainer(**(settings | overrides))


@pytest.mark.parametrize("build, term, schedule", [(distillation_system, "val/loss_distill", "distill_pi"),
                                                   (icnn_system, "val/loss_filter", "lambda_filter")])
def test_validate_and_test_of_a_checkpoint_use_its_epoch_schedules(tmp_path: Path, build: Any, term: str,
                                                                    schedule: str) -> None:
    """`validate --ckpt_path` of a rule-distillation run at epoch 1 logged loss_distill 0.0 (pi_t's initial value:
    only a training epoch's start set it) where fit logged 0.093; ICNN's lambda / (epoch + 1) likewise."""
    pl.seed_everything(0)
    data = small_data(batch_size=8)
    trained = build()
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(trained, datamodule=data)
    path = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(path)  # written when fit ended: Lightning's `epoch` is 3, the last epoch trained 2
    # the trained System as it stands: epoch 2's schedules
    fitted = quiet_trainer(tmp_path).validate(trained, datamodule=data, verbose=False)[0]
    assert fitted[term] != 0

    for old_format in (False, True):
        if old_format:  # a checkpoint written before the schedule's epoch was saved: read off the fit loop
            checkpoint = torch.load(path, weights_only=True)
            del checkpoint["zoo_schedule_epoch"]
            path = tmp_path / "old.ckpt"
            torch.save(checkpoint, path)
        fresh = build()
        grads = [p.requires_grad for p in fresh.parameters()]
        validated = quiet_trainer(tmp_path).validate(fresh, datamodule=data, ckpt_path=path, verbose=False)[0]
        assert validated[term] == pytest.approx(fitted[term], rel=1e-6), old_format
        assert validated["val/loss"] == pytest.approx(fitted["val/loss"], rel=1e-6)
        assert [p.requires_grad for p in fresh.parameters()] == grads  # values set, nothing trained
        tested = quiet_trainer(tmp_path).test(build(), datamodule=data, ckpt_path=path, verbose=False)[0]
        assert tested[term.replace("val/", "test/")] != 0


def test_loading_a_checkpoint_sets_schedule_values_only(tmp_path: Path) -> None:
    """`enter_schedules` (on every checkpoint load) sets the `set_epoch` values and draws nothing, trains nothing: no
    random draw, no parameter's requires_grad changed, no optimiser; a stage's model settings are the model's own
    state (AOG's OR mode is in its state dict, read alike by every load path), so loading leaves them to it."""
    from zoo.engine.stages import Schedule

    system = distillation_system()
    system.model.or_mode = "sum"  # a model setting a stage may set
    system.schedule = Schedule([{"name": "a", "epochs": 2, "train": ["backbone"]},
                                {"name": "b", "settings": {"or_mode": "max"}}], system.model)
    grads, rng = [p.requires_grad for p in system.parameters()], torch.get_rng_state()
    system.on_load_checkpoint({"zoo_schedule_epoch": 3, "state_dict": {}})
    assert system.loss.pi == pytest.approx(1 - 0.95**3) and system.model.or_mode == "sum"
    assert [p.requires_grad for p in system.parameters()] == grads and torch.equal(torch.get_rng_state(), rng)
    system.on_load_checkpoint({"state_dict": {}})  # nothing to tell the epoch: the values stay
    assert system.loss.pi == pytest.approx(1 - 0.95**3)
