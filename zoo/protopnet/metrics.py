"""Does a prototype (or a twin's channel) stand for one part? Part consistency, stability and part IoU against the
parts world's masks (torchmetrics, DDP-safe: every state is a sum).

For each scored unit on each image of its class (ProtoPNet: its own prototypes; a twin: the m channels of largest
head weight for that class), the map is upsampled to the image (bilinear between cells; with the backbone's measured
`zoo.backbones.MapGeometry`, each cell at its receptive-field centre, which on resnet / mobilenet lies half a cell
from the even spread the authors' `cv2.resize` gives) and its activated region is the top `1 - quantile` of its
pixels (the paper's 95th percentile). The region *hits* the part type whose mask it overlaps
most (background when it overlaps none).

- part consistency (Huang et al., CVPR 2023): the fraction of units that hit one part type on at least
  `threshold` (0.8) of their images.
- part stability (same paper): the fraction of images on which a unit hits the same part with Gaussian noise added
  to the image, averaged over units.
- part IoU: the IoU of the region with the part mask it overlaps most, averaged over a unit's images and units.
Higher is better for all three; the math is in functional helpers, as torchmetrics' regression/mae.py.

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


def part_hits(regions: torch.Tensor, part_masks: torch.Tensor, part_types: torch.Tensor, background: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The part type each region overlaps most ((B, m), `background` where it overlaps no part) and its IoU with
    that part's mask ((B, m)). regions (B, m, N) bool, part_masks (B, P, N) bool, part_types (B, P)."""
    region, mask = regions.float(), part_masks.float()
    overlap = torch.einsum("bun,bpn->bup", region, mask)  # (B, m, P)
    union = region.sum(-1, keepdim=True) + mask.sum(-1)[:, None, :] - overlap
    most, part = overlap.max(-1)  # (B, m)
    iou = (overlap / union.clamp(min=1)).gather(-1, part[..., None])[..., 0]
    hit = torch.where(most > 0, part_types.gather(1, part), torch.full_like(part, background))
    return hit, iou


class PartConsistency(Metric):
    """update(maps (B, m, h, w), units (B, m) unit ids, part_masks (B, P, H, W) bool, part_types (B, P),
    noisy_maps (B, m, h, w) or None: the same units on the noisy images, geometry: where the maps' cells sit in the
    masks' pixels, `MapGeometry` or None for an even spread). compute() -> {"consistency", "stability", "iou"} over
    the units scored at least once.

    Args:
        num_units: U, the ids units take; num_part_types: T (the parts world: 36).
        quantile: the activated region is the top 1 - quantile of the upsampled map (the paper: 0.95).
        threshold: a unit is consistent when one part type takes this share of its images (Huang et al.: 0.8).
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
        self.add_state("hits", default=torch.zeros(num_units, num_part_types + 1, dtype=count), dist_reduce_fx="sum")
        self.add_state("iou", default=torch.zeros(num_units, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros(num_units, dtype=count), dist_reduce_fx="sum")
        self.add_state("stable", default=torch.zeros(num_units, dtype=count), dist_reduce_fx="sum")
        self.add_state("noisy_images", default=torch.zeros(num_units, dtype=count), dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, units: torch.Tensor, part_masks: torch.Tensor, part_types: torch.Tensor,
               noisy_maps: torch.Tensor | None = None, geometry: MapGeometry | None = None) -> None:
        if maps.ndim != 4 or units.shape != maps.shape[:2] or part_masks.ndim != 4 or len(part_masks) != len(maps):
            raise ValueError(f"Expected maps (B, m, h, w), units (B, m) and part_masks (B, P, H, W); got "
                             f"{tuple(maps.shape)}, {tuple(units.shape)} and {tuple(part_masks.shape)}.")
        size = part_masks.shape[-2:]
        masks = part_masks.flatten(2).bool()
        hit, iou = part_hits(activated_regions(maps, size, self.quantile, geometry), masks, part_types, self.num_part_types)
        units, hit = units.flatten(), hit.flatten()
        ones = torch.ones_like(units, dtype=self.images.dtype)
        self.hits.index_put_((units, hit), ones, accumulate=True)
        self.iou.index_add_(0, units, iou.flatten().to(self.iou.dtype))
        self.images.index_add_(0, units, ones)
        if noisy_maps is not None:
            noisy_hit, _ = part_hits(activated_regions(noisy_maps, size, self.quantile, geometry), masks, part_types,
                                     self.num_part_types)
            self.stable.index_add_(0, units, (noisy_hit.flatten() == hit).to(ones.dtype))
            self.noisy_images.index_add_(0, units, ones)

    def compute(self) -> dict[str, torch.Tensor]:
        scored = self.images > 0
        share = self.hits[:, : self.num_part_types].amax(1) / self.images.clamp(min=1)  # (U,) top part's share
        result = {"consistency": (share[scored] >= self.threshold).float().mean(),
                  "iou": (self.iou[scored] / self.images[scored]).mean()}
        noisy = self.noisy_images > 0
        if noisy.any():
            result["stability"] = (self.stable[noisy] / self.noisy_images[noisy]).mean()
        return result
