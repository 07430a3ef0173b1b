"""Is an explanation faithful, and does it point at the truth? Batched torchmetrics Metrics for saliency maps.

Conventions, fixed once so self-explaining and post-hoc maps are scored on the same footing: a saliency map is
(B, H, W), the absolute attribution summed over channels (`saliency_map`); higher means more important. Series
(B, C, T) have (B, T) maps, one value per time step: ranking, deletion and the ground-truth scores take any positions
(B, *S) of inputs (B, C, *S); insertion, ROAD and infidelity are image-only (a blur, 8 neighbours, a square).

- `DeletionAUC` / `InsertionAUC` (RISE, Petsiuk et al. 2018): rank pixels by saliency; deletion sets the top `step`
  pixels per iteration to zero, insertion starts from a blurred image (Gaussian, kernel 11, sigma 5) and restores
  them; the score is the normalised area under the explained class's probability curve,
  AUC = (sum_i a_i - a_0 / 2 - a_n / 2) / n. Deletion: lower is better; insertion: higher is better. The curve
  starts at the model's probability, so a confident model deletes slower whatever the map: the raw AUC compares
  methods on one model; across models, divide by the model's random map's (`zoo.explain.scores`, `*_vs_random`).
- `AttributionInMask`: the pointing game (is the saliency peak inside the true object parts?) and the share of
  attribution mass inside them. Higher is better.
- `Infidelity` / `SensitivityMax` (Yeh et al. 2019, Captum's `captum.metrics`): does the map predict how the model's
  logit drops when a random square of the image is removed, and how much does the map change when the input barely
  does? Lower is better.
- ROAD (MoRF / LeRF removal with noisy linear imputation) lives in `zoo.explain.road`.

A flat map says nothing, and is scored so: its rankings are a random order (below), and the scores that weigh
positions by saliency (mass, infidelity) take an all-zero map as the uniform map it is the limit of (`unit_saliency`).

Ties: pixels of equal saliency are unordered. Every ranking (`saliency_rank`) breaks ties by one fixed random order
of the pixels (seeded, drawn on the CPU, so the same on every device and for every batch), as ROAD does (its code
adds 1e-4 noise to the map before sorting): a map with large flat regions (ReLU'd CAM / Grad-CAM, the all-zero map of
a constant input) is scored like a random order within them, never by raster order or by the order an unstable sort
gives equal keys, which depends on the device and the sort's implementation (on the CPU an all-zero 64x64 map was
deleted from row 42 on, in blocks, and scored 0.46 deletion AUC on a trained tiny CNN of the parts world where random
maps score 0.15: a score of the sort, not of the map; it now scores 0.15).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from captum.metrics import infidelity, infidelity_perturb_func_decorator, sensitivity_max
from torchmetrics import Metric
from torchvision.transforms.functional import gaussian_blur


def saliency_map(attribution: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W) attributions -> (B, H, W) absolute saliency summed over channels."""
    return attribution.abs().sum(1) if attribution.ndim == 4 else attribution.abs()


def unit_saliency(saliency: torch.Tensor) -> torch.Tensor:
    """(B, *S) maps, each divided by its largest absolute value; an all-zero map becomes all ones (B, *S).

    For the scores that weigh positions by their saliency (the mass inside the true parts, infidelity), not only rank
    them: both are meant to be scale-free, and a flat map is scored as a uniform one, as the rankings score it as a
    random order. The all-zero map (LIME's on a series it cannot fit, a ReLU'd CAM of a class with no evidence) is
    the limit of the constant maps, so it scores as they do: before, its mass inside the true events was 0 (a uniform
    map's is the events' area share; random maps scored 0.07 on a rule series) and its infidelity the worst possible
    (Captum's beta = 0/0 -> 0: 2x a constant or a random map's on a linear model). Dividing by the largest value
    first also keeps a tiny map (gradients of a saturated softmax, 1e-20) from underflowing: its mass was ~0 (the
    total clamped at 1e-12) and its infidelity inf. A map holding NaN stays NaN (a broken map is not a uniform
    one). Elementwise, no host-device sync.
    """
    scale = saliency.abs().flatten(1).amax(1).view(-1, *[1] * (saliency.ndim - 1))  # (B, 1, ...), NaN where NaN
    zero = scale == 0
    return torch.where(zero, torch.ones_like(saliency), saliency / torch.where(zero, 1, scale))


def saliency_rank(saliency: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each pixel's rank in descending saliency, (B, H, W) -> (B, H*W) with 0 = most important (any positions:
    (B, *S) -> (B, prod S), e.g. (B, T) time steps).

    Ties are broken by one random order of the H*W pixels drawn with `seed` (the same for every image, batch and
    device): the sort is stable on the shuffled pixels, so tied pixels keep the shuffled order.
    """
    batch, pixels = saliency.shape[0], saliency[0].numel()
    shuffle = torch.randperm(pixels, generator=torch.Generator().manual_seed(seed)).to(saliency.device)  # (HW,)
    order = shuffle[saliency.flatten(1)[:, shuffle].argsort(dim=1, descending=True, stable=True)]  # (B, HW) ids
    ranks = torch.arange(pixels, device=saliency.device).expand(batch, -1)
    return torch.empty_like(order).scatter_(1, order, ranks)


def target_scores(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, target: torch.Tensor,
                  score: str = "probability") -> torch.Tensor:
    """(B,) softmax probability of `target` ("probability") or 1.0 where it is the argmax ("accuracy")."""
    with torch.no_grad():
        logits = model(images)
    if score == "probability":
        return logits.softmax(-1).gather(1, target[:, None])[:, 0]
    if score == "accuracy":
        return (logits.argmax(-1) == target).float()
    raise ValueError(f"score must be 'probability' or 'accuracy'; got {score!r}.")


def check_saliency(images: torch.Tensor, saliency: torch.Tensor) -> None:
    """Raise unless `saliency` is one map per input of `images`: (B, H, W) for (B, C, H, W), (B, T) for (B, C, T)."""
    expected = (images.shape[0], *images.shape[2:])
    if saliency.shape != expected:
        names = "(B, H, W)" if images.ndim == 4 else "(B, T)" if images.ndim == 3 else "(B, *positions)"
        raise ValueError(f"saliency must be {names} = {expected}; got {tuple(saliency.shape)}.")


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Normalised trapezoidal area of curves (B, n + 1) sampled at n + 1 equally spaced steps: (B,)."""
    n = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def perturbation_curves(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
                        target: torch.Tensor, step: int, mode: str, chunk: int = 256, seed: int = 0) -> torch.Tensor:
    """Probability of `target` as pixels are deleted or inserted in saliency order: (B, n + 1).

    All (step, image) pairs are built as masks from each pixel's saliency rank (`saliency_rank`, ties broken by the
    fixed random order of `seed`) and run in chunks of `chunk` images through `model` (logits out); no loop over
    pixels or images. Images (B, C, H, W) and saliency (B, H, W); any positions work the same way for deletion, e.g.
    series (B, C, T) and (B, T): a time step (all channels) is deleted to zero like a pixel. Insertion blurs images.
    """
    batch, positions = images.shape[0], images.shape[2:]
    n = math.ceil(math.prod(positions) / step)
    rank = saliency_rank(saliency, seed)  # (B, HW)
    thresholds = torch.arange(n + 1, device=images.device) * step  # pixels changed at each step
    changed = (rank[None] < thresholds[:, None, None]).view(n + 1, batch, 1, *positions)  # (n+1, B, 1, H, W)
    if mode == "deletion":
        start, end = images, torch.zeros_like(images)
    elif mode == "insertion":
        if images.ndim != 4:
            raise ValueError(f"insertion starts from a blurred image (B, C, H, W); got shape {tuple(images.shape)}.")
        start, end = gaussian_blur(images, kernel_size=11, sigma=5.0), images
    else:
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}.")
    probabilities = []
    flat_changed = changed.flatten(0, 1)  # (S*B, 1, *positions), step-major
    sample = torch.arange(batch, device=images.device).repeat(n + 1)  # image index of each row
    for begin in range(0, len(sample), chunk):  # chunks of perturbed images bound memory
        rows = sample[begin:begin + chunk]
        perturbed = torch.where(flat_changed[begin:begin + chunk], end[rows], start[rows])
        probabilities.append(target_scores(model, perturbed, target[rows]))
    return torch.cat(probabilities).view(n + 1, batch).t()


class MeanScore(Metric):
    """The mean over images of a per-image score: the base of every faithfulness metric here. Subclasses give
    `scores(...) -> (B,)`; `update` takes the same arguments. Sum and count states, summed across ranks (DDP).
    NaN when no image was scored: nothing to score is no score (0 would be DeletionAUC's best)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def scores(self, *args: Any) -> torch.Tensor:
        raise NotImplementedError

    def update(self, *args: Any) -> None:
        scores = self.scores(*args)  # (B,)
        self.total += scores.double().sum()
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        mean = (self.total / self.count.clamp(min=1)).float()
        return torch.where(self.count > 0, mean, torch.full_like(mean, float("nan")))


class _PerturbationAUC(MeanScore):
    """AUC of the explained class's probability as pixels change in saliency order. update(model, images
    (B, C, H, W), saliency (B, H, W), target (B,)); `model` maps images to logits. Deletion also takes series
    (B, C, T) with (B, T) maps, `step` time steps at a time."""

    mode: str

    def __init__(self, step: int = 64, chunk: int = 256, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step, self.chunk, self.seed = step, chunk, seed

    def scores(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        check_saliency(images, saliency)
        return auc(perturbation_curves(model, images, saliency, target, self.step, self.mode, self.chunk, self.seed))


class DeletionAUC(_PerturbationAUC):
    """Most important pixels set to zero first: a faithful map makes the probability fall fast."""

    higher_is_better = False
    mode = "deletion"


class InsertionAUC(_PerturbationAUC):
    """Most important pixels restored first into a blurred image: a faithful map makes the probability rise fast."""

    higher_is_better = True
    mode = "insertion"


class AttributionInMask(MeanScore):
    """Pointing game hit rate ("pointing") or attribution mass share ("mass") inside the ground-truth part masks.
    update(saliency (B, H, W), part_masks (B, P, H', W') bool); masks are resized to the saliency size (nearest).
    Series: update(saliency (B, T), masks (B, P, T') bool), e.g. the time steps of the true rule events.
    `skip_empty`: a sample whose masks are all empty (no ground truth: a rule series of the class that has no rule
    events) is left out of the mean instead of scoring 0; a batch without any such sample adds nothing (and the
    mean is NaN while no sample was kept).

    The pointing game's peak is the pixel of rank 0 (`saliency_rank` with `seed`): tied maxima are broken by the
    fixed random order every ranking here uses, not by raster order (an occlusion map is constant over each 8x8
    block, whose top-left pixel an argmax takes; an all-zero map pointed at pixel (0, 0) and hit any part there; it
    now points at one seeded random pixel: chance level). The mass of an all-zero map is a uniform map's, the parts'
    area share (`unit_saliency`; it was 0, below any random map)."""

    higher_is_better = True

    def __init__(self, kind: str = "mass", seed: int = 0, skip_empty: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in ("mass", "pointing"):
            raise ValueError(f"kind must be 'mass' or 'pointing'; got {kind!r}.")
        self.kind, self.seed, self.skip_empty = kind, seed, skip_empty

    def update(self, saliency: torch.Tensor, part_masks: torch.Tensor) -> None:
        if self.skip_empty:  # evaluation only (a host sync): the samples that have ground truth
            kept = part_masks.flatten(1).any(1)  # (B,)
            if not bool(kept.any()):  # nothing to score: an empty batch would not rank
                return
            saliency, part_masks = saliency[kept], part_masks[kept]
        super().update(saliency, part_masks)

    def scores(self, saliency: torch.Tensor, part_masks: torch.Tensor) -> torch.Tensor:
        inside = part_masks.any(1, keepdim=True).float()  # (B, 1, H', W') union of the parts
        inside = F.interpolate(inside, size=saliency.shape[1:], mode="nearest")[:, 0] > 0  # (B, H, W)
        saliency = saliency.abs().float()
        if self.kind == "mass":  # an all-zero map as a uniform one: the parts' area share (`unit_saliency`)
            saliency = unit_saliency(saliency)  # (B, H, W), largest value 1: the total is at least 1
            return (saliency * inside).flatten(1).sum(1) / saliency.flatten(1).sum(1)
        peak = saliency_rank(saliency, self.seed).argmin(1, keepdim=True)  # (B, 1) the pixel of rank 0
        return inside.flatten(1).gather(1, peak)[:, 0].float()


def infidelity_scores(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
                      target: torch.Tensor, square: float = 0.25, n_perturb_samples: int = 16, seed: int = 0,
                      max_examples_per_batch: int | None = None) -> torch.Tensor:
    """Captum's infidelity (Yeh et al. 2019) of (B, H, W) maps: (B,), lower is better.

    E_I[(beta I^T phi - (f(x) - f(x - I)))^2], f the `target` logit of `model` (logits out, what the post-hoc maps
    explain), phi the map repeated over the channels. The perturbation is Yeh et al.'s square removal: one square of
    side `square` of the image's sides, at a uniform random position (a generator seeded with `seed`), set to zero
    as deletion does, so I = x - x' is the image inside the square (`multiply_by_inputs=False`, Captum's choice for
    local maps; one choice for every map, so all are scored alike). `normalize=True` fits the scale beta per image,
    so a map's units (logits, gradients, a CAM's feature units) do not matter. Why not Gaussian noise: zero-mean
    noise cannot be predicted by a map of absolute values, and on a trained tiny CNN of the parts world it scored
    every map, random and all-zero ones included, within 5%; square removal separates them (0.19-0.27 for the
    report's maps, 0.87 random, 64x64 images; an all-zero map scored 1.65 there while Captum fitted it with beta =
    0/0 -> 0, the worst score there is; it is now scored as a uniform map, `unit_saliency`).
    """
    check_saliency(images, saliency)
    generator = torch.Generator().manual_seed(seed)
    height, width = images.shape[-2:]
    side_h, side_w = max(1, round(square * height)), max(1, round(square * width))

    @infidelity_perturb_func_decorator(multiply_by_inputs=False)
    def perturb(inputs: torch.Tensor) -> torch.Tensor:
        count = len(inputs)
        top = torch.randint(0, height - side_h + 1, (count, 1, 1), generator=generator).to(inputs.device)
        left = torch.randint(0, width - side_w + 1, (count, 1, 1), generator=generator).to(inputs.device)
        rows = torch.arange(height, device=inputs.device)[:, None]  # (H, 1)
        columns = torch.arange(width, device=inputs.device)  # (W,)
        inside = (rows >= top) & (rows < top + side_h) & (columns >= left) & (columns < left + side_w)  # (N, H, W)
        return inputs.masked_fill(inside[:, None], 0.0)

    # scaled to a largest value of 1 (normalize=True fits the scale anyway), an all-zero map as a uniform one
    attribution = unit_saliency(saliency.to(images.dtype))[:, None].expand_as(images).contiguous()  # (B, C, H, W)
    return infidelity(model, perturb, images, attribution, target=target, n_perturb_samples=n_perturb_samples,
                      max_examples_per_batch=max_examples_per_batch, normalize=True)


def sensitivity_scores(explainer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                       target: torch.Tensor, perturb_radius: float = 0.02, n_perturb_samples: int = 10,
                       seed: int = 0, max_examples_per_batch: int | None = None) -> torch.Tensor:
    """Captum's max-sensitivity (Yeh et al. 2019) of an explanation method: (B,), lower is better.

    max over `n_perturb_samples` inputs x' drawn uniformly from the L-infinity ball of radius `perturb_radius` around
    x (Captum's default perturbation, here from a generator seeded with `seed`) of ||phi(x') - phi(x)|| / ||phi(x)||
    (Frobenius norms), phi = `explainer(images, target)` -> (B, H, W), any method of the compare report (e.g.
    `lambda x, t: explain(model, x, t, "saliency")`). It runs the explainer `n_perturb_samples` more times.
    """
    generator = torch.Generator().manual_seed(seed)

    def perturb(inputs: torch.Tensor, radius: float) -> torch.Tensor:
        noise = torch.rand(inputs.shape, generator=generator).to(inputs)  # U[0, 1)
        return inputs + (2 * noise - 1) * radius

    def explanation(inputs: torch.Tensor | tuple[torch.Tensor], target: torch.Tensor
                    ) -> torch.Tensor | tuple[torch.Tensor]:
        # Captum passes the unperturbed inputs as a 1-tuple and expects a tuple back, as its attribute() gives
        return (explainer(inputs[0], target),) if isinstance(inputs, tuple) else explainer(inputs, target)

    return sensitivity_max(explanation, images, perturb_func=perturb, perturb_radius=perturb_radius,
                           n_perturb_samples=n_perturb_samples, max_examples_per_batch=max_examples_per_batch,
                           target=target)


class Infidelity(MeanScore):
    """Mean `infidelity_scores` of the maps. update(model, images (B, C, H, W), saliency (B, H, W), target (B,));
    `model` maps images to logits."""

    higher_is_better = False

    def __init__(self, square: float = 0.25, n_perturb_samples: int = 16, seed: int = 0,
                 max_examples_per_batch: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.square, self.n_perturb_samples, self.seed = square, n_perturb_samples, seed
        self.max_examples_per_batch = max_examples_per_batch

    def scores(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        return infidelity_scores(model, images, saliency, target, self.square, self.n_perturb_samples, self.seed,
                                 self.max_examples_per_batch)


class SensitivityMax(MeanScore):
    """Mean `sensitivity_scores` of an explanation method. update(explainer, images (B, C, H, W), target (B,));
    `explainer(images, target)` returns (B, H, W) maps."""

    higher_is_better = False

    def __init__(self, perturb_radius: float = 0.02, n_perturb_samples: int = 10, seed: int = 0,
                 max_examples_per_batch: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.perturb_radius, self.n_perturb_samples, self.seed = perturb_radius, n_perturb_samples, seed
        self.max_examples_per_batch = max_examples_per_batch

    def scores(self, explainer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        return sensitivity_scores(explainer, images, target, self.perturb_radius, self.n_perturb_samples, self.seed,
                                  self.max_examples_per_batch)
