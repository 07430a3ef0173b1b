"""What a System saves loads back under weights_only=True (NumPy numbers as Python numbers, ReNN's Rule objects as
their registered names; an unregistered rule refused when the System is built), and a reset head takes the model's
device and dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import zoo
from datamodules import PartsWorldDataModule, RuleSeriesDataModule
from zoo.engine import ZooSystem
from zoo.renn.model import CountAtLeast, NotFollowedBy, Pattern, register_rule
from zoo.renn.system import ReNNSystem


def _fit(system: pl.LightningModule, data: pl.LightningDataModule, root: Path) -> str:
    """One training and one validation batch; the last checkpoint's path."""
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, limit_train_batches=1, limit_val_batches=1,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(system, data)
    return trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path


def _same_outputs(system: pl.LightningModule, path: str, x: torch.Tensor) -> None:
    loaded = zoo.load_checkpoint(path)
    system.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], system.model(x)["logits"], rtol=0, atol=0)


def test_numpy_numbers_are_saved_as_python_numbers(tmp_path: Path) -> None:
    data = PartsWorldDataModule(num_train=64, num_val=32, num_test=32, batch_size=32)
    system = ZooSystem(model_name="baseline_tinycnn", num_classes=np.int64(6),
                       model_kwargs={"drop_rate": np.float64(0.1)})
    assert type(system.hparams.num_classes) is int and type(system.hparams.model_kwargs["drop_rate"]) is float
    path = _fit(system, data, tmp_path)
    _same_outputs(system, path, torch.rand(2, 3, 64, 64))
    assert ZooSystem.load_from_checkpoint(path).hparams.num_classes == 6


_PREMATURE = Pattern("premature_beat")
_PAUSE = NotFollowedBy(_PREMATURE, Pattern("normal_beat") | _PREMATURE, within=(4, 26))


def _renn(rules: list[Any]) -> tuple[ReNNSystem, RuleSeriesDataModule]:
    data = RuleSeriesDataModule(num_train=32, num_val=16, num_test=16, batch_size=16)
    return ReNNSystem(model_name="renn_series", num_classes=4, in_chans=None, image_size=None,
                      data_inputs=data.model_inputs, input_key="series", model_kwargs={"rules": rules}), data


def test_registered_rule_objects_are_saved_by_name(tmp_path: Path) -> None:
    rule = register_rule("plain_hparams_isolated_pause", _PAUSE & ~CountAtLeast(_PREMATURE, 4))
    system, data = _renn(["premature_then_pause", rule])
    assert system.hparams.model_kwargs["rules"] == ["premature_then_pause", "plain_hparams_isolated_pause"]
    assert system.model.rule_layer.rules[1] is rule
    path = _fit(system, data, tmp_path)
    _same_outputs(system, path, torch.randn(2, 1, 128))


def test_unregistered_rule_object_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"not registered.*register_rule\(name, rule\)"):
        _renn(["premature_then_pause", _PAUSE & CountAtLeast(_PREMATURE, 2)])


def test_paths_are_saved_as_strings() -> None:
    """A `pretrained_path=Path(...)` (Backbone takes str | Path) was refused when the System was built (its
    checkpoints could not be read back): the same file, named by a string."""
    from zoo.engine.system import plain_value

    assert plain_value({"model_kwargs": {"pretrained_path": Path("w") / "r.pth"}, "n": (Path("a"),)}) == \
        {"model_kwargs": {"pretrained_path": "w/r.pth"}, "n": ("a",)}


def test_unloadable_hyperparameter_is_refused_when_the_system_is_built() -> None:
    with pytest.raises(ValueError, match="hyperparameter model_kwargs=.*weights_only=True"):
        ZooSystem(model_name="baseline_tinycnn", num_classes=3, model_kwargs={"drop_rate": 0.1, "x": object()})


# registered models whose `reset_classifier` runs on a plain tensor input (detectors and textual models: lists /
# sentences, their own tests); a few small backbones keep it fast
RESET_INPUTS = {
    "baseline_tinycnn": lambda: torch.rand(2, 3, 64, 64),
    "icnn_tinycnn": lambda: torch.rand(2, 3, 64, 64),
    "cbm_tinycnn": lambda: torch.rand(2, 3, 64, 64),
    "protopnet_tinycnn": lambda: torch.rand(2, 3, 64, 64),
    "renn_series": lambda: torch.randn(2, 1, 128),
    "baseline_cnn1d": lambda: torch.randn(2, 1, 128),
    "baseline_lstm": lambda: torch.randn(2, 1, 128),
    "baseline_mlp": lambda: torch.randn(2, 10),
    "baseline_smallcnn": lambda: torch.rand(2, 1, 8, 8),
    "baseline_textcnn": lambda: torch.randint(0, 2000, (2, 16)),
}


def _reset_models() -> list[str]:
    """Every registered model named in RESET_INPUTS or a `*_tinycnn` one: the tiny-CNN of each family."""
    names = [name for name in zoo.list_models() if name in RESET_INPUTS or name.endswith("_tinycnn")]
    return [name for name in names if "rcnn" not in name and not name.startswith("textual_")]


@pytest.mark.parametrize("name", _reset_models())
def test_reset_classifier_keeps_the_models_dtype(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=5).double()
    if not hasattr(model, "reset_classifier"):
        pytest.skip(f"{name} has no reset_classifier")
    model.reset_classifier(3)
    x = RESET_INPUTS.get(name, lambda: torch.rand(2, 3, 64, 64))()
    logits = model.eval()(x.double() if x.is_floating_point() else x)["logits"]
    assert logits.dtype == torch.float64 and logits.shape == (2, 3)
    state = model.state_dict()  # the statistics a new head starts (ICNN's class activation) too
    assert not [key for key, value in state.items() if value.is_floating_point() and value.dtype != torch.float64]
