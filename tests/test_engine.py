"""The engine on its own: stages (one schedule mechanism) and auxiliary models (trained by a real Trainer, cached in
the run folder, reused, loaded from a path), with a toy System that belongs to no family."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger

from datamodules import PartsWorldDataModule
from zoo.engine import Auxiliary, Stage, ZooSystem, prepare_auxiliaries
from zoo.engine.stages import Schedule
from zoo.weights import CheckpointError


def cpu_trainer(tmp_path: Path, **overrides: Any) -> pl.Trainer:
    settings = dict(accelerator="cpu", max_epochs=1, logger=TensorBoardLogger(str(tmp_path), name="run", version=""),
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    return pl.Trainer(**(settings | overrides))


class WithTeacher(ZooSystem):
    """A classifier distilled from a frozen teacher (an auxiliary trained on the labels first)."""

    def __init__(self, *args: Any, teacher_epochs: int = 1, teacher_checkpoint: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, self.hparams.num_classes))
        self.register_buffer("teacher_ready", torch.tensor(False))
        self.fits = 0

    def auxiliaries(self) -> list[Auxiliary]:
        def loss(teacher: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            self.fits += 1
            return F.cross_entropy(teacher(batch["image"]), batch["label"])

        return [Auxiliary("teacher", loss, self.hparams.teacher_epochs, lr=1e-3,
                          checkpoint=self.hparams.teacher_checkpoint)]


def data() -> PartsWorldDataModule:
    return PartsWorldDataModule(num_train=32, num_val=16, num_test=16, batch_size=16)


def test_auxiliary_is_trained_once_cached_in_the_run_folder_and_reused(tmp_path: Path) -> None:
    pl.seed_everything(0)
    first = WithTeacher("baseline_tinycnn", num_classes=6, teacher_epochs=2)
    before = first.teacher[1].weight.clone()
    trainer = cpu_trainer(tmp_path)
    prepare_auxiliaries(first, trainer, data())
    assert first.fits == 4 and bool(first.teacher_ready)  # 2 epochs x 2 batches, by a Trainer
    assert not torch.equal(before, first.teacher[1].weight)
    assert not any(p.requires_grad for p in first.teacher.parameters()) and not first.teacher.training
    cached = list((tmp_path / "run" / "auxiliary").glob("teacher-*.ckpt"))
    assert len(cached) == 1 and (tmp_path / "run" / "auxiliary" / "teacher").is_dir()  # cache + its TensorBoard run
    second = WithTeacher("baseline_tinycnn", num_classes=6, teacher_epochs=2)
    prepare_auxiliaries(second, cpu_trainer(tmp_path), data())
    assert second.fits == 0 and torch.equal(second.teacher[1].weight, first.teacher[1].weight)  # reused
    other = WithTeacher("baseline_tinycnn", num_classes=6, teacher_epochs=1)  # another setting: another cache
    prepare_auxiliaries(other, cpu_trainer(tmp_path), data())
    assert other.fits == 2 and len(list((tmp_path / "run" / "auxiliary").glob("teacher-*.ckpt"))) == 2
    loaded = WithTeacher("baseline_tinycnn", num_classes=6, teacher_checkpoint=str(cached[0]))
    prepare_auxiliaries(loaded, cpu_trainer(tmp_path / "elsewhere"), data())
    assert loaded.fits == 0 and torch.equal(loaded.teacher[1].weight, first.teacher[1].weight)
    (tmp_path / "bad.pt").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="bad.pt"):
        prepare_auxiliaries(WithTeacher("baseline_tinycnn", num_classes=6, teacher_checkpoint=str(tmp_path / "bad.pt")),
                            cpu_trainer(tmp_path), data())


def test_fit_from_python_prepares_auxiliaries_and_keeps_them_frozen(tmp_path: Path) -> None:
    pl.seed_everything(0)
    system = WithTeacher("baseline_tinycnn", num_classes=6, optimizer=partial(torch.optim.SGD, lr=0.1))
    cpu_trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(system, datamodule=data())
    frozen = system.teacher[1].weight.clone()
    assert system.fits == 2 and bool(system.teacher_ready)
    cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=2).fit(system, datamodule=data())
    assert system.fits == 2 and torch.equal(frozen, system.teacher[1].weight)  # ready: never trained again


def test_stages_freeze_submodules_narrow_terms_scale_lr_and_set_attributes() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Linear(2, 2))
    model.add_module("head", nn.Linear(2, 2))
    model.mode = "mean"
    schedule = Schedule([{"name": "warm", "epochs": 2, "train": ["body"], "losses": ["loss_a"]},
                         Stage("all", epochs=1, lr_scale=0.1, settings={"mode": "max"})], model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert schedule.start_epoch(model, optimizer, 1) == {"stage": 0.0}
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]
    assert schedule.frozen(model) == [model.head] and model.mode == "mean"
    terms = {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)}
    assert list(schedule.select(terms)) == ["loss_a"]
    assert schedule.start_epoch(model, optimizer, 7) == {"stage": 1.0}  # past the end: the last stage
    assert model.mode == "max" and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert schedule.start_epoch(model, optimizer, 8) and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="trains \\['neck'\\], which Sequential does not have"):
        Schedule([{"name": "x", "train": ["neck"]}], model)
    with pytest.raises(ValueError, match="sets \\['beta'\\]"):
        Schedule([{"name": "x", "settings": {"beta": 1}}], model)
    with pytest.raises(KeyError, match="sums \\['loss_c'\\]"):
        Schedule([{"name": "x", "losses": ["loss_c"]}], model).select(terms)
