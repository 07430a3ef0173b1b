"""The zoo used as a library: Systems built in Python and fitted with a plain `pl.Trainer`, without train.py's links.

Each family System defaults to its own model (visible in its signature, as LightningCLI reads it) and refuses
another family's by name; a System built for other data than the trainer's datamodule is refused at setup, and takes
the datamodule's class names where it was given none; ProtoPNet warns when no stage of a fit pushes.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import pytorch_lightning as pl
import torch

from datamodules._base import DataSettingError
from datamodules.parts_world import PartsWorldDataModule
from zoo.baselines.system import ClassifierSystem
from zoo.cbm.system import CBMSystem
from zoo.icnn.system import ICNNSystem
from zoo.protopnet.system import ProtoPNetSystem
from zoo.renn.system import ReNNSystem

PUSH_WARNING = "no prototype is ever pushed"


def tiny_trainer(**kwargs) -> pl.Trainer:
    settings = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**(settings | kwargs))


def tiny_parts(**kwargs) -> PartsWorldDataModule:
    return PartsWorldDataModule(**({"num_train": 8, "num_val": 8, "num_test": 8, "batch_size": 8} | kwargs))


# ----------------------------------------------------------------------------------- each family's own model
@pytest.mark.parametrize("system_class, model_name", [(ICNNSystem, "icnn_tinycnn"), (ReNNSystem, "renn_series"),
                                                      (CBMSystem, "cbm_tinycnn"),
                                                      (ProtoPNetSystem, "protopnet_tinycnn")])
def test_family_system_defaults_to_its_own_model(system_class, model_name):
    assert inspect.signature(system_class).parameters["model_name"].default == model_name  # what the CLI reads
    system = system_class()
    assert system.hparams.model_name == model_name
    assert type(system.model).__name__ != "OpaqueClassifier"


def test_icnn_and_renn_defaults_train_their_own_loss():
    assert type(ICNNSystem().loss).__name__ == "FilterPartLoss"
    assert hasattr(ReNNSystem().model, "rule_names")


def test_renn_series_system_defaults_to_the_series_channels():
    """The series System's in_chans is None by default (the CLI links a series datamodule's num_channels None)."""
    assert inspect.signature(ReNNSystem).parameters["in_chans"].default is None
    system = ReNNSystem(model_name="renn_series", input_key="series", num_classes=4)
    out = system.model(torch.randn(2, 1, 256))  # (B, 1, T): rule_series' one channel
    assert out["logits"].shape == (2, 4)


@pytest.mark.parametrize("system_class, needs", [(CBMSystem, "CBMSystem needs a concept bottleneck model"),
                                                 (ProtoPNetSystem, "ProtoPNetSystem needs a ProtoPNet model")])
def test_family_system_refuses_another_familys_model_by_name(system_class, needs):
    with pytest.raises(ValueError, match=f"{needs}.*got baseline_tinycnn"):
        system_class(model_name="baseline_tinycnn", num_classes=6)


# ------------------------------------------------------------------------------- data settings at setup
def test_system_built_for_other_data_is_refused_at_setup():
    system = ClassifierSystem(model_name="baseline_tinycnn")  # 10 classes, 64 pixels: the System's defaults
    with pytest.raises(DataSettingError, match=r"num_classes=10 but the data's num_classes is 6.*image_size=64 "
                                               r"but the data's image_size is 32.*num_classes=dm.num_classes"):
        tiny_trainer().fit(system, datamodule=tiny_parts(num_classes=6, image_size=32))


def test_system_takes_the_datamodules_class_names():
    data = tiny_parts(num_classes=6, image_size=32)
    system = ClassifierSystem(model_name="baseline_tinycnn", num_classes=6, image_size=32)
    tiny_trainer().validate(system, datamodule=data, verbose=False)
    assert system.hparams.class_names == data.class_names == [f"class {c}" for c in range(6)]
    assert system.class_names == data.class_names


def test_series_data_inputs_are_checked_against_the_datamodules():
    from datamodules.rule_series import RuleSeriesDataModule

    data = RuleSeriesDataModule(num_train=8, num_val=8, num_test=8, batch_size=8)
    system = ReNNSystem(model_name="renn_series", num_classes=4, input_key="series",
                        data_inputs={"in_chans": 1, "length": 128})  # the data's series are 256 steps long
    with pytest.raises(DataSettingError, match=r"data_inputs\['length'\]=128 but the data's model_inputs\['length'\] "
                                               r"is 256.*data_inputs=dm.model_inputs"):
        tiny_trainer().validate(system, datamodule=data, verbose=False)


# ----------------------------------------------------------------------------------------- ProtoPNet push
@pytest.mark.parametrize("kwargs, warned", [({}, True), ({"push_stages": []}, False),
                                            ({"model_kwargs": {"head": "linear"}}, False)])
def test_protopnet_warns_when_no_stage_pushes(kwargs, warned):
    system = ProtoPNetSystem(model_name="protopnet_tinycnn", num_classes=6, image_size=32, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(limit_val_batches=0).fit(system, datamodule=tiny_parts(num_classes=6, image_size=32))
    assert any(PUSH_WARNING in str(w.message) for w in caught) == warned
