"""AOG R-CNN left at its defaults unfolds: only an unfolded detector's parse leaves are the tree that scored it.

Folding (OR = mean) scores a class by the mean over every parse tree; the tree a detection then reports (each OR's
best child under the folded scores) is not one that scored it. The System's default schedule unfolds for the second
half of each fit, a resumed fit keeps its run's switch, and a folding model warns where its trees are reported."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import zoo
from datamodules import PartsWorldScenesDataModule
from tests.test_aog_rcnn import RecordOrMode, scenes


def tiny_scenes() -> PartsWorldScenesDataModule:
    return PartsWorldScenesDataModule(num_train=4, num_val=4, num_test=4, canvas_size=96, object_sizes=(32, 48),
                                      batch_size=4)


def tiny_trainer(max_epochs: int, *callbacks: pl.Callback, **kwargs: object) -> pl.Trainer:
    """One training batch per epoch and, unless `kwargs` say otherwise, no validation."""
    settings = {"limit_val_batches": 0, "num_sanity_val_steps": 0} | kwargs
    return pl.Trainer(max_epochs=max_epochs, limit_train_batches=1, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=list(callbacks), **settings)


def test_the_default_system_folds_the_first_half_of_the_fit_then_unfolds(tmp_path: Path) -> None:
    """`AOGRCNNSystem()` (no unfold_epoch, no stages) folds for max_epochs // 2 epochs and unfolds for the rest,
    the shipped configs' schedule (4 of 8): it kept the model's folding for the whole run, and every detection's
    parse tree was not the one that scored it. A fit resumed with a larger max_epochs keeps its run's switch (half of
    the new budget would fold again after unfolding); a twin, which has no OR-nodes, gets no schedule."""
    from zoo.aog_rcnn.system import AOGRCNNSystem

    dm = tiny_scenes()
    system = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96)
    modes = RecordOrMode()
    trainer = tiny_trainer(2, modes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(system, datamodule=dm)
    assert modes.modes == ["mean", "max"] and system.model.or_mode == "max"
    assert not [w for w in caught if "or_mode='mean'" in str(w.message)]  # it ends unfolded: no folding warning
    assert system.hparams.unfold_epoch == "half" and system.unfold_at == 1
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    from zoo.aog_rcnn.system import UNFOLD_EPOCH_KEY

    assert torch.load(path, weights_only=True)[UNFOLD_EPOCH_KEY] == 1

    resumed = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96)
    modes = RecordOrMode()
    tiny_trainer(4, modes).fit(resumed, datamodule=dm, ckpt_path=path)  # half of 4 would fold epoch 2 again
    assert modes.modes == ["max", "max"] and resumed.unfold_at == 1

    assert not AOGRCNNSystem("vote_rcnn_tinycnn", num_classes=dm.num_classes, image_size=96).default_unfolding
    assert not AOGRCNNSystem(num_classes=dm.num_classes, image_size=96, unfold_epoch=None).default_unfolding
    for or_mode in ("max", "mean"):  # a mode the user gives is kept for the whole fit (it was folded, then unfolded)
        given = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96, model_kwargs={"or_mode": or_mode})
        modes = RecordOrMode()
        tiny_trainer(2, modes).fit(given, datamodule=dm)
        assert not given.default_unfolding and modes.modes == [or_mode, or_mode], (or_mode, modes.modes)


def test_a_fit_that_ends_folding_warns_and_so_does_its_model_where_it_reports_trees() -> None:
    """unfold_epoch=None keeps the model's folding: the fit says at its end that its detector's parse trees are not
    the trees that scored (it said nothing), without the model warning at each folding validation; a later
    evaluation of the folding model warns once, an unfolded one not at all."""
    from zoo.aog_rcnn.system import AOGRCNNSystem

    dm = tiny_scenes()
    system = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96, unfold_epoch=None)
    trainer = tiny_trainer(1, limit_val_batches=1)
    with pytest.warns(UserWarning, match="fit ended with") as caught:
        trainer.fit(system, datamodule=dm)
    folded = [w for w in caught if "folding (or_mode='mean')" in str(w.message)]
    assert len(folded) == 1 and "unfold_epoch=None" in str(folded[0].message)  # the fit end's, not the model's
    with pytest.warns(UserWarning, match="not the parse tree that scored it"):
        trainer.predict(system, datamodule=dm, return_predictions=False)


def test_a_folding_model_warns_once_at_its_first_evaluation() -> None:
    """`zoo.create_model("aog_rcnn_tinycnn")` folds (the schedule's first stage): its first eval forward says that
    its parse_leaves are not the tree that scored and how to unfold; training forwards and unfolded models do not."""
    images, targets = scenes(count=1, size=64)
    model = zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*or_mode='mean'")
        model(images, targets)  # training: folding is the schedule's first stage
    model.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"folding.*not the parse tree that scored it.*or_mode='max'"):
        model(images)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*or_mode='mean'")
        model(images)  # once per model
        zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=64, or_mode="max").eval()(images)
