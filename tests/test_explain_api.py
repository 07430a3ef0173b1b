"""zoo.explain: one call and one map convention for every classifier, and `train.py predict` writing predictions,
class names and the model's own explanations into the run folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import zoo
from tests.conftest import REPO
from zoo.explain.captum import class_activation_map


def check_convention(maps: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert maps.shape == shape and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()


@pytest.mark.parametrize("name", ["baseline_tinycnn", "icnn_tinycnn"])
def test_own_and_captum_maps_share_one_convention(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=3).eval()
    images = torch.rand(4, 3, 64, 64)
    own = zoo.explain(model, images)  # default: the own map of each predicted class
    check_convention(own, (4, 64, 64))
    predicted = model(images)["logits"].argmax(-1)
    torch.testing.assert_close(own, class_activation_map(model, images, predicted))
    torch.testing.assert_close(zoo.explain(model, images, target=2),
                               class_activation_map(model, images, torch.full((4,), 2)))
    for method in ("saliency", "layer_gradcam"):
        check_convention(zoo.explain(model, images, method, target=torch.tensor([0, 1, 2, 0])), (4, 64, 64))
    assert model.training is False


@pytest.mark.parametrize("name", ["baseline_tinycnn", "icnn_tinycnn"])
def test_the_own_map_of_a_bf16_model_is_its_float_cam(name: str) -> None:
    """A bf16 model (`--trainer.precision bf16-true`): the features were cast to float but not the head's weights,
    and the einsum refused the mix. The map is the float CAM of the bf16 features."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=3).eval().to(torch.bfloat16)
    images, target = torch.rand(2, 3, 64, 64, dtype=torch.bfloat16), torch.tensor([0, 2])
    own = zoo.explain(model, images, target=target)
    check_convention(own, (2, 64, 64))
    with torch.no_grad():
        features = model.forward_features(images).float()  # (2, F, h, w)
    weights = model.get_classifier().weight[target].float()  # (2, F)
    raw = torch.einsum("bf,bfhw->bhw", weights, features)
    assert own.amax((1, 2)).tolist() == pytest.approx(raw.relu().amax((1, 2)).tolist(), rel=1e-2, abs=1e-3)


def test_a_system_is_explained_through_its_model() -> None:
    from zoo.baselines.system import ClassifierSystem

    system = ClassifierSystem("baseline_tinycnn", num_classes=3)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(zoo.explain(system, images), zoo.explain(system.model, images))
    assert system.training  # the mode is restored


def test_selectors_and_rule_networks_give_their_own_maps_at_input_resolution() -> None:
    selector = zoo.create_model("l2x_patches", num_classes=2, in_chans=1, image_size=16, patch_size=4, k=3)
    maps = zoo.explain(selector, torch.rand(5, 1, 16, 16))
    check_convention(maps, (5, 16, 16))
    assert torch.equal(maps.flatten(1).sum(1), torch.full((5,), 3 * 16.0))  # k patches of 4x4 pixels kept
    vectors = zoo.create_model("l2x_vector", num_classes=2, num_features=10, k=4)
    check_convention(zoo.explain(vectors, torch.randn(3, 10)), (3, 10))
    check_convention(zoo.explain(vectors, torch.randn(3, 10), "saliency"), (3, 10))
    rules = zoo.create_model("renn_series", num_classes=4, in_chans=1, length=64)
    check_convention(zoo.explain(rules, torch.randn(2, 1, 64)), (2, 64))


def test_a_model_with_its_own_explanation_method_gives_it() -> None:
    """A family's model brings its own map through `own_explanation` (checked before the CAM of pooled heads)."""
    model = zoo.create_model("baseline_tinycnn", num_classes=3).eval()
    seen = []
    model.own_explanation = lambda inputs, target: seen.append(target) or torch.ones(len(inputs), 7, 7)
    maps = zoo.explain(model, torch.rand(2, 3, 64, 64), target=1)
    assert torch.equal(maps, torch.ones(2, 7, 7)) and torch.equal(seen[0], torch.tensor([1, 1]))


def test_unknown_methods_and_models_without_maps_fail_clearly() -> None:
    model = zoo.create_model("baseline_tinycnn", num_classes=3)
    with pytest.raises(ValueError, match="Unknown explanation method 'gradcam'.*'own'"):
        zoo.explain(model, torch.rand(1, 3, 64, 64), "gradcam")
    for name in ("aog_rcnn_tinycnn", "faster_rcnn_tinycnn"):  # refused as detectors before the model runs
        detector = zoo.create_model(name, num_classes=3)
        for target in (0, None):
            with pytest.raises(ValueError, match="AOGRCNN is a detector: it explains with boxes"):
                zoo.explain(detector, torch.rand(1, 3, 128, 128), target=target)
    concepts = zoo.create_model("cbm_tinycnn", num_classes=3)
    with pytest.raises(ValueError, match="ConceptBottleneckModel's own explanation is its concepts.*concept_probs"):
        zoo.explain(concepts, torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_perturbation_methods_explain_each_text_over_its_own_tokens(method: str) -> None:
    """Captum's KernelShap and Lime perturb one example at a time: each text of a batch is attributed over its own
    tokens, exactly as one-text calls drawing the same random numbers in turn (it crashed, or mixed the texts)."""
    torch.manual_seed(0)
    model = zoo.create_model("baseline_textcnn", num_classes=2, vocab_size=50, max_len=12).eval()
    tokens = torch.randint(2, 50, (5, 12))  # 5 texts: 25 KernelShap samples are a multiple, the case that ran wrong
    torch.manual_seed(1)
    batched = zoo.explain(model, tokens, method, target=1)
    torch.manual_seed(1)
    one_by_one = torch.cat([zoo.explain(model, tokens[i:i + 1], method, target=1) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one)
    check_convention(zoo.explain(model, tokens[:3], method), (3, 12))  # 3 texts: 25 samples were no multiple


def test_series_models_are_explained_per_time_step_by_captum() -> None:
    """Series (B, C, T) take the feature methods, one feature per time step over all channels: saliency is the
    input gradient's |.| summed over channels."""
    torch.manual_seed(0)
    model = zoo.create_model("baseline_cnn1d", num_classes=4, in_chans=2, length=32).eval()
    series = torch.randn(3, 2, 32, requires_grad=True)
    model(series)["logits"][:, 2].sum().backward()
    torch.testing.assert_close(zoo.explain(model, series.detach(), "saliency", target=2), series.grad.abs().sum(1))
    for method in ("integrated_gradients", "kernel_shap"):
        check_convention(zoo.explain(model, series.detach(), method), (3, 32))
    with pytest.raises(ValueError, match="SeriesCNN has no own explanation map"):
        zoo.explain(model, series.detach())


def test_perturbation_methods_perturb_series_in_segments_with_the_samples_asked_for(monkeypatch) -> None:
    """`segment`: KernelShap and Lime perturb that many consecutive time steps as one feature (each step gets its
    segment's attribution over the segment's length, the last segment shorter); `n_samples` reaches Captum; gradient
    methods still score every step; a segment that is no whole number >= 1 is refused."""
    import captum.attr

    torch.manual_seed(0)
    model = zoo.create_model("baseline_cnn1d", num_classes=4, in_chans=2, length=30).eval()
    series = torch.randn(2, 2, 30)
    asked = []
    attribute = captum.attr.Lime.attribute
    monkeypatch.setattr(captum.attr.Lime, "attribute",
                        lambda self, *args, **kwargs: asked.append(kwargs) or attribute(self, *args, **kwargs))
    maps = zoo.explain(model, series, "lime", target=1, n_samples=80, segment=4)  # (2, 30): 7 segments of 4, one of 2
    check_convention(maps, (2, 30))
    assert asked[0]["n_samples"] == 80 and asked[0]["feature_mask"].flatten().tolist() == [i // 4 for i in range(30)]
    segments = torch.cat([maps, maps[:, -1:].expand(2, 2)], 1).view(2, 8, 4)  # the short last segment padded
    torch.testing.assert_close(segments, segments[..., :1].expand_as(segments))  # one value per segment
    torch.testing.assert_close(zoo.explain(model, series, "saliency", target=1, segment=4),
                               zoo.explain(model, series, "saliency", target=1))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="segment must be a whole number"):
            zoo.explain(model, series, "lime", target=1, segment=bad)


def test_gradient_methods_reach_a_selectors_predictor_through_its_embeddings() -> None:
    """L2X on tokens predicts from its approximator's embeddings of the selected tokens: the token presences scale
    every embedding of the text, so gradients reach the selected positions (none reached the scorer's alone)."""
    torch.manual_seed(0)
    model = zoo.create_model("l2x_tokens", num_classes=2, vocab_size=60, max_len=16, k=4).eval()
    tokens = torch.randint(2, 60, (2, 16))
    selected = model(tokens)["selection"] > 0.5
    for method in ("saliency", "input_x_gradient"):  # at presence 1: the selection itself
        maps = zoo.explain(model, tokens, method)
        check_convention(maps, (2, 16))
        assert (maps[selected] > 0).all() and (maps[~selected] == 0).all(), method
    # IG's path scales the scorer's view too, so the selection moves along it: every selected position still counts
    maps = zoo.explain(model, tokens, "integrated_gradients")
    check_convention(maps, (2, 16))
    assert (maps[selected] > 0).all()


def test_inputs_targets_and_methods_a_model_cannot_take_fail_clearly() -> None:
    model = zoo.create_model("baseline_tinycnn", num_classes=3)
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"target holds class ids \[-1, 10\], outside \[0, 3\)"):
        zoo.explain(model, images, target=torch.tensor([10, -1]))
    with pytest.raises(ValueError, match="one class id or 2 ids"):
        zoo.explain(model, images, target=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="ProtoPNet has no pooled head for layer_gradcam"):
        zoo.explain(zoo.create_model("protopnet_tinycnn", num_classes=3), images, "layer_gradcam")
    with pytest.raises(ValueError, match="ExplanationModel takes more than the inputs"):
        zoo.explain(zoo.create_model("textual_explanation"), images)
    with pytest.raises(ValueError, match="got a list"):
        zoo.explain(zoo.create_model("aog_rcnn_tinycnn", num_classes=3), [images[0]])


def test_predict_writes_predictions_with_class_names_and_explanation_pictures(image_folder_root: Path,
                                                                             in_tmp_dir: Path) -> None:
    from train import main

    fit_args = ["--config", str(REPO / "configs/baselines/image_folder.yaml"),
                f"--data.init_args.root={image_folder_root}", "--data.init_args.image_size=32",
                "--model.init_args.model_name=baseline_tinycnn", "--trainer.logger.init_args.name=run"]
    main(["fit", *fit_args, "--trainer.max_epochs=1"])
    run = in_tmp_dir / "checkpoints" / "run"
    main(["predict", *fit_args, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    with (run / "predictions" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == ["val/cat/0.png", "val/cat/1.jpg", "val/dog/0.png", "val/dog/1.jpg"]
    assert [row["label_name"] for row in rows] == ["cat", "cat", "dog", "dog"]
    for row in rows:
        assert row["pred_name"] == ["cat", "dog"][int(row["pred"])] and 0.5 <= float(row["probability"]) <= 1
    assert sorted(p.name for p in (run / "predictions").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "kernel_shap"])
def test_a_bf16_token_model_is_explained_by_captum(method: str) -> None:
    """The token presences Captum perturbs are float32: they made a bf16 model's embeddings float32 and its
    convolution refused them ("Input type (float) and bias type (c10::BFloat16) should be the same")."""
    torch.manual_seed(0)
    model = zoo.create_model("baseline_textcnn", num_classes=2, vocab_size=50, max_len=12).eval()
    tokens = torch.randint(2, 50, (2, 12))
    maps = zoo.explain(model.to(torch.bfloat16), tokens, method, target=1)
    check_convention(maps, (2, 12))


def test_gradient_methods_explain_under_inference_mode_as_outside_it() -> None:
    """Lightning validates, tests and predicts under `torch.inference_mode()`, which `torch.enable_grad()` does not
    lift: a callback's zoo.explain(..., "saliency") crashed ("element 0 of tensors does not require grad"). The maps
    are those of a call outside it, exactly."""
    torch.manual_seed(0)
    cases = [(zoo.create_model("baseline_tinycnn", num_classes=3).eval(), torch.rand(2, 3, 32, 32),
              ("saliency", "integrated_gradients", "layer_gradcam")),
             (zoo.create_model("baseline_cnn1d", num_classes=4, in_chans=2, length=16).eval(), torch.randn(2, 2, 16),
              ("saliency", "deeplift")),
             (zoo.create_model("l2x_vector", num_classes=2, num_features=10, k=4).eval(), torch.randn(2, 10),
              ("input_x_gradient", "integrated_gradients"))]
    for model, inputs, methods in cases:
        for method in methods:
            expected = zoo.explain(model, inputs, method, target=1)
            with torch.inference_mode():
                maps = zoo.explain(model, inputs.clone(), method, target=torch.tensor(1))  # an inference tensor
            assert torch.equal(maps, expected), method


def test_explain_restores_every_modules_train_flag_also_when_it_fails() -> None:
    """A part kept in eval mode in a training model (a frozen detector's BatchNorm in ReNN's `global` stage) stays in
    eval mode after zoo.explain: `net.train(was_training)` set it training again, and the next step updated its
    running statistics. The flags are restored when the explanation fails too."""
    model = zoo.create_model("baseline_tinycnn", num_classes=3).train()
    model.backbone.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    zoo.explain(model, torch.rand(2, 3, 32, 32), "saliency")
    assert {name: module.training for name, module in model.named_modules()} == modes
    model.own_explanation = lambda inputs, target: 1 / 0
    with pytest.raises(ZeroDivisionError):
        zoo.explain(model, torch.rand(2, 3, 32, 32), target=0)
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_a_sample_count_that_is_no_whole_number_of_at_least_one_is_refused_by_name() -> None:
    """n_samples 0 or -1 failed inside Captum ("torch.cat(): expected a non-empty list"), True passed as 1."""
    model = zoo.create_model("l2x_vector", num_classes=2, num_features=10, k=4).eval()
    for bad in (0, -1, True, 2.5, "50"):
        with pytest.raises(ValueError, match=rf"n_samples .* must be a whole number >= 1; got {bad!r}"):
            zoo.explain(model, torch.randn(2, 10), "lime", target=1, n_samples=bad)


def test_inputs_of_the_wrong_shape_are_named_by_what_is_wrong() -> None:
    """An image without its batch dimension reads as a series: "occlusion" (an image method) said "Unknown explanation
    method". A shape error names the dtype only when the dtype is wrong ("(dtype float expected)" under a float
    tensor read as the mistake). The textual model's explain checks its images before the labels, whose expected
    shape (B,) it read from an unbatched image's channels ("expects labels of shape (3)")."""
    model = zoo.create_model("baseline_tinycnn", num_classes=3)
    with pytest.raises(ValueError, match=r"'occlusion' explains images of shape \(B, C, H, W\); got shape "
                                         r"\(3, 64, 64\).*batch dimension\? pass images\[None\]"):
        zoo.explain(model, torch.rand(3, 64, 64), "occlusion")
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\); got \(2, 1, 32, 32\) "
                                         r"torch.float32\.$"):
        zoo.explain(model, torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got \(2, 3, 32, 32\) torch.int64 \(dtype float expected\)\.$"):
        zoo.explain(model, torch.ones(2, 3, 32, 32, dtype=torch.long))
    textual = zoo.create_model("textual_explanation", num_classes=6, image_size=32)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, C, H, W\); got \(3, 32, 32\)"):
        textual.explain(torch.rand(3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expects labels of shape \(2\); got \(1,\) torch.int64\.$"):
        textual.explain(torch.rand(2, 3, 32, 32), torch.tensor([1]))
