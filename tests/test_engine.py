"""The engine on its own: the System base (named loss terms summed and logged, optimiser and scheduler injection, the
non-finite policy), stages (one schedule mechanism) and auxiliary models (trained by a real Trainer, cached in the
run folder, reused, loaded from a path), with a toy System that belongs to no family."""

from __future__ import annotations

import os
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
from zoo.baselines.system import ClassifierSystem
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


def test_a_stage_that_trains_all_trains_what_an_earlier_stage_froze() -> None:
    """`train: None` is "all": after a stage that trained the body only, the head trains again (it stayed frozen,
    and a run resumed in that stage unfroze it: 14 of ReNN's 14 tensors differed); a parameter frozen when the model
    was built stays frozen."""
    model = nn.Sequential()
    model.add_module("body", nn.Linear(2, 2))
    model.add_module("head", nn.Linear(2, 2))
    model.head.bias.requires_grad_(False)  # frozen by the model itself
    schedule = Schedule([{"name": "local", "epochs": 1, "train": ["body"]}, {"name": "joint", "epochs": 2}], model)
    schedule.start_epoch(model, None, 0)
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]
    schedule.start_epoch(model, None, 1)
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    resumed = Schedule([{"name": "local", "epochs": 1, "train": ["body"]}, {"name": "joint", "epochs": 2}], model)
    resumed.start_epoch(model, None, 2)  # a fresh process entering the joint stage: the same
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]


# ---------------------------------------------------------------------------------------------------- the System base
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
    dm = PartsWorldDataModule(num_train=512, num_val=128, num_test=16, batch_size=32, image_size=32)  # 3x faster
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, optimizer=partial(torch.optim.Adam, lr=2e-3),
                              image_size=32)
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    assert trainer.callback_metrics["val/acc"] > 3 / 6  # three times chance after five short epochs


class NaNAfter(nn.Module):
    """Cross-entropy, then from the second training step on a NaN term ("loss"), or a term whose value is 0 and
    whose gradient is NaN ("grad": sqrt at 0, times 0)."""

    def __init__(self, where: str = "loss") -> None:
        super().__init__()
        self.calls, self.where = 0, where

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.where == "grad":
            bad = (out["logits"].sum() * 0).sqrt() if self.calls >= 2 else out["logits"].sum() * 0
        else:
            bad = torch.tensor(float("nan") if self.calls >= 2 else 0.0)
        return {"loss_task": nn.functional.cross_entropy(out["logits"], batch["label"]), "loss_bad": bad}


def fit_with_nan(nonfinite_loss: str, tmp_path, batches: int = 4, where: str = "loss") -> ClassifierSystem:
    pl.seed_everything(0)
    dm = PartsWorldDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, loss=NaNAfter(where), nonfinite_loss=nonfinite_loss,
                              optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         limit_train_batches=batches, default_root_dir=tmp_path)
    trainer.fit(system, datamodule=dm)
    return system


def test_nonfinite_loss_stops_with_step_batch_and_terms(tmp_path) -> None:
    with pytest.raises(FloatingPointError, match=r"global step 1, epoch 0, batch 1: loss_task=[\d.]+, loss_bad=nan"
                                                 r"\. No checkpoint was written yet\. .*nonfinite_loss=skip"):
        fit_with_nan("raise", tmp_path)  # (it said "The last checkpoint is the last good state", with none written)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_loss_can_skip_the_batch(tmp_path, where: str) -> None:
    """Batches 2-4 have a NaN loss or NaN gradients and are skipped: weights, BatchNorm statistics and the optimiser's
    momentum end as after the first batch alone."""
    skipped = fit_with_nan("skip", tmp_path, where=where)
    first_only = fit_with_nan("skip", tmp_path, batches=1, where=where)
    assert skipped.loss.calls == 4
    after, before = skipped.state_dict(), first_only.state_dict()
    for name in after:
        assert torch.equal(after[name], before[name]), name  # equal tensors: finite, as after the good batch
    momentum = [skipped.trainer.optimizers[0].state[p]["momentum_buffer"] for p in skipped.parameters()]
    assert all(torch.equal(m, n) for m, n in zip(momentum, [first_only.trainer.optimizers[0].state[p][
        "momentum_buffer"] for p in first_only.parameters()]))
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


@pytest.mark.parametrize("kind", ["lambda", "warm_restarts", "one_cycle"])
def test_stage_lr_scale_holds_for_schedulers_that_recompute_the_rate(kind: str) -> None:
    """LambdaLR, CosineAnnealingWarmRestarts and OneCycleLR compute the rate from their base rates every step: the
    stage's scale held for its first epoch only (LambdaLR 0.5^e: 1.0, 0.05, then 0.25, 0.125). The scale now applies
    to their base rates too: the scaled run's rates are the unscaled run's times the scale, in every epoch of it."""
    from zoo.engine.stages import Schedule

    def rates(stages: list[dict]) -> list[float]:
        model = nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = {"lambda": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5**e),
                     "warm_restarts": lambda: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=3),
                     "one_cycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=5)
                     }[kind]()
        schedule, seen = Schedule(stages, model), []
        for epoch in range(4):
            schedule.start_epoch(model, optimizer, epoch, [scheduler])
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain = rates([{"name": "a"}, {"name": "b"}])
    scaled = rates([{"name": "a"}, {"name": "b", "lr_scale": 0.1, "epochs": 3}])
    assert scaled[0] == pytest.approx(plain[0])
    assert scaled[1:] == pytest.approx([0.1 * rate for rate in plain[1:]])


def test_picture_folder_is_read_without_a_collective(tmp_path: Path) -> None:
    """Pictures are drawn on rank zero only; `trainer.log_dir` broadcasts, so rank zero alone would hang under DDP.
    The run folder comes from the logger itself: the same folder, no broadcast."""
    from types import SimpleNamespace

    from zoo.engine.callbacks import run_folder

    def broadcast(*_: Any) -> None:
        raise AssertionError("a collective call from rank zero alone")

    logger = TensorBoardLogger(tmp_path, name="run", version="")
    trainer = SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path / "root"),
                              strategy=SimpleNamespace(broadcast=broadcast))
    assert run_folder(trainer, "filters") == Path(logger.log_dir) / "filters"
    assert (Path(logger.log_dir) / "filters").is_dir()
    bare = SimpleNamespace(loggers=[], default_root_dir=str(tmp_path / "root"), strategy=trainer.strategy)
    assert run_folder(bare, "x") is None  # no run folder: pictures are drawn, not written


def test_a_helper_trained_or_loaded_leaves_the_random_stream_alone(tmp_path: Path) -> None:
    """Training a helper drew from the global generator and loading it from the cache did not, so a rerun that
    reused the cache (or a killed run resumed) trained the main model on another stream."""
    trained = WithTeacher("baseline_tinycnn", num_classes=6, teacher_epochs=1)
    pl.seed_everything(0)
    prepare_auxiliaries(trained, cpu_trainer(tmp_path), data())
    assert trained.fits > 0
    after_training = torch.rand(3)
    reused = WithTeacher("baseline_tinycnn", num_classes=6, teacher_epochs=1)
    pl.seed_everything(0)  # the same point of the stream as the first call
    prepare_auxiliaries(reused, cpu_trainer(tmp_path), data())
    assert reused.fits == 0 and torch.equal(torch.rand(3), after_training)


def test_a_checkpoint_of_another_system_is_refused_on_resume_by_last(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`--ckpt_path last` skips the CLI's check of the file: the System's own load refuses another System's run."""
    from zoo.baselines.system import ClassifierSystem
    from zoo.icnn.system import ICNNSystem

    checkpoint = {"hyper_parameters": {"_class_path": "zoo.icnn.system.ICNNSystem", "model_name": "icnn_tinycnn",
                                       "num_classes": 3, "in_chans": 3}}
    with pytest.raises(CheckpointError, match="written by ICNNSystem .*this run is ClassifierSystem"):
        ClassifierSystem("icnn_tinycnn", num_classes=3).on_load_checkpoint(checkpoint)
    ICNNSystem("icnn_tinycnn", num_classes=3).on_load_checkpoint(checkpoint)  # its own kind loads


def test_epoch_schedules_reach_a_wrapped_loss() -> None:
    """A loss that wraps a scheduled loss (set_epoch) keeps its schedule: every submodule's set_epoch runs once."""
    from zoo.engine.stages import epoch_schedules

    class Scheduled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[int] = []

        def set_epoch(self, epoch: int) -> dict[str, float]:
            self.calls.append(epoch)
            return {"inner_weight": 1 / (epoch + 1)}

    inner = Scheduled()
    wrapper = nn.ModuleDict({"task": nn.Identity(), "scheduled": inner})
    shared = nn.Sequential(inner)  # the same module under two roots: still called once
    assert epoch_schedules({"model": shared, "loss": wrapper}, 3) == {"inner_weight": 0.25}
    assert inner.calls == [3]


def test_auxiliary_cache_key_tells_layer_settings_apart() -> None:
    """A cached helper trained with another dropout rate (same shapes) is not reused: the key reads the layers."""
    from zoo.engine.auxiliary import Auxiliary, cache_key

    aux = Auxiliary("black_box", loss=lambda module, batch: torch.zeros(()), epochs=1)
    data = PartsWorldDataModule(num_train=8, num_val=8)

    def net(p: float) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.Dropout(p), nn.Linear(4, 2))

    assert cache_key(aux, net(0.5), data) != cache_key(aux, net(0.75), data)
    assert cache_key(aux, net(0.5), data) == cache_key(aux, net(0.5), data)


def test_auxiliary_cache_key_tells_seeds_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit --seed_everything=1` in the run folder of a seed-0 run reused the seed-0 black box: a seed sweep left
    out the helpers' variance. The key reads the run's seed."""
    from zoo.engine.auxiliary import Auxiliary, cache_key

    aux = Auxiliary("black_box", loss=lambda module, batch: torch.zeros(()), epochs=1)
    data, net = PartsWorldDataModule(num_train=8, num_val=8), nn.Linear(4, 2)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it: restored after the test
    keys = []
    for seed in (0, 1, 0):
        pl.seed_everything(seed)
        keys.append(cache_key(aux, net, data))
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_auxiliary_cache_key_tells_starting_weights_apart(tmp_path: Path) -> None:
    """An encoder that starts from ImageNet weights is not the one trained from scratch, nor one from a changed file:
    the key reads the backbones' weight files (path, size, modification time)."""
    import zoo
    from zoo.engine.auxiliary import Auxiliary, cache_key

    aux = Auxiliary("image_encoder", loss=lambda module, batch: torch.zeros(()), epochs=1)
    data = PartsWorldDataModule(num_train=8, num_val=8)
    weights = tmp_path / "tiny.pth"
    torch.save(zoo.create_model("baseline_tinycnn", num_classes=3).backbone.state_dict(), weights)
    scratch = zoo.create_model("baseline_tinycnn", num_classes=3)
    pretrained = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(weights))
    assert cache_key(aux, scratch, data) != cache_key(aux, pretrained, data)
    again = cache_key(aux, zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(weights)), data)
    assert again == cache_key(aux, pretrained, data)
    os.utime(weights, ns=(1, 1))  # the file changed
    assert cache_key(aux, pretrained, data) != again


@pytest.mark.parametrize("system_class, model_name", [
    ("zoo.baselines.system.ClassifierSystem", "baseline_tinycnn"), ("zoo.icnn.system.ICNNSystem", "icnn_tinycnn"),
    ("zoo.cbm.system.CBMSystem", "cbm_tinycnn"), ("zoo.protopnet.system.ProtoPNetSystem", "protopnet_tinycnn")])
def test_default_losses_read_the_systems_target_key(system_class: str, model_name: str) -> None:
    """A batch whose labels live under another field (`target_key`): each family's default loss reads it (and is
    its own loss, not bare cross-entropy), and a loss reading another field is refused by name."""
    import importlib

    from losses.baselines import ClassificationLoss

    module, _, name = system_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {"model_kwargs": {"num_concepts": 4}} if "cbm" in model_name else {}
    system = cls(model_name, num_classes=3, target_key="y", **kwargs)
    assert system.loss.target_key == "y"
    assert type(system.loss) is not ClassificationLoss or name == "ClassifierSystem"  # the family's own loss
    batch = {"image": torch.rand(4, 3, 64, 64), "y": torch.tensor([0, 1, 2, 0]),
             "attributes": torch.tensor([[1.0, 0, 1, 0]] * 4)}
    assert torch.isfinite(system.training_step(batch, 0))
    with pytest.raises(ValueError, match=r"reads the labels from batch\['label'\] but the System from batch\['y'\]"):
        cls(model_name, num_classes=3, target_key="y", loss=ClassificationLoss(), **kwargs)


def test_auxiliary_cache_key_tells_data_and_losses_apart() -> None:
    """A black box cached for one L2X dataset is not reused for another (the datamodules' settings are in the key),
    nor an EVAL-X evaluator trained on another mask geometry (the loss's settings are)."""
    from datamodules import L2XSyntheticDataModule
    from losses.l2x import LabelCrossEntropy, RandomMaskCrossEntropy
    from zoo.engine.auxiliary import Auxiliary, cache_key

    net = nn.Sequential(nn.Linear(10, 2))
    black_box = Auxiliary("black_box", loss=LabelCrossEntropy("features", "label"), epochs=1)
    keys = {dataset: cache_key(black_box, net, L2XSyntheticDataModule(dataset=dataset, num_train=64, num_val=64))
            for dataset in ("orange_skin", "nonlinear_additive")}
    assert keys["orange_skin"] != keys["nonlinear_additive"]
    assert keys["orange_skin"] == cache_key(black_box, net, L2XSyntheticDataModule(dataset="orange_skin",
                                                                                     num_train=64, num_val=64))
    assert keys["orange_skin"] != cache_key(black_box, net, L2XSyntheticDataModule(dataset="orange_skin",
                                                                                     num_train=128, num_val=64))
    data = L2XSyntheticDataModule(num_train=64, num_val=64)

    def evaluator(num_features: int) -> Auxiliary:
        return Auxiliary("evaluator", loss=RandomMaskCrossEntropy("features", "label", torch.mul, num_features),
                         epochs=1)

    assert cache_key(evaluator(16), net, data) != cache_key(evaluator(4), net, data)
