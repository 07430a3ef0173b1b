"""timm's model API as the zoo keeps it: `num_features`, `reset_classifier(num_classes, global_pool=None)` (a
refused reset changes nothing), `list_models(module=...)`, RGB-only first-convolution adaptation of pretrained files,
and the settings that used to be taken silently (ICNN's `added_filters=0`). Tiny models, no training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn

import zoo
from zoo.backbones import Backbone
from zoo.weights import CheckpointError

# A tiny model of each kind of head, with an example input and the layer that turns the head's input into logits.
IMAGE = lambda: torch.rand(2, 3, 64, 64)  # noqa: E731
SERIES = lambda: torch.randn(2, 1, 64)  # noqa: E731
HEADS: dict[str, tuple[dict, Callable[[], torch.Tensor], Callable[[nn.Module], nn.Linear]]] = {
    "baseline_tinycnn": ({}, IMAGE, lambda m: m.get_classifier()),
    "icnn_tinycnn": ({"added_filters": 16}, IMAGE, lambda m: m.get_classifier()),
    "cbm_tinycnn": ({}, IMAGE, lambda m: m.get_classifier()),
    "cem_tinycnn": ({"embedding_size": 4}, IMAGE, lambda m: m.get_classifier()),
    "protopnet_tinycnn": ({"prototypes_per_class": 2, "prototype_channels": 8}, IMAGE, lambda m: m.get_classifier()),
    "protopnet_tinycnn/linear": ({"head": "linear", "prototype_channels": 8}, IMAGE, lambda m: m.get_classifier()),
    "renn_series": ({}, SERIES, lambda m: m.head.fc),
    "baseline_mlp": ({"num_features": 7, "hidden": (6,)}, lambda: torch.randn(2, 7), lambda m: m.head),
    "baseline_smallcnn": ({}, lambda: torch.rand(2, 1, 8, 8), lambda m: m.head),
    "baseline_cnn1d": ({"width": 8}, SERIES, lambda m: m.head),
    "baseline_lstm": ({"hidden": 8}, SERIES, lambda m: m.head),
    "baseline_textcnn": ({"vocab_size": 50, "width": 8}, lambda: torch.randint(1, 50, (2, 9)), lambda m: m.head),
}


def build(key: str, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(key.partition("/")[0], num_classes=num_classes, **HEADS[key][0])


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything a reset could touch: class count, every tensor's shape and value."""
    return {"num_classes": model.num_classes, **{k: v.clone() for k, v in model.state_dict().items()}}


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)  # NaN: unset Z_T
        else:
            assert value == after[key], key


def test_a_refused_icnn_reset_changes_nothing() -> None:
    """single_category 3 is no class of a 2-class head: refused before the head, the class count or the filters'
    statistics change (the head was swapped, then the filters refused: a model half for 2 classes, half for 5)."""
    model = zoo.create_model("icnn_tinycnn", num_classes=5, single_category=3, added_filters=16)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"single_category 3 is no class id of a 2-class head"):
        model.reset_classifier(2)
    assert_same(before, snapshot(model))
    assert model.head.fc.out_features == 5 and model(IMAGE())["logits"].shape == (2, 5)
    model.reset_classifier(4)  # class 3 is one of 4: the head and the filter statistics follow
    assert model.num_classes == 4 and model.head.fc.out_features == 4
    assert all(layer.class_activation.shape[1] == 4 and (layer.filter_category == 3).all()
               for layer in model.interpretable_layers())


@pytest.mark.parametrize("key", sorted(HEADS))
def test_reset_classifier_takes_timms_global_pool_and_a_refusal_changes_nothing(key: str) -> None:
    """timm's `reset_classifier(num_classes, global_pool=None)`: None or the model's own pool (`pool_type`) is
    taken; another pool is refused by name before anything changes."""
    model = build(key)
    before = snapshot(model)
    other = "max" if model.pool_type != "max" else "avg"
    with pytest.raises(ValueError, match=rf"reset_classifier\(global_pool='{other}'\): its head pools with "
                                         rf"'{model.pool_type}'.*pass global_pool=None or '{model.pool_type}'"):
        model.reset_classifier(3, global_pool=other)
    assert_same(before, snapshot(model))
    model.reset_classifier(3, global_pool=model.pool_type)
    assert model.num_classes == 3 and model.eval()(HEADS[key][1]())["logits"].shape == (2, 3)
    model.reset_classifier(2, None)
    assert model.num_classes == 2 and model(HEADS[key][1]())["logits"].shape == (2, 2)


@pytest.mark.parametrize("key", sorted(HEADS))
def test_num_features_is_the_width_the_classifier_reads(key: str) -> None:
    """timm's `num_features`: ``nn.Linear(model.num_features, k)`` fits what the classifier reads
    (`forward_head(pre_logits=True)` where the model has it), also after a new head. The vector models' own
    `num_features` setting (the input's size, as L2X's and INVASE's) keeps its meaning."""
    model = build(key).eval()
    classifier = HEADS[key][2]
    for num_classes in (4, 3):
        model.reset_classifier(num_classes)
        if key == "baseline_mlp":  # the setting: d, the input's size; the classifier reads the hidden layer
            assert model.num_features == 7 and classifier(model).in_features == 6
            continue
        assert model.num_features == classifier(model).in_features
        if hasattr(model, "forward_head"):
            with torch.no_grad():
                pre = model.forward_head(model.forward_features(HEADS[key][1]()), pre_logits=True)
            assert pre.shape == (2, model.num_features)
            assert nn.Linear(model.num_features, 5)(pre).shape == (2, 5)
    for name in ("l2x_vector", "invase_vector"):
        assert zoo.create_model(name, num_features=7).num_features == 7
    sentences = zoo.create_model("textual_sentence_classifier", num_classes=3, hidden=12, embed_dim=8)
    assert sentences.num_classes == 3 and sentences.num_features == 12 == sentences.head.in_features


def test_reset_classifier_0_points_to_forward_features_only_where_the_model_has_it() -> None:
    with pytest.raises(ValueError, match=r"num_classes >= 1; got 0 .*use forward_features for features alone"):
        build("baseline_tinycnn").reset_classifier(0)
    for key in ("baseline_mlp", "renn_series", "baseline_cnn1d", "baseline_lstm", "baseline_smallcnn",
                "baseline_textcnn"):
        model = build(key)
        assert not hasattr(model, "forward_features")
        with pytest.raises(ValueError, match=r"reset_classifier needs num_classes >= 1; got 0") as refused:
            model.reset_classifier(0)
        assert "forward_features" not in str(refused.value)


def test_list_models_filters_by_family_as_timms_module() -> None:
    icnn = zoo.list_models(module="icnn")
    assert icnn == sorted(n for n in zoo.list_models() if zoo.model_family(n) == "icnn") and icnn
    assert zoo.list_models(module=["cbm", "zoo.renn"]) == sorted(
        n for n in zoo.list_models() if zoo.model_family(n) in ("cbm", "renn"))
    assert zoo.list_models("*_tinycnn", module="icnn") == ["icnn_tinycnn"]
    assert zoo.list_models(module="icnn", exclude_filters="*_tinycnn") == [n for n in icnn if n != "icnn_tinycnn"]
    with pytest.raises(ValueError, match=r"module='icn'\): no family 'icn'; the families are .*icnn"):
        zoo.list_models(module="icn")


def test_only_rgb_first_convolutions_are_adapted(tmp_path: Path) -> None:
    """timm's adapt_input_conv assumes RGB files: a 2-channel file was summed into a grey model, silently. Only a
    3-channel file is adapted; another one is a shape mismatch that says which in_chans the file needs."""
    torch.save(Backbone("tinycnn", in_chans=2).body.state_dict(), tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches .*the file's first convolution takes 2 input "
                                              r"channels where this model's takes 1: .*in_chans=2 for a plain stem"):
        zoo.create_model("baseline_tinycnn", in_chans=1, pretrained_path=str(tmp_path / "two.pth"))
    assert zoo.create_model("baseline_tinycnn", in_chans=2, pretrained_path=str(tmp_path / "two.pth"))
    torch.save(Backbone("tinycnn", in_chans=3).body.state_dict(), tmp_path / "rgb.pth")
    grey = zoo.create_model("baseline_tinycnn", in_chans=1, pretrained_path=str(tmp_path / "rgb.pth"))
    assert grey.backbone.load_report.adapted and "3 -> 1 input channels" in grey.backbone.load_report.adapted[0]


def test_icnn_added_filters_0_is_said_and_read_as_none(tmp_path: Path) -> None:
    """`added_filters or top_filters` built the top stage's width (128) for 0, silently; None means that. 0 is warned
    of and read as None (refusing it refused every checkpoint written with it), other values below 1 are refused."""
    from zoo.icnn.system import ICNNSystem

    with pytest.warns(UserWarning, match=r"added_filters=0 builds as many added filters as the backbone's top stage"):
        assert zoo.create_model("icnn_tinycnn", added_filters=0).added_conv.out_channels == 128
    with pytest.raises(ValueError, match=r"added_filters \(the added conv layer's filters\) must be an integer >= 1, "
                                         r"or None .*; got -2"):
        zoo.create_model("icnn_tinycnn", added_filters=-2)
    assert zoo.create_model("icnn_tinycnn", added_filters=None).added_conv.out_channels == 128  # the top width
    assert zoo.create_model("icnn_tinycnn", added_filters=8).num_features == 8
    with pytest.warns(UserWarning, match="added_filters=0"):  # a checkpoint written with 0 loads
        system = ICNNSystem("icnn_tinycnn", num_classes=3, image_size=64, model_kwargs={"added_filters": 0})
    checkpoint = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
                  "pytorch-lightning_version": pl.__version__}
    torch.save(checkpoint, tmp_path / "icnn.ckpt")
    with pytest.warns(UserWarning, match="added_filters=0"):
        ICNNSystem.load_from_checkpoint(tmp_path / "icnn.ckpt")
