"""Push (Chen et al. 2019, section 2.2): replace every prototype by the latent patch of a training image of its own
class that is nearest to it, so that each prototype *is* a part of a real image, and record which one.

One batched pass, vectorised over images, positions and prototypes, with a running minimum per prototype kept on
the device; under DDP each process pushes over its shard of the training set and the per-prototype minima (with
their patches and sources) are all-gathered, the smallest kept, so every process ends with the same prototypes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from zoo.backbones import MapGeometry
from zoo.protopnet.model import ProtoPNet


def push_source(trainer: Any) -> tuple[Dataset, DataLoader]:
    """The training images push reads, and the training loader (its batch size and collate function): the
    datamodule's training split without augmentation (`train_samples(augment=False)`), as the paper's push loader
    reads the unaugmented training set; a random flip on every read pushed prototypes onto flipped images and drew
    their sources with another flip. Data without that hook: the training loader's dataset."""
    datamodule = trainer.datamodule
    loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
    samples = getattr(datamodule, "train_samples", None)
    return (loader.dataset if samples is None else samples(augment=False)), loader


def push_loader(dataset: Dataset, batch_size: int, collate_fn: Any, world_size: int, rank: int
                ) -> tuple[DataLoader, torch.Tensor]:
    """A sequential loader over this process's shard of `dataset`, and the dataset index of each sample it yields."""
    if world_size > 1:
        sampler: Any = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        sampler = range(len(dataset))
    indices = torch.tensor(list(sampler), dtype=torch.long)
    return DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(), collate_fn=collate_fn), indices


@torch.no_grad()
def nearest_patches(model: ProtoPNet, loader: DataLoader, indices: torch.Tensor, input_key: str, target_key: str,
                    device: torch.device, convert_input: Callable[[Any], Any] | None = None
                    ) -> dict[str, torch.Tensor]:
    """For each prototype the nearest latent patch among the loader's images of its class: `distance` (P,) (inf
    where the class has no image here), `vector` (P, D) float32, `source_index` (P,) dataset index,
    `source_position` (P, 2) latent (row, column), and the latent map's `size` (2,).

    `convert_input`: each batch as the run's steps get it (the System passes `zoo.engine.callbacks.precision_input`:
    float images in bf16 under "bf16-true", float64 under "64-true", whose backbones refuse float32 images); None:
    the loader's batches as they are."""
    layer = model.prototypes
    owner = layer.prototype_class  # (P,)
    count, channels = layer.vectors.shape
    best = {"distance": torch.full((count,), float("inf"), device=device),
            "vector": layer.vectors.detach().float().clone(),
            "source_index": torch.full((count,), -1, dtype=torch.long, device=device),
            "source_position": torch.zeros(count, 2, dtype=torch.long, device=device),
            "size": torch.ones(2, dtype=torch.long, device=device)}
    seen = 0
    for batch in loader:
        if convert_input is not None:
            batch = convert_input(batch)
        images, labels = batch[input_key].to(device), batch[target_key].to(device)
        latent = model.latent(images).float()  # (B, D, h, w)
        batch_size, _, height, width = latent.shape
        distances = layer(latent)  # (B, P, h, w)
        other_class = labels[:, None] != owner[None, :]  # (B, P)
        distances = distances.masked_fill(other_class[..., None, None], float("inf"))
        value, where = distances.permute(1, 0, 2, 3).flatten(1).min(1)  # (P,) over every image and position
        patches = latent.permute(0, 2, 3, 1).reshape(-1, channels)  # (B*h*w, D), row = (b*h + row)*w + column
        image, cell = where // (height * width), where % (height * width)
        better = value < best["distance"]  # (P,)
        best["distance"] = torch.where(better, value, best["distance"])
        best["vector"] = torch.where(better[:, None], patches[where], best["vector"])
        source = indices[seen:seen + batch_size].to(device)[image]
        best["source_index"] = torch.where(better, source, best["source_index"])
        position = torch.stack([cell // width, cell % width], 1)
        best["source_position"] = torch.where(better[:, None], position, best["source_position"])
        best["size"] = torch.tensor([height, width], device=device)
        seen += batch_size
    return best


def keep_nearest(found: dict[str, torch.Tensor], all_gather: Callable[[torch.Tensor], torch.Tensor],
                 world_size: int) -> dict[str, torch.Tensor]:
    """Across processes, each prototype's nearest patch: all-gather every entry and keep, per prototype, the
    process with the smallest distance (the lowest rank on ties). Identity for one process."""
    if world_size == 1:
        return found
    gathered = {key: all_gather(value) for key, value in found.items()}  # each (W, ...)
    winner = gathered["distance"].argmin(0)  # (P,)
    prototypes = torch.arange(len(winner), device=winner.device)
    return {key: value[0] if key == "size" else value[winner, prototypes] for key, value in gathered.items()}


@torch.no_grad()
def apply_push(model: ProtoPNet, found: dict[str, torch.Tensor], image_size: tuple[int, int],
               geometry: MapGeometry | None = None) -> torch.Tensor:
    """Move each prototype that found a patch onto it and record its source image, latent cell and that cell's box
    in image pixels (xyxy): one cell's size (image size / map size) centred on the cell's receptive-field centre
    (`geometry`, the backbone's measured `MapGeometry`; without it, the cell's even share of the image), clipped to
    the image. Returns the distance each moved by, (P,) (NaN where its class had no training image)."""
    layer = model.prototypes
    found_one = torch.isfinite(found["distance"])  # (P,)
    old = layer.vectors.detach().float().clone()
    layer.vectors.copy_(torch.where(found_one[:, None], found["vector"], old).to(layer.vectors.dtype))
    layer.source_index.copy_(torch.where(found_one, found["source_index"], layer.source_index))
    layer.source_position.copy_(torch.where(found_one[:, None], found["source_position"], layer.source_position))
    size = torch.tensor(image_size, device=old.device, dtype=torch.float32)  # (2,) (H, W)
    cell = size / found["size"]  # (2,) pixels per latent cell, (y, x)
    position = found["source_position"].float()  # (P, 2) row, column
    if geometry is None:
        centre = (position + 0.5) * cell
    else:
        centre = torch.tensor(geometry.offset, device=old.device) + position * torch.tensor(geometry.stride,
                                                                                            device=old.device)
    low, high = (centre - cell / 2).clamp(min=0), torch.minimum(centre + cell / 2, size)  # (P, 2) y, x
    box = torch.stack([low[:, 1], low[:, 0], high[:, 1], high[:, 0]], 1)  # (P, 4) xyxy
    layer.source_box.copy_(torch.where(found_one[:, None], box, layer.source_box))
    moved = (layer.vectors.float() - old).norm(dim=1)
    return torch.where(found_one, moved, torch.full_like(moved, float("nan")))
