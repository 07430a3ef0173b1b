"""Is an explanation faithful, and does it point at the truth? Batched torchmetrics Metrics for saliency maps.

Conventions, fixed once so self-explaining and post-hoc maps are scored on the same footing: a saliency map is
(B, H, W), the absolute attribution summed over channels (`saliency_map`); higher means more important.

- `DeletionAUC` / `InsertionAUC` (RISE, Petsiuk et al. 2018): rank pixels by saliency; deletion sets the top `step`
  pixels per iteration to zero, insertion starts from a blurred image (Gaussian, kernel 11, sigma 5) and restores
  them; the score is the normalised area under the explained class's probability curve,
  AUC = (sum_i a_i - a_0 / 2 - a_n / 2) / n. Deletion: lower is better; insertion: higher is better.
- `AttributionInMask`: the pointing game (is the saliency peak inside the true object parts?) and the share of
  attribution mass inside them. Higher is better.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.transforms.functional import gaussian_blur


def saliency_map(attribution: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W) attributions -> (B, H, W) absolute saliency summed over channels."""
    return attribution.abs().sum(1) if attribution.ndim == 4 else attribution.abs()


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Normalised trapezoidal area of curves (B, n + 1) sampled at n + 1 equally spaced steps: (B,)."""
    n = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def perturbation_curves(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
                        target: torch.Tensor, step: int, mode: str, chunk: int = 256) -> torch.Tensor:
    """Probability of `target` as pixels are deleted or inserted in saliency order: (B, n + 1).

    All (step, image) pairs are built as masks from each pixel's saliency rank and run in chunks of `chunk`
    images through `model` (logits out); no loop over pixels or images.
    """
    batch, channels, height, width = images.shape
    pixels = height * width
    n = math.ceil(pixels / step)
    order = saliency.flatten(1).argsort(dim=1, descending=True)  # (B, HW)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=images.device).expand(batch, -1))
    thresholds = torch.arange(n + 1, device=images.device) * step  # pixels changed at each step
    changed = (rank[None] < thresholds[:, None, None]).view(n + 1, batch, 1, height, width)  # (n+1, B, 1, H, W)
    if mode == "deletion":
        start, end = images, torch.zeros_like(images)
    elif mode == "insertion":
        start, end = gaussian_blur(images, kernel_size=11, sigma=5.0), images
    else:
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}.")
    probabilities = []
    flat_changed = changed.flatten(0, 1)  # (S*B, 1, H, W), step-major
    sample = torch.arange(batch, device=images.device).repeat(n + 1)  # image index of each row
    for begin in range(0, len(sample), chunk):  # chunks of perturbed images bound memory
        rows = sample[begin:begin + chunk]
        perturbed = torch.where(flat_changed[begin:begin + chunk], end[rows], start[rows])
        with torch.no_grad():
            probs = model(perturbed).softmax(-1)
        probabilities.append(probs.gather(1, target[rows][:, None])[:, 0])
    return torch.cat(probabilities).view(n + 1, batch).t()


class _PerturbationAUC(Metric):
    """AUC of the explained class's probability as pixels change in saliency order. update(model, images
    (B, C, H, W), saliency (B, H, W), target (B,)); `model` maps images to logits."""

    full_state_update = False
    mode: str

    def __init__(self, step: int = 64, chunk: int = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step, self.chunk = step, chunk
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
               target: torch.Tensor) -> None:
        if saliency.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"saliency must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}; "
                             f"got {tuple(saliency.shape)}.")
        curves = perturbation_curves(model, images, saliency, target, self.step, self.mode, self.chunk)
        self.scores.append(auc(curves))

    def compute(self) -> torch.Tensor:
        return dim_zero_cat(self.scores).mean()


class DeletionAUC(_PerturbationAUC):
    """Most important pixels set to zero first: a faithful map makes the probability fall fast."""

    higher_is_better = False
    mode = "deletion"


class InsertionAUC(_PerturbationAUC):
    """Most important pixels restored first into a blurred image: a faithful map makes the probability rise fast."""

    higher_is_better = True
    mode = "insertion"


class AttributionInMask(Metric):
    """Pointing game hit rate ("pointing") or attribution mass share ("mass") inside the ground-truth part masks.
    update(saliency (B, H, W), part_masks (B, P, H', W') bool); masks are resized to the saliency size."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, kind: str = "mass", **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in ("mass", "pointing"):
            raise ValueError(f"kind must be 'mass' or 'pointing'; got {kind!r}.")
        self.kind = kind
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, saliency: torch.Tensor, part_masks: torch.Tensor) -> None:
        inside = part_masks.any(1, keepdim=True).float()  # (B, 1, H', W') union of the parts
        inside = F.interpolate(inside, size=saliency.shape[-2:], mode="nearest")[:, 0] > 0  # (B, H, W)
        saliency = saliency.abs().float()
        if self.kind == "mass":
            score = (saliency * inside).flatten(1).sum(1) / saliency.flatten(1).sum(1).clamp(min=1e-12)
        else:
            score = inside.flatten(1).gather(1, saliency.flatten(1).argmax(1, keepdim=True))[:, 0].float()
        self.total += score.sum()
        self.count += len(score)

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)
