"""Does a filter fire on one part, at one place? Location instability and part IoU (torchmetrics, DDP-safe).

- `LocationInstability` (Zhang et al. 2018, authors' computeStability/getDistSqrtVar): for each filter take the
  top-N images by peak activation (within the filter's category when labels are given), map the peak unit to image
  coordinates (receptive-field centre of the unit, measured per backbone: `zoo.backbones.Backbone.map_geometry`),
  and for each landmark k take the std over those images of the distance landmark -> peak; the score is the mean
  over filters and landmarks divided by the image diagonal. Lower is better. Images whose peak ties the N-th
  largest all count (so the top N may hold more than N): which of equal peaks (a dead filter's zeros) made the cut
  once depended on the order the images arrived in, and so on the number of processes. The authors' Matlab `sort`
  kept the first in data set order; where top_n is at least a category's image count (the default 100 on the parts
  world's validation split) nothing changes.
- `PartIoU` (Network Dissection, Bau et al. 2017, as specified for ICNN): per filter, threshold T_f at the top
  `quantile` of all its activations (the maps' cells) over the data set, then upsample each map bilinearly to the
  masks' size (each cell at its receptive-field centre, as Network Dissection upsamples by the unit's receptive
  field, given the backbone's measured geometry) and binarise it at T_f, and count the images whose IoU with a
  ground-truth part mask exceeds `iou_threshold`; P_{f,k} is that fraction over the images containing part k. The
  score is the mean over filters of max_k P_{f,k}. Higher is better. Parts are the ground-truth part types when
  given (so "filter 17 = red triangle"), else mask slots.

Both keep per-image tensors in "cat" states (`zoo.distributed.CatStateMetric`), which sync a process that saw no
image (with an unrepeated evaluation sampler a rank may have none) instead of aborting the gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.utilities import dim_zero_cat

from zoo.backbones import MapGeometry, cells_to_pixels
from zoo.distributed import CatStateMetric


def peak_positions(maps: torch.Tensor, image_size: tuple[int, int], stride: float | tuple[float, float] | None = None,
                   offset: float | tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak value (B, F) and its receptive-field centre in image pixels, (B, F, 2) as (x, y), clipped to the image:
    cell i's centre is `offset` + i x `stride` ((y, x) pairs or one number for both; see
    `zoo.backbones.MapGeometry`, which `Backbone.map_geometry` measures). Without an offset, (i + 0.5) x stride, right
    for nets that downsample by 2 x 2 pools (the tiny CNN, VGG) and not for padded strided convolutions (ResNet,
    MobileNet: about i x stride + 0.5). Without a stride, (i + 0.5) x image / map cells, the same where the image is a
    multiple of the stride (elsewhere the network drops the last pixels and the cells spread)."""
    height, width = maps.shape[-2:]
    value, index = maps.flatten(2).max(-1)
    step_y, step_x = _pair(stride) if stride else (image_size[0] / height, image_size[1] / width)
    offset_y, offset_x = _pair(offset) if offset is not None else (step_y / 2, step_x / 2)
    x = (index % width * step_x + offset_x).clamp(0, image_size[1])
    y = (torch.div(index, width, rounding_mode="floor") * step_y + offset_y).clamp(0, image_size[0])
    return value, torch.stack([x, y], -1)


def _num_images(state: list[torch.Tensor] | torch.Tensor) -> int:
    """Images in a "cat" state: a list of per-batch tensors, or one tensor once synced (shapes only: no device read).
    """
    return len(state) if torch.is_tensor(state) else sum(len(part) for part in state)


def _pair(value: float | tuple[float, float]) -> tuple[float, float]:
    return (value, value) if isinstance(value, (int, float)) else tuple(value)


class LocationInstability(CatStateMetric):
    """Mean over filters and landmarks of std(distance landmark -> filter peak) over each filter's top-N images
    where the landmark is visible (with every image whose peak ties the N-th), divided by the image diagonal.
    update(maps (B, F, h, w), landmarks (B, K, 2) xy, visible (B, K) or None, labels (B,) or None). `stride` and
    `offset`: where the maps' cells sit in the image, (y, x) pixels (see `peak_positions`).

    With labels, a filter's top-N images are drawn from its category only, as in the paper's per-category
    evaluation (landmark k of another class is another part). The category is the class with the highest mean
    peak activation on the evaluated data: one rule for interpretable and opaque models alike.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, image_size: int | tuple[int, int], top_n: int = 100,
                 stride: float | tuple[float, float] | None = None, offset: float | tuple[float, float] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.top_n, self.stride, self.offset = top_n, stride, offset
        self.add_state("peaks", default=[], dist_reduce_fx="cat")  # (n, F) peak values
        self.add_state("distances", default=[], dist_reduce_fx="cat")  # (n, F, K)
        self.add_state("visible", default=[], dist_reduce_fx="cat")  # (n, K)
        self.add_state("labels", default=[], dist_reduce_fx="cat")  # (n,), -1 without labels

    def update(self, maps: torch.Tensor, landmarks: torch.Tensor, visible: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> None:
        if maps.ndim != 4 or landmarks.ndim != 3 or landmarks.shape[:1] != maps.shape[:1]:
            raise ValueError(f"Expected maps (B, F, h, w) and landmarks (B, K, 2); got {tuple(maps.shape)} and "
                             f"{tuple(landmarks.shape)}.")
        value, position = peak_positions(maps.detach().float(), self.image_size, self.stride, self.offset)
        self.peaks.append(value)
        self.distances.append((landmarks[:, None].float() - position[:, :, None]).norm(dim=-1))  # (B, F, K)
        self.visible.append(torch.ones(landmarks.shape[:2], dtype=torch.bool, device=maps.device)
                            if visible is None else visible.bool())
        self.labels.append(torch.full((len(maps),), -1, device=maps.device) if labels is None else labels.long())

    def per_filter(self) -> torch.Tensor:
        """Instability per filter and landmark (F, K), NaN where fewer than two visible images."""
        if _num_images(self.peaks) == 0:
            raise ValueError("LocationInstability: no images to score (no update since creation or reset); "
                             "`compute()` gives NaN then.")
        peaks, distances = dim_zero_cat(self.peaks), dim_zero_cat(self.distances)
        visible, labels = dim_zero_cat(self.visible).float(), dim_zero_cat(self.labels)
        if (labels >= 0).all():
            one_hot = F.one_hot(labels).float()  # (N, C)
            class_mean = (one_hot.t() @ peaks) / one_hot.sum(0).clamp(min=1)[:, None]  # (C, F)
            own = labels[:, None] == class_mean.argmax(0)[None, :]  # (N, F): image of the filter's category
            peaks = torch.where(own, peaks, torch.full_like(peaks, -math.inf))
        # each (filter, landmark) ranks only the images where the landmark is visible, then takes its top N (the
        # authors' getDistSqrtVar.m drops invalid images before taking the top N, not after), and every image tied
        # with the N-th: the set never depends on the order the images came in
        ranked = torch.where(visible[:, None, :].bool(), peaks[..., None], torch.full_like(distances, -math.inf))
        cut = ranked.topk(min(self.top_n, len(peaks)), dim=0).values[-1]  # (F, K) the N-th largest peak
        v = ((ranked >= cut) & torch.isfinite(ranked)).float()  # (N, F, K) in the top N, visible, of the category
        count = v.sum(0)
        mean = (distances * v).sum(0) / count.clamp(min=1)
        variance = (v * (distances - mean) ** 2).sum(0) / (count - 1).clamp(min=1)  # unbiased, as Matlab's var
        diagonal = math.hypot(*self.image_size)
        return torch.where(count >= 2, variance.sqrt() / diagonal, torch.full_like(mean, math.nan))

    def compute(self) -> torch.Tensor:
        if _num_images(self.peaks) == 0:  # nothing to score (no update, or after reset): NaN, left out of means
            return torch.tensor(math.nan, device=self.device)
        return self.per_filter().nanmean()


class PartIoU(CatStateMetric):
    """Network-Dissection part interpretability: mean over filters of the best part's hit rate.
    update(maps (B, F, h, w), part_masks (B, P, H, W) bool, part_types (B, P) long or None).

    `stride` and `offset`: where the maps' cells sit in an `image_size` image, (y, x) pixels (one number for both),
    as `LocationInstability` takes them (`zoo.backbones.MapGeometry`, measured by `Backbone.map_geometry`): each map
    is upsampled with its cells at their receptive-field centres (`zoo.backbones.cells_to_pixels`), half a cell from
    the even spread on resnet and mobilenet. Masks of another size than `image_size` get the geometry scaled to
    theirs. Without an offset (no measured geometry) the cells spread evenly over the masks (`F.interpolate`,
    align_corners=False), which is exact for 2 x 2 max-pool nets on a multiple of their stride."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_parts: int | None = None, quantile: float = 0.005, iou_threshold: float = 0.2,
                 filter_chunk: int = 16, image_size: int | tuple[int, int] | None = None,
                 stride: float | tuple[float, float] | None = None, offset: float | tuple[float, float] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_parts, self.quantile, self.iou_threshold, self.filter_chunk = num_parts, quantile, iou_threshold, \
            filter_chunk
        if offset is not None and stride is None:
            raise ValueError("PartIoU: an `offset` needs its `stride` (where the maps' cells sit, in pixels).")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.geometry = None  # MapGeometry of the cells in `image_size` pixels, where measured
        if offset is not None:
            (stride_y, stride_x), (offset_y, offset_x) = _pair(stride), _pair(offset)
            self.geometry = MapGeometry((float(stride_y), float(stride_x)), (float(offset_y), float(offset_x)))
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")
        self.add_state("types", default=[], dist_reduce_fx="cat")

    def update(self, maps: torch.Tensor, part_masks: torch.Tensor, part_types: torch.Tensor | None = None) -> None:
        if maps.ndim != 4 or part_masks.ndim != 4 or maps.shape[0] != part_masks.shape[0]:
            raise ValueError(f"Expected maps (B, F, h, w) and part_masks (B, P, H, W); got {tuple(maps.shape)} and "
                             f"{tuple(part_masks.shape)}.")
        if part_types is None:
            part_types = torch.arange(part_masks.shape[1], device=maps.device).expand(maps.shape[0], -1)
        self.maps.append(maps.detach().float())
        self.masks.append(part_masks.bool())
        self.types.append(part_types.long())

    def part_scores(self) -> torch.Tensor:
        """P_{f,k}: fraction of the images containing part k where filter f's binarised map has IoU > threshold."""
        if _num_images(self.maps) == 0:
            raise ValueError("PartIoU: no images to score (no update since creation or reset); "
                             "`compute()` gives NaN then.")
        maps, masks, types = dim_zero_cat(self.maps), dim_zero_cat(self.masks), dim_zero_cat(self.types)
        num_parts = self.num_parts or int(types.max()) + 1
        size = masks.shape[-2:]
        mask_flat = masks.flatten(2).float()  # (N, P, HW)
        mask_area = mask_flat.sum(-1)  # (N, P)
        part_onehot = F.one_hot(types, num_parts).float()  # (N, P, K)
        images_with_part = part_onehot.amax(1).sum(0)  # (K,)
        geometry = self.mask_geometry(size)
        scores = []
        for start in range(0, maps.shape[1], self.filter_chunk):  # chunks of filters bound memory, no per-filter loop
            chunk = maps[:, start:start + self.filter_chunk]  # (N, f, h, w)
            flat = chunk.transpose(0, 1).flatten(1)  # (f, N*h*w): T_f on the activations, as Network Dissection
            k = min(max(1, int(self.quantile * flat.shape[1])), flat.shape[1] - 1)
            threshold = flat.topk(k + 1, dim=1).values[:, -1]  # (f,): the top k values lie above, P(x > T_f) = q
            up = cells_to_pixels(chunk, size, geometry)  # (N, f, H, W): cells at their receptive-field centres
            active = (up > threshold[None, :, None, None]).flatten(2).float()  # (N, f, HW)
            inter = torch.einsum("nfx,npx->nfp", active, mask_flat)
            union = active.sum(-1)[..., None] + mask_area[:, None] - inter
            hits = (inter / union.clamp(min=1) > self.iou_threshold).float()  # (N, f, P)
            scores.append(torch.einsum("nfp,npk->fk", hits, part_onehot) / images_with_part.clamp(min=1))
        return torch.cat(scores)  # (F, K)

    def mask_geometry(self, size: tuple[int, int]) -> MapGeometry | None:
        """The cells' geometry in the pixels of masks of `size` (H, W): the image's, resized where the masks have
        another size than `image_size`."""
        if self.geometry is None or self.image_size is None or tuple(size) == tuple(self.image_size):
            return self.geometry
        return self.geometry.resized(self.image_size, size)

    def compute(self) -> torch.Tensor:
        if _num_images(self.maps) == 0:  # nothing to score (no update, or after reset): NaN, left out of means
            return torch.tensor(math.nan, device=self.device)
        return self.part_scores().amax(1).mean()
