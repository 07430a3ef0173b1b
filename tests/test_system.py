"""The generic System: named loss terms are summed and each one logged; optimiser/scheduler injection."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn

from datamodules import PartsWorldDataModule
from zoo.baselines.system import ClassifierSystem


class TwoTerms(nn.Module):
    """A task term plus a fixed penalty, so the summed loss is known exactly."""

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ce = nn.functional.cross_entropy(out["logits"], batch["label"])
        return {"loss_task": ce, "loss_penalty": torch.tensor(0.25)}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    dm = PartsWorldDataModule(num_train=8, num_val=8, num_test=8, batch_size=8)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_terms_are_summed_and_logged(batch: dict[str, torch.Tensor]) -> None:
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, loss=TwoTerms())
    logged: dict[str, float] = {}
    system.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    loss = system.training_step(batch, 0)
    ce = nn.functional.cross_entropy(system.model(batch["image"])["logits"], batch["label"])
    assert torch.allclose(loss, ce + 0.25)
    assert {"train/loss_task", "train/loss_penalty", "train/loss", "train/acc"} <= set(logged)


def test_optimizer_and_scheduler_are_injected() -> None:
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, optimizer=partial(torch.optim.SGD, lr=0.1),
                                  scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=2))
    config = system.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["lr_scheduler"]["monitor"] == "val/loss"
    frozen = ClassifierSystem("baseline_tinycnn", num_classes=6, model_kwargs={"freeze_backbone": True})
    optimizer = frozen.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2  # only the linear head


def test_bad_batches_name_the_problem(batch: dict[str, torch.Tensor]) -> None:
    system = ClassifierSystem("baseline_tinycnn", num_classes=6)
    with pytest.raises(KeyError, match=r"no 'image'; it holds \['label'\]"):
        system.training_step({"label": batch["label"]}, 0)
    with pytest.raises(TypeError, match="Batches must be dicts"):
        system.training_step((batch["image"], batch["label"]), 0)


def test_a_few_epochs_learn_the_world() -> None:
    pl.seed_everything(0)
    dm = PartsWorldDataModule(num_train=512, num_val=128, num_test=16, batch_size=32)
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, optimizer=partial(torch.optim.Adam, lr=2e-3))
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    assert trainer.callback_metrics["val/acc"] > 3 / 6  # three times chance after five short epochs


class NaNAfter(nn.Module):
    """Cross-entropy, then a NaN term from the second training step on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        bad = torch.tensor(float("nan") if self.calls >= 2 else 0.0)
        return {"loss_task": nn.functional.cross_entropy(out["logits"], batch["label"]), "loss_bad": bad}


def fit_with_nan(nonfinite_loss: str, tmp_path, batches: int = 4) -> ClassifierSystem:
    pl.seed_everything(0)
    dm = PartsWorldDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, loss=NaNAfter(), nonfinite_loss=nonfinite_loss,
                                  optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         limit_train_batches=batches, default_root_dir=tmp_path)
    trainer.fit(system, datamodule=dm)
    return system


def test_nonfinite_loss_stops_with_step_batch_and_terms(tmp_path) -> None:
    with pytest.raises(FloatingPointError, match=r"global step 1, epoch 0, batch 1: loss_task=[\d.]+, loss_bad=nan"):
        fit_with_nan("raise", tmp_path)


def test_nonfinite_loss_can_skip_the_batch(tmp_path) -> None:
    skipped = fit_with_nan("skip", tmp_path)  # batches 2-4 are NaN and skipped
    first_only = fit_with_nan("skip", tmp_path, batches=1)
    assert skipped.loss.calls == 4
    for (name, a), b in zip(skipped.named_parameters(), first_only.parameters()):  # BN statistics do move
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    with pytest.raises(ValueError, match="nonfinite_loss must be"):
        ClassifierSystem("baseline_tinycnn", nonfinite_loss="ignore")


def test_stage_lr_scale_keeps_the_schedulers_decay() -> None:
    """A stage rescales the learning rate when its lr_scale changes, on top of what an LR scheduler made of it."""
    from zoo.engine.stages import Schedule

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    schedule = Schedule([{"name": "a"}, {"name": "b", "lr_scale": 0.5}, {"name": "c"}], model)
    rates = []
    for epoch in range(4):
        schedule.start_epoch(model, optimizer, epoch)
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0, 0.1 * 0.5, 0.01, 0.001])
