"""ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods"): remove a share
of the pixels in saliency order, fill them by noisy linear imputation, and ask the model again.

- MoRF (most relevant first) removes the top p of the pixels, LeRF (least relevant first) the bottom p, for each p of
  `percentages` (the paper's 10%, 20%, ..., 90%). The score at each p is the model's accuracy on the imputed images
  (argmax == the explained class), what the paper plots and its code's `run_road` returns first; "probability" (the
  explained class's softmax probability, the code's second output) is smoother on few images. The metric is the mean
  over the percentages (the area under the curve). MoRF: lower is better; LeRF: higher is better.
- Noisy linear imputation, as the authors' `NoisyLinearImputer` (github.com/tleemann/road_evaluation,
  road/imputations.py): each removed pixel is the weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal;
  at the image border the neighbours outside are dropped and the mean is over the rest, as their `sum_neighbors`),
  solved jointly for all removed pixels (a removed neighbour is an unknown too): one sparse linear system per image,
  the channels as right-hand sides; then N(0, noise^2) noise (std 0.01, their default) is added to the removed pixels.
  Away from the border the imputer reproduces any image linear in the pixel coordinates.
- Ranking: `saliency_rank` (ties in a fixed random order; the authors add 1e-4 noise to the min-max normalised map).

Departures: the map is the zoo's `saliency_map` convention (absolute attribution summed over channels, as for every
metric here; the authors sum signed attributions); p * H * W is rounded (their code truncates); the noise is drawn
from a generator seeded per call, so a score is reproducible.

The solve runs in SciPy's sparse LU (SuperLU) on the CPU, all images of one percentage as one block-diagonal system:
it is exact, and takes about 0.15 s per percentage for 16 images of 64x64 pixels on one core (2.5 s for MoRF and LeRF
at 9 percentages). The system is a graph Laplacian with the kept pixels as Dirichlet boundary, so its conditioning
grows with the removed region: batched conjugate gradients in torch (a 3x3 stencil as the product) needed ~200
iterations at 64x64 for a 1e-5 relative residual and were ~3x slower. This runs at evaluation only, never in a
training step; images and masks go to the CPU and back once per percentage.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

from zoo.explain.faithfulness import MeanScore, check_saliency, saliency_rank, target_scores

PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# (row offset, column offset, weight) of the 8 neighbours; the weights sum to 1
NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6), (1, -1, 1 / 12),
              (1, 0, 1 / 6), (1, 1, 1 / 12))


def noisy_linear_imputation(images: torch.Tensor, removed: torch.Tensor, noise: float = 0.01,
                            seed: int = 0) -> torch.Tensor:
    """`images` (B, C, H, W) with the `removed` (B, H, W) pixels imputed (module doc), same device and dtype.

    For each removed pixel i: sum_j w_ij x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j over its neighbours j
    inside the image; the equations of all images form one block-diagonal sparse system, built vectorised over the
    removed pixels (one pass per neighbour offset) and solved in float64.
    """
    batch, channels, height, width = images.shape
    if removed.shape != (batch, height, width):
        raise ValueError(f"removed must be (B, H, W) = {(batch, height, width)}; got {tuple(removed.shape)}.")
    if removed.flatten(1).all(1).any():
        raise ValueError("Every pixel of an image is removed: there is nothing to impute from.")
    # (B*H*W, C), a copy: for float64 images on the CPU `.to` is the caller's tensor and, with B == 1 or C == 1, the
    # permuted reshape a view of it, which `values[unknown] = ...` below would overwrite
    values = images.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, channels).clone()
    is_removed = removed.detach().cpu().reshape(-1)  # (B*H*W,)
    unknown = is_removed.nonzero()[:, 0]  # (n,) flat pixel ids of the unknowns
    n = len(unknown)
    if n == 0:
        return images.clone()
    variable = torch.full(is_removed.shape, -1, dtype=torch.long)
    variable[unknown] = torch.arange(n)  # flat pixel id -> unknown's index
    image, pixel = unknown // (height * width), unknown % (height * width)
    row, column = pixel // width, pixel % width
    equation = torch.arange(n)
    diagonal = torch.zeros(n, dtype=torch.float64)  # weight of the neighbours inside the image
    right = torch.zeros(n, channels, dtype=torch.float64)  # weighted kept neighbours
    rows, columns, weights = [equation], [equation], []
    for d_row, d_column, weight in NEIGHBOURS:  # every unknown at once, per offset
        r, c = row + d_row, column + d_column
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        neighbour = image * height * width + r.clamp(0, height - 1) * width + c.clamp(0, width - 1)  # (n,)
        diagonal += weight * inside
        also_unknown, kept = inside & is_removed[neighbour], inside & ~is_removed[neighbour]
        rows.append(equation[also_unknown])
        columns.append(variable[neighbour[also_unknown]])
        weights.append(torch.full((len(rows[-1]),), -weight, dtype=torch.float64))
        right[kept] += weight * values[neighbour[kept]]
    matrix = csc_matrix((torch.cat([diagonal, *weights]).numpy(),
                         (torch.cat(rows).numpy(), torch.cat(columns).numpy())), shape=(n, n))
    solution = torch.from_numpy(spsolve(matrix, right.numpy(), permc_spec="MMD_AT_PLUS_A")).view(n, channels)
    jitter = torch.randn((n, channels), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values[unknown] = solution + noise * jitter
    return values.view(batch, height, width, channels).permute(0, 3, 1, 2).to(images.device, images.dtype)


def road_curves(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
                target: torch.Tensor, order: str = "morf", percentages: Sequence[float] = PERCENTAGES,
                score: str = "accuracy", noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """The explained class's score after removing each share of `percentages` of the pixels in `order` ("morf":
    most relevant first, "lerf": least relevant first) and imputing them: (B, P). `model` maps images to logits;
    `score` is "accuracy" or "probability" (`target_scores`)."""
    check_saliency(images, saliency)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf'; got {order!r}.")
    if not all(0 <= share < 1 for share in percentages):
        raise ValueError(f"percentages must lie in [0, 1); got {tuple(percentages)}.")
    rank = saliency_rank(saliency, seed).view_as(saliency)  # (B, H, W), 0 = most relevant
    pixels = rank.shape[1] * rank.shape[2]
    curve = []
    for step, share in enumerate(percentages):  # one joint imputation of every image per percentage
        count = round(share * pixels)
        removed = rank < count if order == "morf" else rank >= pixels - count
        curve.append(target_scores(model, noisy_linear_imputation(images, removed, noise, seed + step), target, score))
    return torch.stack(curve, 1)


class _ROAD(MeanScore):
    """Mean over the percentages of the ROAD curve (`road_curves`). update(model, images (B, C, H, W), saliency
    (B, H, W), target (B,)); `model` maps images to logits."""

    order: str

    def __init__(self, percentages: Sequence[float] = PERCENTAGES, score: str = "accuracy", noise: float = 0.01,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentages, self.score, self.noise, self.seed = tuple(percentages), score, noise, seed

    def scores(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, saliency: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        return road_curves(model, images, saliency, target, self.order, self.percentages, self.score, self.noise,
                           self.seed).mean(1)


class RoadMoRF(_ROAD):
    """Most relevant pixels removed first: a faithful map makes the score fall fast."""

    higher_is_better = False
    order = "morf"


class RoadLeRF(_ROAD):
    """Least relevant pixels removed first: a faithful map keeps the score up."""

    higher_is_better = True
    order = "lerf"
