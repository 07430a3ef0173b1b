"""Does a prototype (or a twin's channel) stand for one part? Part consistency, stability, purity and part IoU
against the parts world's masks (torchmetrics, DDP-safe: every state is a sum).

For each scored unit on each image of its class (ProtoPNet: its own prototypes; a twin: the m channels of largest
head weight for that class), the map is upsampled to the image (bilinear between cells; with the backbone's measured
`zoo.backbones.MapGeometry`, each cell at its receptive-field centre, which on resnet / mobilenet lies half a cell
from the even spread the authors' `cv2.resize` gives) and its activated region is the top `1 - quantile` of its
pixels (the paper's 95th percentile). As Huang et al. (CVPR 2023, their `evaluate_consistency` /
`evaluate_stability`), the region *touches* every part type whose mask it overlaps by at least one pixel: the
image's touched-part vector. (Their region is a fixed box around the map's maximum, scored against part keypoints;
here it is the top-quantile region above, scored against part masks.)

- part consistency: for each unit and part type, the share of the images where that part is present (of the unit's
  class) on which the region touches it; a unit is consistent when any part's share reaches `threshold` (0.8).
  The score is the fraction of consistent units. A region that covers two parts on every image is consistent.
- part stability: the fraction of a unit's images whose touched-part vector is the same with noise added to the
  image (`ProtoPNetSystem.stability_noise`), averaged over units.
- part purity (the zoo's earlier rule, kept as a stricter reading): the fraction of units whose single
  most-overlapped part type is the same on at least `threshold` of all their images (background when the region
  overlaps no part). A region split between two parts scores 0 here and 1 in consistency.
- part IoU: the IoU of the region with the part mask it overlaps most, averaged over a unit's images and units.
Higher is better for all four; the math is in functional helpers, as torchmetrics' regression/mae.py.

The stability noise of an image is a function of its data set index and a fixed seed (`image_noise`): the score
does not depend on the number of processes, the batch size or the image's place in its batch.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from zoo.backbones import MapGeometry, cells_to_pixels
from zoo.hashing import keyed_normal


def image_noise(index: torch.Tensor, shape: tuple[int, ...], seed: int = 0, device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """(B, *shape) standard Gaussian noise on `device`, image b's a function of (`seed`, `index[b]`) alone
    (`zoo.hashing.keyed_normal`: vectorised, on the device): the same noise for an image in any batch, position or
    process, and the global random stream untouched."""
    return keyed_normal(index.to(device), shape, seed)


def activated_regions(maps: torch.Tensor, size: tuple[int, int], quantile: float,
                      geometry: MapGeometry | None = None) -> torch.Tensor:
    """(B, m, h, w) maps -> (B, m, H*W) bool: the pixels at or above each upsampled map's `quantile`; `geometry`:
    where the cells sit in those pixels (`cells_to_pixels`; None spreads them evenly)."""
    upsampled = cells_to_pixels(maps.float(), size, geometry).flatten(2)
    pixels = upsampled.shape[-1]
    kept = max(1, round((1 - quantile) * pixels))  # the region's size (more on ties)
    threshold = upsampled.kthvalue(pixels - kept + 1, dim=-1, keepdim=True).values  # (B, m, 1) its smallest value
    return upsampled >= threshold


def part_overlaps(regions: torch.Tensor, part_masks: torch.Tensor) -> torch.Tensor:
    """(B, m, P) the pixels each region shares with each part mask, counted in float32 with autocast off (exact up
    to 2**24 pixels; a bf16 matmul under autocast would round the counts). regions (B, m, N) bool, part_masks
    (B, P, N) bool."""
    with torch.autocast(device_type=regions.device.type, enabled=False):
        return torch.einsum("bun,bpn->bup", regions.float(), part_masks.float())


def part_hits(regions: torch.Tensor, part_masks: torch.Tensor, part_types: torch.Tensor, background: int,
              overlap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The part type each region overlaps most ((B, m), `background` where it overlaps no part) and its IoU with
    that part's mask ((B, m)). regions (B, m, N) bool, part_masks (B, P, N) bool, part_types (B, P); overlap: their
    `part_overlaps` where already computed."""
    overlap = part_overlaps(regions, part_masks) if overlap is None else overlap  # (B, m, P)
    union = regions.sum(-1, keepdim=True) + part_masks.sum(-1)[:, None, :] - overlap
    most, part = overlap.max(-1)  # (B, m)
    iou = (overlap / union.clamp(min=1)).gather(-1, part[..., None])[..., 0]
    hit = torch.where(most > 0, part_types.gather(1, part), torch.full_like(part, background))
    return hit, iou


def touched_parts(overlap: torch.Tensor, part_types: torch.Tensor, num_part_types: int) -> torch.Tensor:
    """(B, m, T) bool: the part types each region touches (overlaps by at least one pixel any mask of that type),
    Huang et al.'s per-image part vector. overlap (B, m, P) (`part_overlaps`), part_types (B, P) in [0, T)."""
    batch, units, parts = overlap.shape
    index = part_types.long()[:, None, :].expand(batch, units, parts)
    touched = overlap.new_zeros(batch, units, num_part_types).scatter_add_(2, index, (overlap > 0).to(overlap.dtype))
    return touched > 0


def present_parts(part_masks: torch.Tensor, part_types: torch.Tensor, num_part_types: int) -> torch.Tensor:
    """(B, T) bool: the part types with at least one pixel in each image. part_masks (B, P, N) bool."""
    present = part_masks.any(-1).float()  # (B, P)
    return present.new_zeros(len(present), num_part_types).scatter_add_(1, part_types.long(), present) > 0


class PartConsistency(Metric):
    """update(maps (B, m, h, w), units (B, m) unit ids, part_masks (B, P, H, W) bool, part_types (B, P) in [0, T),
    noisy_maps (B, m, h, w) or None: the same units on the noisy images, geometry: where the maps' cells sit in the
    masks' pixels, `MapGeometry` or None for an even spread). compute() -> {"consistency", "purity", "iou",
    "stability"} over the units scored at least once (stability: where noisy maps came).

    Args:
        num_units: U, the ids units take; num_part_types: T (the parts world: 36).
        quantile: the activated region is the top 1 - quantile of the upsampled map (the paper: 0.95).
        threshold: a unit is consistent when the region touches one part type on this share of the images where
            that part is present (Huang et al.: 0.8); pure when one part type is the most overlapped on this share
            of its images.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_units: int, num_part_types: int = 36, quantile: float = 0.95, threshold: float = 0.8,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_part_types, self.quantile, self.threshold = num_part_types, quantile, threshold
        # counts are integers (a float count in bf16, which a module's `.to(torch.bfloat16)` gave the states, stopped
        # at 256); the IoU sum is float32
        count = torch.long
        types = num_part_types
        self.add_state("touched", default=torch.zeros(num_units, types, dtype=count), dist_reduce_fx="sum")
        self.add_state("present", default=torch.zeros(num_units, types, dtype=count), dist_reduce_fx="sum")
        self.add_state("hits", default=torch.zeros(num_units, types + 1, dtype=count), dist_reduce_fx="sum")
        self.add_state("iou", default=torch.zeros(num_units, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros(num_units, dtype=count), dist_reduce_fx="sum")
        self.add_state("stable", default=torch.zeros(num_units, dtype=count), dist_reduce_fx="sum")
        self.add_state("noisy_images", default=torch.zeros(num_units, dtype=count), dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, units: torch.Tensor, part_masks: torch.Tensor, part_types: torch.Tensor,
               noisy_maps: torch.Tensor | None = None, geometry: MapGeometry | None = None) -> None:
        if maps.ndim != 4 or units.shape != maps.shape[:2] or part_masks.ndim != 4 or len(part_masks) != len(maps):
            raise ValueError(f"Expected maps (B, m, h, w), units (B, m) and part_masks (B, P, H, W); got "
                             f"{tuple(maps.shape)}, {tuple(units.shape)} and {tuple(part_masks.shape)}.")
        size, types = part_masks.shape[-2:], self.num_part_types
        masks = part_masks.flatten(2).bool()
        regions = activated_regions(maps, size, self.quantile, geometry)
        overlap = part_overlaps(regions, masks)  # (B, m, P)
        hit, iou = part_hits(regions, masks, part_types, types, overlap)
        touched = touched_parts(overlap, part_types, types)  # (B, m, T)
        present = present_parts(masks, part_types, types)[:, None, :].expand_as(touched)  # (B, m, T)
        flat = units.flatten()  # (B*m,)
        ones = torch.ones_like(flat, dtype=self.images.dtype)
        self.touched.index_add_(0, flat, touched.flatten(0, 1).to(self.touched.dtype))
        self.present.index_add_(0, flat, present.flatten(0, 1).to(self.present.dtype))
        self.hits.index_put_((flat, hit.flatten()), ones, accumulate=True)
        self.iou.index_add_(0, flat, iou.flatten().to(self.iou.dtype))
        self.images.index_add_(0, flat, ones)
        if noisy_maps is not None:
            noisy = touched_parts(part_overlaps(activated_regions(noisy_maps, size, self.quantile, geometry), masks),
                                  part_types, types)
            self.stable.index_add_(0, flat, (noisy == touched).all(-1).flatten().to(ones.dtype))
            self.noisy_images.index_add_(0, flat, ones)

    def compute(self) -> dict[str, torch.Tensor]:
        scored = self.images > 0
        share = self.touched / self.present.clamp(min=1)  # (U, T) each part's share of the images it is present in
        consistent = (share >= self.threshold).any(1)  # (U,)
        top = self.hits[:, : self.num_part_types].amax(1) / self.images.clamp(min=1)  # (U,) top part's share
        result = {"consistency": consistent[scored].float().mean(),
                  "purity": (top[scored] >= self.threshold).float().mean(),
                  "iou": (self.iou[scored] / self.images[scored]).mean()}
        noisy = self.noisy_images > 0
        if noisy.any():
            result["stability"] = (self.stable[noisy] / self.noisy_images[noisy]).mean()
        return result
