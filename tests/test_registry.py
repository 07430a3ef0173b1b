"""The registry contract, checked for every registered model with tiny inputs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import zoo
from zoo.baselines.model import OpaqueClassifier
from zoo.registry import _model_factories, _model_to_module

NUM_CLASSES = 5
# Models without an image backbone, with an example input each: checked by `test_small_model_contract`.
SMALL_MODEL_INPUTS = {
    "baseline_mlp": lambda: torch.randn(4, 10),
    "baseline_smallcnn": lambda: torch.rand(4, 1, 8, 8),
    "baseline_textcnn": lambda: torch.randint(0, 2000, (4, 16)),
    "l2x_vector": lambda: torch.randn(4, 10),
    "l2x_patches": lambda: torch.rand(4, 1, 8, 8),
    "l2x_tokens": lambda: torch.randint(1, 2000, (4, 64)),
    "invase_vector": lambda: torch.randn(4, 10),
    "invase_patches": lambda: torch.rand(4, 1, 8, 8),
    "baseline_cnn1d": lambda: torch.randn(4, 1, 128),
    "baseline_lstm": lambda: torch.randn(4, 1, 128),
    "renn_series": lambda: torch.randn(4, 1, 128),
}
# Detectors take lists of images and targets: their contract is in tests/test_aog_rcnn.py.
DETECTOR_MODELS = zoo.list_models("*_rcnn_*")
# Textual explanation models take images, labels and sentences: their contract is in tests/test_textual.py.
TEXTUAL_MODELS = zoo.list_models("textual_*")
BACKBONE_MODELS = [name for name in zoo.list_models() if name not in SMALL_MODEL_INPUTS and
                   name not in DETECTOR_MODELS and name not in TEXTUAL_MODELS]


def tiny_input(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(2, model.backbone.in_chans, 64, 64)  # 64: stride-32 nets keep a 2x2 map for BN


@pytest.fixture(scope="module", params=BACKBONE_MODELS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(request.param, num_classes=NUM_CLASSES)


def test_forward_contract(model: nn.Module) -> None:
    out = model(tiny_input(model))
    assert isinstance(out, dict) and out["logits"].shape == (2, NUM_CLASSES)
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))
    features = model.forward_features(tiny_input(model))
    assert features.ndim == 4 and features.shape[1] == model.backbone.num_features
    assert torch.equal(model.forward_head(features), out["logits"])


def test_timm_head_api(model: nn.Module) -> None:
    """timm's head API: `get_classifier()` is the layer that turns `forward_head(features, pre_logits=True)` into
    the logits (dropout off)."""
    model.eval()
    with torch.no_grad():
        features = model.forward_features(tiny_input(model))
        pre = model.forward_head(features, pre_logits=True)
        classifier = model.get_classifier()
        assert isinstance(classifier, nn.Linear) and classifier.out_features == NUM_CLASSES
        assert pre.shape == (2, classifier.in_features)
        torch.testing.assert_close(classifier(pre), model.forward_head(features))
    model.train()


def test_every_parameter_gets_a_gradient(model: nn.Module) -> None:
    # timm zero-initialises the last BN gamma of residual blocks, which blocks gradient into the branch at init.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
    model.zero_grad()
    model(tiny_input(model))["logits"].square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad


def test_reset_classifier(model: nn.Module) -> None:
    model.reset_classifier(3)
    assert model(tiny_input(model))["logits"].shape == (2, 3)
    model.reset_classifier(NUM_CLASSES)


def test_wrong_channel_count_is_a_clear_error(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\); got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="Unknown model 'baseline_resnet19'.*baseline_resnet18"):
        zoo.create_model("baseline_resnet19")


def test_duplicate_registration_raises() -> None:
    def baseline_tinycnn() -> nn.Module:  # same name as a registered factory
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model(baseline_tinycnn)
    assert _model_factories["baseline_tinycnn"] is not baseline_tinycnn


def test_list_models_wildcards_and_create_drops_none() -> None:
    assert zoo.list_models("baseline_*") == sorted(n for n in zoo.list_models() if n.startswith("baseline_"))
    assert zoo.list_models("nothing_*") == []
    model = zoo.create_model("baseline_tinycnn", num_classes=4, drop_rate=None)  # None -> factory default
    assert model.head.drop.p == 0.0 and model.num_classes == 4


def test_any_timm_backbone_and_in_chans() -> None:
    model = zoo.create_model("baseline_timm", backbone="mobilenetv3_small_050", num_classes=3, in_chans=1)
    assert model(torch.rand(2, 1, 32, 32))["logits"].shape == (2, 3)
    with pytest.raises(ValueError, match="Unknown backbone 'resnet181'.*resnet18"):
        zoo.create_model("baseline_timm", backbone="resnet181")


@pytest.mark.parametrize("name", sorted(SMALL_MODEL_INPUTS))
def test_small_model_contract(name: str) -> None:
    """Registered, dict out with (B, C) logits, finite, every trainable parameter reached by the gradient of the
    outputs the model is trained with, and a clear error for a wrongly shaped input."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=NUM_CLASSES).train()
    x = SMALL_MODEL_INPUTS[name]()
    out = model(x)
    assert out["logits"].shape == (4, NUM_CLASSES)
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))
    trained = [out["logits"]] + [out[k] for k in ("baseline_logits", "selection_probs", "pattern_logits") if k in out]
    if "scores" in out and name.startswith("l2x"):
        trained = [out["logits"]]  # the Concrete sample carries the explainer's gradient through the approximator
    sum(t.square().sum() for t in trained).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad
    wrong = x.float() if x.dtype == torch.long else x[:, :3] if x.ndim == 2 else torch.cat([x, x], 1)  # 2 channels
    with pytest.raises(ValueError, match="expects"):
        model(wrong)


def test_every_registered_model_has_a_contract() -> None:
    assert set(BACKBONE_MODELS) | set(SMALL_MODEL_INPUTS) | set(DETECTOR_MODELS) | set(TEXTUAL_MODELS) == set(
        zoo.list_models())
    # every family package is found and registers models under its own name (a new family touches no engine file)
    assert {zoo.model_family(name) for name in zoo.list_models()} == set(zoo.FAMILIES)


def test_list_models_takes_timms_arguments() -> None:
    """timm's filter / exclude_filters (a pattern or a list) and pretrained; a list raised `unhashable type`."""
    icnn = zoo.list_models("icnn_*")
    assert icnn and all(n.startswith("icnn_") for n in icnn)
    both = zoo.list_models(["icnn_*", "l2x_*"], exclude_filters="*_tinycnn")
    assert set(both) == {n for n in zoo.list_models() if n.startswith(("icnn_", "l2x_")) and
                         not n.endswith("_tinycnn")}
    assert zoo.list_models(pretrained=True) == []


@pytest.mark.parametrize("name, key, value", [("icnn_tinycnn", "masks", "maybe"), ("icnn_tinycnn", "num_classes", True),
                                              ("l2x_vector", "k", 2.5), ("protopnet_tinycnn", "prototypes_per_class",
                                                                         "10")])
def test_a_setting_of_the_wrong_plain_type_is_refused(name: str, key: str, value: object) -> None:
    """From a config or an ablation grid, `masks: maybe` is a truthy string: the model was built with masks on, and
    the grid's two points trained the same model."""
    with pytest.raises(ValueError, match=f"{key} must be"):
        zoo.create_model(name, **{key: value})
    zoo.create_model("icnn_tinycnn", tau_scale=16)  # an int for a float is fine
    zoo.create_model("icnn_tinycnn", num_classes=np.int64(3), tau_scale=np.float32(8))  # and NumPy's numbers


@pytest.fixture
def readme_style_factories() -> Iterator[tuple[str, str]]:
    """Two factories of the same model registered for the test (and unregistered after): one written as README's
    guide first showed it (`def f(**kwargs):`, no return annotation), one annotated with the class it builds."""
    def x_readme_style(**kwargs):  # unannotated on purpose
        """A factory as the guide wrote it."""
        return OpaqueClassifier(backbone="tinycnn", **kwargs)

    def x_annotated_style(**kwargs: Any) -> OpaqueClassifier:
        """The same factory, annotated."""
        return OpaqueClassifier(backbone="tinycnn", **kwargs)

    names = (x_readme_style.__name__, x_annotated_style.__name__)
    zoo.register_model(x_readme_style)
    zoo.register_model(x_annotated_style)
    try:
        yield names
    finally:
        for name in names:
            _model_factories.pop(name, None)
            _model_to_module.pop(name, None)


def test_a_factory_without_a_return_annotation_checks_argument_types_alike(
        readme_style_factories: tuple[str, str]) -> None:
    """The type check found the model class through the factory's return annotation only: a factory written as the
    guide showed (no annotation) built a frozen backbone from `freeze_backbone="false"`, silently. Both factories
    now refuse it with the same message; a wrong type the model's constructor itself trips on (`drop_rate="0.5"`)
    is named too, not torch's comparison error; and both take the same arguments (what compare passes a twin)."""
    for name in readme_style_factories:
        with pytest.raises(ValueError, match=r"freeze_backbone must be bool; got 'false' \(str\)"):
            zoo.create_model(name, num_classes=3, freeze_backbone="false")
        with pytest.raises(ValueError, match=r"drop_rate must be float; got '0.5' \(str\)"):
            zoo.create_model(name, num_classes=3, drop_rate="0.5")
        model = zoo.create_model(name, num_classes=3, freeze_backbone=False, drop_rate=0)
        assert all(p.requires_grad for p in model.backbone.parameters())
    from zoo.registry import model_arguments

    unannotated, annotated = readme_style_factories
    assert {"freeze_backbone", "drop_rate", "pretrained_path"} <= set(model_arguments(unannotated))
    assert set(model_arguments(unannotated)) == set(model_arguments(annotated))


@pytest.mark.parametrize("name, data_inputs, kind", [
    ("baseline_smallcnn", {"num_features": 10}, "num_features=10.*Models that take num_features: baseline_mlp, "
                                                 "invase_vector, l2x_vector"),
    ("l2x_patches", {"num_features": 10}, "num_features=10.*Models that take num_features: invase_vector, "
                                           "l2x_vector, baseline_mlp"),  # the refused model's family first
    ("baseline_mlp", {"vocab_size": 50, "max_len": 8}, "vocab_size=50, max_len=8.*Models that take vocab_size "
                                                        "and max_len: baseline_textcnn, l2x_tokens")],
    ids=["smallcnn-on-vectors", "patches-on-vectors", "mlp-on-tokens"])
def test_a_size_the_data_gives_is_named_as_the_data_not_a_model_kwarg(name: str, data_inputs: dict[str, int],
                                                                      kind: str) -> None:
    """`--model.init_args.black_box baseline_smallcnn` on the L2X vector data said "baseline_smallcnn: unknown argument
    'num_features' (model_kwargs). Did you mean 'num_classes'?": the user gave no num_features, the datamodule's
    model_inputs did. Now: the model does not take this kind of data, and which models do."""
    from zoo.registry import create_model_for_data

    with pytest.raises(ValueError, match=rf"^{name} does not take this kind of data: the data gives {kind}") as error:
        create_model_for_data(name, 2, None, None, data_inputs, None)
    assert "unknown argument" not in str(error.value) and "Did you mean" not in str(error.value)
    first = next(iter(data_inputs))  # the same key given by the user in model_kwargs: the user's mistake, as before
    with pytest.raises(ValueError, match=rf"{name}: unknown argument '{first}' \(model_kwargs\)"):
        create_model_for_data(name, 2, None, None, None, {first: data_inputs[first]})
