"""Deletion/insertion AUC, pointing game and attribution mass on hand-made models with known answers."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

import zoo
from zoo.explain.captum import POSTHOC_METHODS, class_activation_map, explain
from zoo.explain.faithfulness import AttributionInMask, DeletionAUC, InsertionAUC, auc

KEY = torch.zeros(8, 8, dtype=torch.bool)
KEY[0, :] = True  # the 8 pixels the toy model looks at


def key_pixel_model(images: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax gives p(class 0) = mean value of the key pixels (channel 0), clipped to (0, 1)."""
    p = images[:, 0][:, KEY].mean(1).clamp(1e-6, 1 - 1e-6)
    return torch.stack([p.log(), (1 - p).log()], 1)


def test_auc_is_the_normalised_trapezoid() -> None:
    assert auc(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(0.125)
    assert auc(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])).item() == pytest.approx(0.875)


def test_deletion_rewards_the_saliency_that_finds_the_key_pixels() -> None:
    images = torch.ones(2, 1, 8, 8)
    ramp = torch.linspace(0, 0.1, 64).view(8, 8)  # breaks ties so the order is known
    good = KEY.float().expand(2, -1, -1) + ramp  # key pixels first
    bad = (~KEY).float().expand(2, -1, -1) + ramp  # key pixels last
    target = torch.zeros(2, dtype=torch.long)
    scores = {}
    for name, saliency in (("good", good), ("bad", bad)):
        metric = DeletionAUC(step=8)
        metric.update(key_pixel_model, images, saliency, target)
        scores[name] = metric.compute().item()
    # good: p = [1, 0 x 8] -> 0.5 / 8; bad: p = [1 x 8, 0] -> 7.5 / 8
    assert scores == pytest.approx({"good": 0.5 / 8, "bad": 7.5 / 8}, abs=1e-5)
    with pytest.raises(ValueError, match=r"saliency must be \(B, H, W\)"):
        DeletionAUC().update(key_pixel_model, images, good[:, :4], target)


def test_insertion_starts_from_the_blurred_image() -> None:
    images = KEY.float().expand(1, 1, -1, -1).clone()
    p0 = gaussian_blur(images, kernel_size=11, sigma=5.0)[0, 0][KEY].mean().item()
    metric = InsertionAUC(step=8)
    metric.update(key_pixel_model, images, KEY.float()[None] + 0.01 * torch.rand(1, 8, 8), torch.zeros(1).long())
    # p = [p0, 1 x 8]
    assert metric.compute().item() == pytest.approx((p0 + 8 - p0 / 2 - 0.5) / 8, abs=1e-5)
    assert InsertionAUC.higher_is_better and not DeletionAUC.higher_is_better


def test_pointing_game_and_mass() -> None:
    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    masks[:, 0, :4, :4] = True
    saliency = torch.zeros(2, 8, 8)
    saliency[0, 1, 1], saliency[0, 6, 6] = 3.0, 1.0  # peak inside, 3/4 of the mass inside
    saliency[1, 6, 6], saliency[1, 1, 1] = 3.0, 1.0  # peak outside, 1/4 inside
    pointing, mass = AttributionInMask("pointing"), AttributionInMask("mass")
    pointing.update(saliency, masks)
    mass.update(saliency, masks)
    assert pointing.compute().item() == 0.5 and mass.compute().item() == pytest.approx(0.5)


def test_the_pointing_game_breaks_ties_by_the_fixed_random_order() -> None:
    """Tied maxima (an occlusion map's 8x8 blocks, an all-zero map) point at the tied pixel first in the seeded order
    every ranking uses (`saliency_rank`), not at the top-left one: an all-zero map hit any part at pixel (0, 0)."""
    from zoo.explain.faithfulness import saliency_rank

    size = 64
    corner = torch.zeros(1, 1, size, size, dtype=torch.bool)
    corner[..., :6, :6] = True
    zero = torch.zeros(1, size, size)
    pointed = int(saliency_rank(zero)[0].argmin())
    assert pointed != 0 and not corner.flatten()[pointed]  # the seeded pixel, outside the corner
    assert AttributionInMask("pointing")(zero, corner).item() == 0.0  # was 1.0: pixel (0, 0)
    block = torch.zeros(64, size, size)
    block[:, 24:32, 24:32] = 1.0  # one occlusion block, 64 images
    one_pixel = torch.zeros(64, 1, size, size, dtype=torch.bool)
    one_pixel.view(64, size, size)[:, 24:32, 24:32] = torch.eye(64, dtype=torch.bool).view(64, 8, 8)
    hits = torch.stack([AttributionInMask("pointing")(block[i:i + 1], one_pixel[i:i + 1]) for i in range(64)])
    assert hits.sum() == 1 and hits.view(8, 8)[0, 0] == 0  # one block pixel is pointed at, not its top-left
    assert AttributionInMask("pointing", seed=1)(zero, corner).item() == \
        float(corner.flatten()[saliency_rank(zero, seed=1)[0].argmin()])


def test_cam_decomposes_the_logit_and_every_explainer_gives_a_map() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("baseline_tinycnn", num_classes=3).eval()
    images, target = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)["logits"]
    weights = model.get_classifier().weight[target]
    raw_cam = torch.einsum("bf,bfhw->bhw", weights, features).mean((1, 2))
    bias = model.get_classifier().bias[target]
    assert torch.allclose(raw_cam + bias, logits.gather(1, target[:, None])[:, 0], atol=1e-5)
    assert class_activation_map(model, images, target).shape == (2, 64, 64)
    for method in POSTHOC_METHODS:
        saliency = explain(model, images, target, method)
        assert saliency.shape == (2, 64, 64) and torch.isfinite(saliency).all() and (saliency >= 0).all()
    with pytest.raises(ValueError, match="Unknown explainer 'lime'"):
        explain(model, images, target, "lime")


class OwnMapModel(torch.nn.Module):
    """A classifier with its own explanation and no pooled head (as ProtoPNet's): the map is the image's red
    channel minus one half."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(images.mean((2, 3)))}

    def own_explanation(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return images[:, 0] - 0.5


def test_the_self_explanation_row_is_a_models_own_map_where_it_has_one() -> None:
    from zoo.explain.scores import can_explain, score_explanations

    model, images = OwnMapModel(), torch.rand(2, 3, 16, 16)
    assert can_explain(model, "cam") and not can_explain(model, "layer_gradcam")  # no pooled `head` to hook
    rows, maps = score_explanations(model, images, torch.tensor([0, 1]), methods=("cam", "layer_gradcam", "saliency"))
    assert [row["method"] for row in rows] == ["cam", "saliency", "random"]  # + every model's random reference
    assert list(maps) == ["cam", "saliency"]  # the reference is scored, not drawn
    torch.testing.assert_close(maps["cam"], (images[:, 0] - 0.5).relu())
    baseline = zoo.create_model("baseline_tinycnn", num_classes=2)
    assert can_explain(baseline, "cam") and can_explain(baseline, "layer_gradcam")
    assert not can_explain(zoo.create_model("baseline_smallcnn", num_classes=2, in_chans=1), "layer_gradcam")


@pytest.mark.parametrize("name, size", [("baseline_resnet18", 96), ("baseline_tinycnn", 70), ("baseline_tinycnn", 64)])
def test_the_own_map_draws_each_cell_at_its_receptive_field_centre(name: str, size: int) -> None:
    """One hot cell of the top map: the CAM peaks where ICNN's location instability places that cell (the
    backbone's measured receptive-field centre). Spread evenly over the image, a resnet cell sat half a cell off
    (16 px at stride 32), and at 70 px a tinycnn cell 6 px off (the last 6 pixels belong to no cell)."""
    import zoo

    model = zoo.create_model(name, num_classes=2).eval()
    geometry = model.backbone.map_geometry(size)[-1]
    channels = model.get_classifier().weight.shape[1]
    with torch.no_grad():
        model.get_classifier().weight.fill_(1.0)
        h, w = model.forward_features(torch.zeros(1, 3, size, size)).shape[-2:]
    cell = (h - 1, w - 2)
    hot = torch.zeros(1, channels, h, w)
    hot[0, :, cell[0], cell[1]] = 1.0
    model.forward_features = lambda images: hot  # the top map, whatever the image
    cam = class_activation_map(model, torch.zeros(1, 3, size, size), torch.tensor([0]))[0]  # (H, W)
    peak = divmod(int(cam.flatten().argmax()), size)
    expected = [float(geometry.centres(torch.tensor(float(i)), axis)) for axis, i in enumerate(cell)]
    assert all(abs(p + 0.5 - c) <= 1.0 for p, c in zip(peak, expected)), (peak, expected)


@pytest.mark.parametrize("name, size", [("baseline_resnet18", 96), ("baseline_tinycnn", 64)])
def test_layer_gradcam_draws_each_cell_where_the_own_map_does(name: str, size: int) -> None:
    """Grad-CAM's cells go where the own CAM draws them (`cells_to_pixels` with the backbone's measured geometry),
    not where Captum's even spread (`LayerAttribution.interpolate`) put them, half a cell off on resnet: a
    faithfulness comparison between the two maps is not biased by the grid. Unchanged on the tiny CNN, where the
    even spread is exact."""
    from captum.attr import LayerAttribution, LayerGradCam

    from zoo.explain.captum import LogitsOnly, cells_to_pixels  # re-exported from zoo.backbones

    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=3).eval()
    images, target = torch.rand(2, 3, size, size), torch.tensor([0, 1])
    cam = LayerGradCam(LogitsOnly(model), model.head).attribute(images, target=target, attribute_to_layer_input=True,
                                                                relu_attributions=True)  # (2, 1, h, w)
    assert (cam.flatten(1).amax(1) > 0).all()  # something to draw
    drawn = explain(model, images, target, "layer_gradcam")  # (2, H, W)
    geometry = model.backbone.map_geometry(size)[-1]
    torch.testing.assert_close(drawn, cells_to_pixels(cam[:, 0], (size, size), geometry))
    even = LayerAttribution.interpolate(cam, (size, size), interpolate_mode="bilinear")[:, 0]
    if name == "baseline_tinycnn":
        assert torch.equal(drawn, even)
    else:
        assert not torch.allclose(drawn, even)


# ------------------------------------------------------------------------------- the compare report's explain stage

def test_every_model_gets_a_random_reference_and_scores_against_it() -> None:
    """A fixed random map deletes 0.450 on a confident model and 0.225 on a less confident one: raw deletion and ROAD
    MoRF compare methods within a model. The `random` row (keyed by dataset index: the same map for an image in any
    batch) and `*_vs_random` (score / the model's random score) compare models."""
    from zoo.cli.report import legend
    from zoo.explain.scores import EXPLANATION_DIRECTIONS, random_maps, score_explanations

    keys = torch.tensor([7, 3, 12])
    maps = random_maps(keys, (8, 8))
    assert maps.shape == (3, 8, 8) and 0 < maps.min() and maps.max() < 1 and maps[0].std() > 0.2
    torch.testing.assert_close(random_maps(keys[1:], (8, 8)), maps[1:])  # a function of the image's key alone
    assert not torch.equal(maps[0], maps[1]) and not torch.equal(random_maps(keys, (8, 8), seed=1), maps)

    images, target = torch.full((3, 1, 8, 8), 0.9), torch.zeros(3, dtype=torch.long)  # p(class 0) = 0.9
    model = KeyPixelNet()
    rows, drawn = score_explanations(model, images, target, methods=("saliency",), step=8,
                                     metrics=("deletion", "road"), keys=keys)
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["saliency", "random"] and list(drawn) == ["saliency"]
    assert by_method["random"]["deletion_vs_random"] == 1.0 and by_method["random"]["road_morf_vs_random"] == 1.0
    saliency = by_method["saliency"]
    assert saliency["deletion_vs_random"] == pytest.approx(
        saliency["deletion_auc"] / by_method["random"]["deletion_auc"], abs=1e-3)
    assert saliency["deletion_vs_random"] < 0.5  # the gradient finds the key pixels, random does not
    assert EXPLANATION_DIRECTIONS["deletion_vs_random"] is False
    assert EXPLANATION_DIRECTIONS["road_morf_vs_random"] is False
    assert legend(["deletion_auc", "deletion_vs_random", "road_morf_vs_random"], EXPLANATION_DIRECTIONS) == \
        "lower is better: deletion_auc, deletion_vs_random, road_morf_vs_random"


class KeyPixelNet(torch.nn.Module):
    """`key_pixel_model` as a zoo model (dict out), for the report's explainers."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": key_pixel_model(images)}


def test_the_explained_images_are_class_stratified_and_the_same_for_every_function(tmp_path) -> None:
    """A class-sorted ImageFolder (3 classes x 4 validation images): the first 6 samples were two classes; now a
    seeded round-robin over the classes gives each 2, the scores and the figure's true classes on the same images."""
    from PIL import Image

    from datamodules import ImageFolderDataModule
    from zoo.explain.scores import explain_validation_images, true_and_predicted

    for split, count in (("train", 1), ("val", 4)):
        for c, name in enumerate(("ant", "bee", "cat")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (16, 16), (i * 9, 60 * c, 90)).save(tmp_path / split / name / f"{i}.png")
    data = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4)
    data.setup("validate")
    dataset = data.val_dataloader().dataset

    class System(torch.nn.Module):
        input_key, target_key, device = "image", "label", torch.device("cpu")

        def __init__(self) -> None:
            super().__init__()
            self.model = zoo.create_model("baseline_tinycnn", num_classes=3)

    system = System()
    _, _, images = explain_validation_images(system, data, {"num_images": 6, "methods": ["saliency"],
                                                            "metrics": ["deletion"]})
    true, predicted = true_and_predicted(system, data, images)
    assert sorted(true) == [0, 0, 1, 1, 2, 2] and len(predicted) == 6
    # the images are those samples: each image's green channel says its class
    assert [round(float(image[1].mean()) * 255 / 60) for image in data.denormalize(images)] == true
    from zoo.explain.scores import dataset_labels, explained_indices

    assert dataset_labels(dataset).tolist() == [0] * 4 + [1] * 4 + [2] * 4  # read without loading an image
    indices = explained_indices(dataset, 6)
    assert torch.equal(indices, explained_indices(dataset, 6)) and len(set(indices.tolist())) == 6
    assert explained_indices(dataset, 12).sort().values.tolist() == list(range(12))

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> dict:
            return {"image": torch.zeros(3, 4, 4), "label": torch.tensor(index // 5)}

    assert dataset_labels(Unlabelled()) is None  # a seeded permutation, the same on every call
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4]
    assert torch.equal(explained_indices(Unlabelled(), 4), expected)


def test_the_explanation_time_is_synchronised_on_cuda_after_a_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA kernels run asynchronously: the clock starts and stops after a synchronize (none on the CPU), and one
    warm-up call comes before the timed one."""
    from zoo.explain import scores

    events = []
    clock = iter(range(100))
    monkeypatch.setattr(scores.time, "perf_counter", lambda: (events.append("clock"), float(next(clock)))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    result, seconds = scores.wall_time(lambda: events.append("call") or "map", device=torch.device("cuda", 0),
                                       warm_up=lambda: events.append("warm-up"))
    assert (result, seconds) == ("map", 1.0)
    assert events == ["warm-up", "sync", "clock", "call", "sync", "clock"]
    events.clear()
    scores.wall_time(lambda: events.append("call"), device=torch.device("cpu"))
    assert events == ["call", "clock", "call", "clock"]  # the call itself warms up; no synchronize on the CPU


def test_the_report_takes_own_as_cam_and_skips_the_methods_of_vectors() -> None:
    """An `explain:` block shared by an L2X run and image runs names feature methods (kernel_shap) the image runs
    skip; "own" (zoo.explain's name) is the "cam" row."""
    from zoo.explain.scores import score_explanations

    rows, maps = score_explanations(OwnMapModel(), torch.rand(2, 3, 16, 16), torch.tensor([0, 1]),
                                    methods=("own", "kernel_shap", "saliency", "cam"), metrics=("deletion",))
    assert [row["method"] for row in rows] == ["cam", "saliency", "random"] and list(maps) == ["cam", "saliency"]


# ------------------------------------------------------------------------------- series: one feature per time step

KEY_STEPS = torch.tensor([10, 11, 12, 40])  # the time steps the toy series model reads


class KeyStepNet(torch.nn.Module):
    """Series (B, 1, 64) -> logits with p(class 0) = the mean of the key steps' values, clipped to (0, 1); its own
    map is the perfect-knowledge one: 1 on the key steps, 0 elsewhere."""

    def forward(self, series: torch.Tensor) -> dict[str, torch.Tensor]:
        p = series[:, 0, KEY_STEPS].mean(1).clamp(1e-6, 1 - 1e-6)
        return {"logits": torch.stack([p.log(), (1 - p).log()], 1)}

    def own_explanation(self, series: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.zeros(series.shape[0], series.shape[-1]).index_fill_(1, KEY_STEPS, 1.0)  # (B, T)


def test_deletion_over_time_steps_of_the_perfect_map_beats_random() -> None:
    """Deletion takes series (B, C, T) and (B, T) maps: time steps set to 0 in saliency order. The key steps first:
    p = [1, 0, ...] on a 16-step curve; the report's own row of the hand-built model scores far below its random row."""
    from zoo.explain.scores import score_explanations

    series, target = torch.ones(3, 1, 64), torch.zeros(3, dtype=torch.long)
    model = KeyStepNet()
    metric = DeletionAUC(step=4)
    metric.update(lambda x: model(x)["logits"], series, model.own_explanation(series, target), target)
    assert metric.compute().item() == pytest.approx(0.5 / 16, abs=1e-5)
    with pytest.raises(ValueError, match=r"saliency must be \(B, T\)"):
        metric.update(lambda x: model(x)["logits"], series, torch.ones(3, 32), target)
    with pytest.raises(ValueError, match="blurred image"):
        InsertionAUC(step=4).update(lambda x: model(x)["logits"], series, torch.ones(3, 64), target)
    rows, maps = score_explanations(model, series, target, methods=("cam", "layer_gradcam", "own"), step=4,
                                    keys=torch.tensor([5, 6, 7]))  # an image block: "cam" is "own", no Grad-CAM
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["own", "random"] and maps["own"].shape == (3, 64)
    assert by_method["own"]["deletion_auc"] == pytest.approx(0.5 / 16, abs=1e-4)
    assert by_method["own"]["deletion_vs_random"] < 0.2 and by_method["random"]["deletion_vs_random"] == 1.0
    assert "insertion_auc" not in by_method["own"] and "road_morf" not in by_method["own"]  # image-only metrics


def test_a_map_on_the_true_rule_events_scores_mass_and_pointing_one() -> None:
    """The ground truth of series: the steps of the rule events (+-EVENT_TOLERANCE), a rule true at every step left
    out (it locates nothing), a series without events left out of the mean (skip_empty)."""
    from datamodules.rule_series import generate
    from zoo.explain.scores import EVENT_TOLERANCE, rule_event_masks

    events = torch.zeros(3, 3, 64)
    events[0, 0, 20] = events[1, 1, 30] = 1.0
    events[1, 2] = 1.0  # a whole-series rule (frequent_premature of a bigeminy series)
    masks = rule_event_masks(events)  # (B, R, T)
    assert masks[0, 0].nonzero().flatten().tolist() == list(range(20 - EVENT_TOLERANCE, 21 + EVENT_TOLERANCE))
    assert not masks[1, 2].any() and not masks[2].any()  # sample 2: no events (class normal)
    on_events = masks.any(1).float() * torch.rand(3, 64)  # all the mass on the events
    for kind in ("mass", "pointing"):
        metric = AttributionInMask(kind, skip_empty=True)
        metric.update(on_events, masks)
        assert metric.compute().item() == pytest.approx(1.0) and metric.count.item() == 2
    off = (~masks.any(1)).float()
    metric = AttributionInMask("mass", skip_empty=True)
    metric.update(off, masks)
    assert metric.compute().item() == 0.0
    data = generate(8, length=128, seed=3)  # the world's events sit where its premature beats are
    masks = rule_event_masks(data["rule_events"], tolerance=0)
    torch.testing.assert_close(masks.any(1), data["patterns"][:, 1] > 0.5)


def test_compare_explains_series_models_on_the_same_samples() -> None:
    """The explain stage of a rule_series comparison: ReNN (its own map, the strongest rule) and an opaque 1-D CNN
    twin (no own map) on the same class-stratified validation series, every Captum feature method and the random row,
    with time, deletion over time steps and the rule-event ground truth; the directions declared."""
    from datamodules import RuleSeriesDataModule
    from zoo.explain.captum import FEATURE_METHODS
    from zoo.explain.scores import EXPLANATION_DIRECTIONS, explain_validation_images

    data = RuleSeriesDataModule(num_train=8, num_val=16, num_test=8, length=128, batch_size=8)
    data.setup("validate")

    class System(torch.nn.Module):
        input_key, target_key, device = "series", "label", torch.device("cpu")

        def __init__(self, name: str) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = zoo.create_model(name, num_classes=4, in_chans=1, length=128)

    columns = {"ms_per_sample", "deletion_auc", "deletion_vs_random", "pointing_in_events", "mass_in_events"}
    reports = {name: explain_validation_images(System(name), data, {"num_images": 8})
               for name in ("renn_series", "baseline_cnn1d")}
    for name, (rows, maps, series) in reports.items():
        own = ["own"] if name == "renn_series" else []
        assert [row["method"] for row in rows] == [*own, *FEATURE_METHODS, "random"] and maps == {}
        assert all(set(row) == {"method", *columns} for row in rows), rows
        assert all(0 <= row["mass_in_events"] <= 1 and 0 <= row["deletion_auc"] <= 1 for row in rows)
        assert series.shape == (8, 1, 128)
    torch.testing.assert_close(reports["renn_series"][2], reports["baseline_cnn1d"][2])  # the same samples
    assert all(EXPLANATION_DIRECTIONS[column] is not None for column in columns)
    assert EXPLANATION_DIRECTIONS["mass_in_events"] and not EXPLANATION_DIRECTIONS["deletion_vs_random"]


def test_compares_perturbation_maps_of_series_find_the_steps_a_model_reads() -> None:
    """A series model whose class-1 logit reads time steps 40..47 of 128: the compare stage's KernelShap and Lime
    (segments of the deletion `step`, SERIES_PERTURBATIONS samples) put most of their mass there. Over one feature per
    step with Captum's 25 / 50 samples their surrogates were fit on fewer samples than features: the maps scored as
    a random one (rule_series: mass on the events 0.08-0.10 against the events' share of 0.077)."""
    from zoo.explain.scores import score_explanations

    class Window(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, series: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, 1, T) -> logits (B, 2)
            evidence = self.scale * series[:, 0, 40:48].sum(-1)
            return {"logits": torch.stack([torch.zeros_like(evidence), evidence], 1)}

    torch.manual_seed(0)
    series = torch.rand(3, 1, 128) + 0.5  # every step present: removing one lowers the evidence where it reads
    truth = torch.zeros(3, 1, 128, dtype=torch.bool)
    truth[..., 40:48] = True
    rows, _ = score_explanations(Window(), series, torch.ones(3, dtype=torch.long), truth,
                                 ["kernel_shap", "lime", "lime:300"], step=4, metrics=["deletion"], truth="events")
    mass = {row["method"]: row["mass_in_events"] for row in rows}
    assert list(mass) == ["kernel_shap", "lime", "lime:300", "random"], mass
    assert min(mass["kernel_shap"], mass["lime"], mass["lime:300"]) > 0.8 > 0.2 > mass["random"], mass


class _Samples(torch.utils.data.Dataset):
    """Dict samples of `inputs` (N, ...) float32 under `key`, labels 0, 1, 0, 1, ...: a datamodule's validation set."""

    def __init__(self, inputs: torch.Tensor, key: str) -> None:
        self.inputs, self.key, self.labels = inputs, key, torch.arange(len(inputs)) % 2

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.key: self.inputs[index], "label": self.labels[index]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_explain_stage_feeds_a_float64_or_bf16_model_its_own_dtype(dtype: torch.dtype) -> None:
    """compare under --trainer.precision=64-true (bf16-true) trained, then the explain stage gave the model the
    loaded float32 images: "Backbone 'tinycnn' expects images of dtype torch.float64", no report. The maps stay
    float32, as the images the figure draws; a series' note says the `step` the run used (it said 4 under 16)."""
    from zoo.explain.scores import explain_validation_images, explanation_note, true_and_predicted

    class Data:
        def __init__(self, inputs: torch.Tensor, key: str) -> None:
            self.samples = _Samples(inputs, key)

        def val_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.samples, batch_size=4)

    class System(torch.nn.Module):
        target_key, device = "label", torch.device("cpu")

        def __init__(self, name: str, input_key: str, **kwargs: object) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.input_key, self.model = input_key, zoo.create_model(name, num_classes=2, **kwargs).to(dtype)

    settings = {"num_images": 4, "methods": ["saliency"], "metrics": ["deletion"], "step": 16}
    system, data = System("baseline_tinycnn", "image"), Data(torch.rand(6, 3, 16, 16), "image")
    rows, maps, images = explain_validation_images(system, data, settings)
    assert maps["saliency"].dtype == images.dtype == torch.float32 and maps["saliency"].shape == (4, 16, 16)
    assert 0 <= rows[0]["deletion_auc"] <= 1
    assert len(true_and_predicted(system, data, images)[1]) == 4
    series_system = System("baseline_cnn1d", "series", in_chans=1, length=32)
    rows, _, series = explain_validation_images(series_system, Data(torch.rand(6, 1, 32), "series"), settings)
    assert series.dtype == torch.float32 and 0 <= rows[0]["deletion_auc"] <= 1
    assert "Series: deletion sets 16 time steps at a time" in explanation_note(rows)


def test_scoring_restores_every_modules_train_flag_also_when_an_explainer_fails() -> None:
    """score_explanations set the model's flag alone back (a submodule kept in eval mode came back training) and only
    when every explainer ran (a failing one left the model in eval mode)."""
    from zoo.explain.scores import score_explanations

    model, images, target = OwnMapModel().train(), torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    model.scale = torch.nn.BatchNorm1d(1).eval()  # a part kept in eval mode
    modes = {name: module.training for name, module in model.named_modules()}
    score_explanations(model, images, target, methods=("cam",), metrics=("deletion",))
    assert {name: module.training for name, module in model.named_modules()} == modes
    model.own_explanation = lambda inputs, target: 1 / 0
    with pytest.raises(ZeroDivisionError):
        score_explanations(model, images, target, methods=("cam",), metrics=("deletion",))
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_tracing_a_backbones_map_geometry_keeps_every_modules_mode() -> None:
    """The geometry's dry run (`trace_map_geometry`, first read by a picture or a push inside a fit) put the
    backbone back with `train(was_training)`: a part frozen in eval mode under a training parent came back training."""
    model = zoo.create_model("baseline_tinycnn", num_classes=3)
    model.train()
    frozen = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()
    model.backbone.map_geometry(32)
    assert model.backbone.training and not frozen.training


def test_the_explanation_figure_says_which_class_each_models_maps_explain() -> None:
    """compare's figure of an L2X run said "maps explain the true class" and showed the approximator's "pred:", but
    L2X's maps explain its black box's predicted class: its first row now names that class ("black box pred: ...",
    red where it is not the true class) and the title says which models' maps explain what. A model whose maps
    explain the true class (the black box twin, every other family) keeps its "pred:" row and, alone, the title."""
    from tests.test_l2x import digits_patch_selector
    from zoo.explain.scores import ExplainedRun, explained_run, explanation_figure

    data, system = digits_patch_selector()
    _, maps, images = system.explanation_report(data, {"num_images": 4, "methods": ["saliency"]})
    head = [m for m in system.black_box.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.data.zero_()
    head.bias.data.copy_(torch.tensor([5.0, -5.0]))  # the black box says "3" for every image
    l2x = explained_run("l2x", system, data, images, maps)
    assert l2x.explained == [0] * 4 and l2x.explains == "black box pred" and sorted(l2x.true) == [0, 0, 1, 1]
    twin = ExplainedRun("black_box", images, {"saliency": maps["saliency"]}, l2x.true, [1, 1, 1, 1])
    figure = explanation_figure([l2x, twin], data)
    columns = len(images)
    titles = [(ax.get_title(), ax.title.get_color()) for ax in figure.axes]
    colours = ["green" if t == 0 else "red" for t in l2x.true]  # green where the black box is right
    assert titles[columns: 2 * columns] == [("black box pred: 3", colour) for colour in colours]  # l2x's first row
    assert list(maps) == ["l2x", "saliency"]  # rows: the images, l2x: l2x, l2x: saliency, black_box: saliency
    assert [t for t, _ in titles[3 * columns:]] == ["pred: 8"] * columns  # the twin's row: its own prediction
    assert figure.get_suptitle() == ("l2x: maps explain the black box pred (above its first row); black_box: maps "
                                     "explain the true class (top row), pred: the model's prediction")
    alone = explanation_figure([twin], data)  # every model explains the true class: the title as it was
    assert alone.get_suptitle() == "maps explain the true class (top row); pred: the model's prediction"
