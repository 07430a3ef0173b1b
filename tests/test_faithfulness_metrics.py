"""Ties in saliency rankings, ROAD with noisy linear imputation, Captum's infidelity and max-sensitivity, and their
columns in the compare report, on hand-made images and models with known answers."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.explain.faithfulness import DeletionAUC, perturbation_curves

OBJECT = torch.zeros(64, 64, dtype=torch.bool)
OBJECT[24:40, 24:40] = True  # the object in the middle of the image, as in the synthetic worlds


def object_model(images: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax gives p(class 0) = mean of channel 0 over the object, clipped to (0, 1)."""
    p = images[:, 0][:, OBJECT].mean(1).clamp(1e-6, 1 - 1e-6)
    return torch.stack([p.log(), (1 - p).log()], 1)


# ---------------------------------------------------------------------------------------------------------------- ties

def test_an_all_zero_map_deletes_in_random_order_not_the_centre_first() -> None:
    images, target = torch.ones(1, 1, 64, 64), torch.zeros(1, dtype=torch.long)
    curve = perturbation_curves(object_model, images, torch.zeros(1, 64, 64), target, 64, "deletion")[0]  # (65,)
    # a random order deletes the object's pixels at the rate of all pixels: E[p_k] = 1 - k / 64 (hypergeometric)
    expected = 1 - torch.arange(65) / 64
    random_maps = torch.rand(32, 64, 64, generator=torch.Generator().manual_seed(1))
    random_mean = perturbation_curves(object_model, images.expand(32, -1, -1, -1), random_maps,
                                      target.expand(32), 64, "deletion").mean(0)
    assert (random_mean - expected).abs().max() < 0.03
    assert (curve - random_mean).abs().max() < 0.1  # before: 0.25 (unstable sort order: rows 42.., then the centre)
    metric = DeletionAUC(step=64)
    metric.update(object_model, images, torch.zeros(1, 64, 64), target)
    assert metric.compute().item() == pytest.approx(0.5, abs=0.03)
    again = perturbation_curves(object_model, images, torch.zeros(1, 64, 64), target, 64, "deletion")[0]
    torch.testing.assert_close(curve, again, rtol=0, atol=0)


def test_ties_are_broken_by_one_fixed_order_for_every_image_and_batch() -> None:
    from zoo.explain.faithfulness import saliency_rank

    saliency = torch.zeros(3, 8, 8)
    saliency[1, 2:4, 2:4] = 1.0  # a ReLU'd-CAM-like map: a peak on a flat zero plateau
    saliency[2] = torch.rand(8, 8)
    rank = saliency_rank(saliency)  # (3, 64)
    assert sorted(rank[0].tolist()) == list(range(64))
    assert set(rank[1][saliency[1].flatten() > 0].tolist()) == {0, 1, 2, 3}  # the peak first
    assert torch.equal(rank[2].argsort(), saliency[2].flatten().argsort(descending=True))  # no ties: by saliency
    torch.testing.assert_close(saliency_rank(saliency[:1]), rank[:1], rtol=0, atol=0)  # independent of the batch
    # among tied pixels the order is the same in every image (the fixed random order), and not raster order
    tied = rank[1][saliency[1].flatten() == 0]
    assert torch.equal(tied.argsort(), rank[0][saliency[1].flatten() == 0].argsort())
    assert not torch.equal(rank[0], torch.arange(64))
    assert not torch.equal(saliency_rank(saliency, seed=1)[0], rank[0])


# ---------------------------------------------------------------------------------------------------------------- ROAD

def ramp(batch: int = 2, size: int = 32) -> torch.Tensor:
    """(batch, 3, size, size) images linear in the pixel coordinates, another plane per channel and image."""
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    slopes = torch.linspace(-0.02, 0.02, batch * 3 * 2).view(batch, 3, 2, 1, 1)
    return 0.5 + slopes[:, :, 0] * rows + slopes[:, :, 1] * columns


def test_linear_imputation_reproduces_a_linear_image_away_from_the_border() -> None:
    from zoo.explain.road import noisy_linear_imputation

    images = ramp()
    removed = torch.zeros(2, 32, 32, dtype=torch.bool)
    removed[:, 1:-1, 1:-1] = torch.rand(2, 30, 30, generator=torch.Generator().manual_seed(0)) < 0.9
    removed[1, 3:29, 3:29] = True  # one large removed region: every unknown depends on the others
    imputed = noisy_linear_imputation(images, removed, noise=0.0)
    torch.testing.assert_close(imputed, images, rtol=0, atol=1e-5)
    assert imputed.dtype == images.dtype and imputed.shape == images.shape


def test_linear_imputation_of_a_border_pixel_averages_its_neighbours_inside_the_image() -> None:
    from zoo.explain.road import noisy_linear_imputation

    image = torch.arange(9.0).view(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    removed[0, 0, 0] = True  # corner: neighbours 1 and 3 (1/6 each) and 4 (1/12), renormalised by 5/12
    imputed = noisy_linear_imputation(image, removed, noise=0.0)
    assert imputed[0, 0, 0, 0].item() == pytest.approx((1 / 6 + 3 / 6 + 4 / 12) / (5 / 12))
    removed[0, 0, 1] = True  # two removed neighbours, solved jointly
    imputed = noisy_linear_imputation(image, removed, noise=0.0)[0, 0]
    a, b = imputed[0, 0].item(), imputed[0, 1].item()
    assert 5 / 12 * a == pytest.approx(b / 6 + 3 / 6 + 4 / 12, abs=1e-5)
    assert 8 / 12 * b == pytest.approx(a / 6 + 2 / 6 + 4 / 6 + 3 / 12 + 5 / 12, abs=1e-5)  # top edge: 5 inside
    with pytest.raises(ValueError, match="Every pixel of an image is removed"):
        noisy_linear_imputation(image, torch.ones(1, 3, 3, dtype=torch.bool))


def test_imputation_noise_is_reproducible_and_only_on_removed_pixels() -> None:
    from zoo.explain.road import noisy_linear_imputation

    images = ramp()
    removed = torch.zeros(2, 32, 32, dtype=torch.bool)
    removed[:, 1:-1, 1:-1] = torch.rand(2, 30, 30, generator=torch.Generator().manual_seed(0)) < 0.5
    exact = noisy_linear_imputation(images, removed, noise=0.0)
    torch.testing.assert_close(exact, noisy_linear_imputation(images, removed, noise=0.0), rtol=0, atol=0)
    noisy = noisy_linear_imputation(images, removed, noise=0.01, seed=3)
    torch.testing.assert_close(noisy, noisy_linear_imputation(images, removed, noise=0.01, seed=3), rtol=0, atol=0)
    jitter = (noisy - exact).permute(1, 0, 2, 3)  # (C, B, H, W)
    assert jitter[:, ~removed].abs().max() == 0
    assert jitter[:, removed].std().item() == pytest.approx(0.01, rel=0.1)
    assert not torch.equal(noisy, noisy_linear_imputation(images, removed, noise=0.01, seed=4))


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (1, 3, 16, 16)])
def test_road_leaves_the_callers_float64_images_as_they_were(shape: tuple[int, ...]) -> None:
    """float64 images on the CPU, grayscale (C == 1) or one image (B == 1): the imputer's pixel table was a view of
    the caller's tensor and the imputed pixels were written into it (by up to 0.75), so RoadMoRF after RoadLeRF
    scored other images."""
    from zoo.explain.road import RoadLeRF, RoadMoRF, noisy_linear_imputation

    images = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    removed = torch.zeros(shape[0], 16, 16, dtype=torch.bool)
    removed[:, 4:12, 4:12] = True
    imputed = noisy_linear_imputation(images, removed)
    assert torch.equal(images, before) and not torch.equal(imputed, before)
    saliency, target = images.sum(1), torch.zeros(shape[0], dtype=torch.long)
    model = lambda x: torch.stack([x.flatten(1).mean(1), 0.5 * torch.ones(len(x), dtype=x.dtype)], 1)  # noqa: E731
    for metric in (RoadLeRF(score="probability"), RoadMoRF(score="probability")):
        metric.update(model, images, saliency, target)
        assert torch.equal(images, before)


def key_images(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark 32x32 images with a bright 6x6 key square at a different place in each, and the key masks."""
    images, keys = torch.zeros(batch, 1, 32, 32), torch.zeros(batch, 32, 32, dtype=torch.bool)
    for i in range(batch):
        keys[i, 4 + 5 * i:10 + 5 * i, 20 - 4 * i:26 - 4 * i] = True
    images[:, 0][keys] = 1.0
    return images, keys


def bright_pixel_model(images: torch.Tensor) -> torch.Tensor:
    """Class 0 while the brightest 16 pixels average over 1/2: the key square (36 pixels) must be largely removed
    to change its decision."""
    bright = images[:, 0].flatten(1).topk(16, dim=1).values.mean(1)  # (B,)
    return torch.stack([20 * (bright - 0.5), torch.zeros_like(bright)], 1)


def test_road_morf_of_the_true_map_drops_faster_than_a_random_map() -> None:
    from zoo.explain.road import RoadLeRF, RoadMoRF, road_curves

    images, keys = key_images()
    target = torch.zeros(4, dtype=torch.long)
    perfect = keys.float() + 0.01 * torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))
    random = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(1))
    morf = {name: road_curves(bright_pixel_model, images, saliency, target, "morf")
            for name, saliency in (("perfect", perfect), ("random", random))}
    assert morf["perfect"].shape == (4, 9)
    # 36 key pixels of 1024: the perfect map removes them all at 10% and the model flips; at random it keeps them
    assert morf["perfect"].max() == 0 and morf["random"][:, :3].min() == 1
    lerf = road_curves(bright_pixel_model, images, perfect, target, "lerf")
    assert lerf.min() == 1  # the key square is kept to the end
    metrics = {}
    for name, cls in (("morf", RoadMoRF), ("lerf", RoadLeRF)):
        for saliency_name, saliency in (("perfect", perfect), ("random", random)):
            metric = cls(score="probability")
            metric.update(bright_pixel_model, images, saliency, target)
            metrics[name, saliency_name] = metric.compute().item()
    assert metrics["morf", "perfect"] < metrics["morf", "random"] - 0.3
    assert metrics["lerf", "perfect"] > metrics["lerf", "random"]
    assert not RoadMoRF.higher_is_better and RoadLeRF.higher_is_better
    with pytest.raises(ValueError, match=r"percentages must lie in \[0, 1\)"):
        road_curves(bright_pixel_model, images, perfect, target, percentages=(0.5, 1.0))
    with pytest.raises(ValueError, match="order must be"):
        road_curves(bright_pixel_model, images, perfect, target, "random")


# ------------------------------------------------------------------------------------------ infidelity and sensitivity

WEIGHTS = torch.zeros(16, 16)
WEIGHTS[4:12, 4:12] = torch.linspace(0.5, 2.0, 64).view(8, 8)


def linear_model(images: torch.Tensor) -> torch.Tensor:
    """Class 0's logit is sum_hw WEIGHTS_hw * sum_c x_chw; class 1's is 0. Its exact local explanation is WEIGHTS."""
    logit = (images.sum(1) * WEIGHTS).flatten(1).sum(1)
    return torch.stack([logit, torch.zeros_like(logit)], 1)


def test_infidelity_is_zero_for_the_exact_map_at_any_scale_and_larger_for_others() -> None:
    """Removing a square of the linear model's input drops its logit by exactly the map-weighted input inside."""
    from zoo.explain.faithfulness import Infidelity, infidelity_scores

    images, target = torch.rand(3, 3, 16, 16), torch.zeros(3, dtype=torch.long)
    exact = infidelity_scores(linear_model, images, WEIGHTS.expand(3, -1, -1), target)
    scaled = infidelity_scores(linear_model, images, 7 * WEIGHTS.expand(3, -1, -1), target)  # normalize=True
    flat = infidelity_scores(linear_model, images, torch.ones(3, 16, 16), target)
    shuffled = infidelity_scores(linear_model, images, WEIGHTS.flatten()[torch.randperm(256)].view(16, 16)
                                 .expand(3, -1, -1), target)
    assert exact.shape == (3,) and flat.min() > 10 and shuffled.min() > 10
    assert exact.abs().max() < 1e-4 * flat.min() and scaled.abs().max() < 1e-4 * flat.min()  # 0 up to float32
    torch.testing.assert_close(flat, infidelity_scores(linear_model, images, torch.ones(3, 16, 16), target))
    metric = Infidelity()
    metric.update(linear_model, images, torch.ones(3, 16, 16), target)
    assert metric.compute().item() == pytest.approx(flat.mean().item(), rel=1e-5)
    assert not Infidelity.higher_is_better


def test_sensitivity_max_of_explainers_of_the_compare_report() -> None:
    from zoo.explain.captum import explain
    from zoo.explain.faithfulness import SensitivityMax, sensitivity_scores

    images, target = torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
    constant = sensitivity_scores(lambda x, t: WEIGHTS.expand(len(x), -1, -1), images, target)
    assert constant.shape == (2,) and constant.max() == 0  # the gradient of a linear model does not move
    radius = 0.02
    input_times = sensitivity_scores(lambda x, t: x.sum(1) * WEIGHTS, images, target, perturb_radius=radius)
    assert (input_times > 0).all() and (input_times < 3 * radius * 16 / images.sum(1)[:, 4:12, 4:12].min()).all()
    torch.manual_seed(0)
    model = zoo.create_model("baseline_tinycnn", num_classes=3).eval()
    metric = SensitivityMax(n_perturb_samples=3)
    metric.update(lambda x, t: explain(model, x, t, "saliency"), images, target)
    value = metric.compute()
    assert torch.isfinite(value) and value > 0 and not SensitivityMax.higher_is_better
    again = SensitivityMax(n_perturb_samples=3)
    again.update(lambda x, t: explain(model, x, t, "saliency"), images, target)
    assert again.compute().item() == pytest.approx(value.item(), rel=1e-5)  # seeded perturbations


# -------------------------------------------------------------------------------------------------- the compare report

def test_the_report_scores_road_and_infidelity_and_sensitivity_on_request() -> None:
    from zoo.explain.scores import EXPLANATION_DIRECTIONS, score_explanations

    torch.manual_seed(0)
    model = zoo.create_model("baseline_tinycnn", num_classes=3)
    images, target = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    rows, _ = score_explanations(model, images, target, methods=("cam", "saliency"))
    columns = ["method", "ms_per_sample", "deletion_auc", "insertion_auc", "road_morf", "road_lerf", "infidelity",
               "deletion_vs_random", "road_morf_vs_random"]
    assert [list(row) for row in rows] == [columns, columns, columns]  # cam, saliency and the random reference
    assert all(0 <= row[c] <= 1 for row in rows for c in ("road_morf", "road_lerf")) and \
        all(row["infidelity"] >= 0 for row in rows)
    rows, _ = score_explanations(model, images, target, methods=("saliency",), metrics=("road", "sensitivity"))
    assert list(rows[0]) == ["method", "ms_per_sample", "road_morf", "road_lerf", "sensitivity_max",
                             "road_morf_vs_random"]
    assert EXPLANATION_DIRECTIONS["road_morf"] is False and EXPLANATION_DIRECTIONS["road_lerf"] is True
    assert EXPLANATION_DIRECTIONS["infidelity"] is False and EXPLANATION_DIRECTIONS["sensitivity_max"] is False
    with pytest.raises(ValueError, match="Unknown explanation metrics"):
        score_explanations(model, images, target, methods=("saliency",), metrics=("deletion", "roar"))


# ---------------------------------------------------------------------------------------------- flat and all-zero maps

def test_an_all_zero_map_is_scored_as_a_uniform_map_by_mass_and_infidelity() -> None:
    """An all-zero map (LIME's on a rule series) had mass 0 inside the true parts, below a random map's, and the
    worst infidelity (Captum's beta = 0/0 -> 0); it is the limit of the constant maps and now scores as they do (the
    parts' area share; a constant map's infidelity), sample by sample in a batch. A tiny map (1e-20) scores as the
    same map at scale 1: its mass was ~0 (the total clamped at 1e-12) and its infidelity inf."""
    from zoo.explain.faithfulness import AttributionInMask, infidelity_scores

    masks = torch.zeros(3, 2, 8, 8, dtype=torch.bool)
    masks[:, 0, :2, :] = True  # a quarter of the image
    masks[2, 1, 2:4, :4] = True  # and an eighth more
    saliency = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    saliency[1] = 0.0
    saliency[2] = 0.0
    mass = AttributionInMask("mass").scores(saliency, masks)  # (3,)
    assert mass[1].item() == pytest.approx(0.25) and mass[2].item() == pytest.approx(0.375)  # was 0.0
    torch.testing.assert_close(mass, AttributionInMask("mass").scores(
        torch.where(saliency.flatten(1).any(1)[:, None, None], saliency, torch.ones(8, 8)), masks))  # as uniform
    torch.testing.assert_close(AttributionInMask("mass").scores(1e-20 * saliency, masks), mass)  # was ~1e-8
    series = AttributionInMask("mass", skip_empty=True)  # (B, T) maps of a rule series
    events = torch.zeros(2, 1, 40, dtype=torch.bool)
    events[:, 0, 10:13] = True
    series.update(torch.zeros(2, 40), events)
    assert series.compute().item() == pytest.approx(3 / 40)

    images, target = torch.rand(3, 3, 16, 16), torch.zeros(3, dtype=torch.long)
    zero = infidelity_scores(linear_model, images, torch.zeros(3, 16, 16), target)
    flat = infidelity_scores(linear_model, images, torch.ones(3, 16, 16), target)
    torch.testing.assert_close(zero, flat)  # was about 2x a constant map's
    mixed = torch.stack([WEIGHTS, torch.zeros(16, 16), 0.5 * torch.ones(16, 16)])
    scores = infidelity_scores(linear_model, images, mixed, target)
    torch.testing.assert_close(scores[1:], flat[1:])
    assert scores[0].abs() < 1e-4 * flat.min()  # the exact map in the same batch
    tiny = infidelity_scores(linear_model, images, 1e-20 * WEIGHTS.expand(3, -1, -1), target)
    assert torch.isfinite(tiny).all() and tiny.abs().max() < 1e-4 * flat.min()  # was inf

    broken = saliency.clone()
    broken[0, 3, 3] = float("nan")  # a map holding NaN is broken, not uniform: its score stays NaN
    scored = AttributionInMask("mass").scores(broken, masks)
    assert torch.isnan(scored[0]) and torch.isfinite(scored[1:]).all()
    assert torch.isnan(infidelity_scores(linear_model, images, torch.full((3, 16, 16), float("nan")), target)).all()
