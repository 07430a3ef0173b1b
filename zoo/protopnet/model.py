"""ProtoPNet (Chen, Li, Tao, Barnett, Su, Rudin: "This Looks Like That", NeurIPS 2019) on any zoo backbone.

x -> backbone top map -> `add_on` (1x1 conv, ReLU, 1x1 conv, Sigmoid: D channels; by default Kaiming-normal
fan-out weights and zero biases, as the authors' code) -> latent map z (B, D, h, w)
-> `prototypes` (m per class, each a 1x1 patch p_j in R^D owned by one class): squared distances
d_j(h, w) = ||z(h, w) - p_j||^2 = ||z||^2 - 2 z.p_j + ||p_j||^2 (one 1x1 convolution for every prototype) -> min
over positions -> similarity g_j = log((d_j + 1) / (d_j + eps)) -> `last_layer` (linear P -> C, no bias; w = 1 to
the own class, -0.5 to the others at initialisation) -> class logits. Faithful to the paper and the authors' code.

Twins (`head="linear"`): the same backbone (with the add-on layers when `add_on=True`) with a pooled linear head, the
spec's opaque twins. Their "units" are the top map's channels; `class_units` picks each class's m channels of
largest head weight, so the part metrics score them exactly as they score the prototypes.

Output dict:
    logits (B, C); unit_maps (B, U, h, w) what the part metrics and pictures read: per-position similarity maps
    log((d + 1) / (d + eps)) of the P prototypes, or the twin's top map; latent (B, D, h, w) z. ProtoPNet also:
    min_distances (B, P), last_layer_weight (C, P) (the L1 term reads its wrong-class entries) and
    prototype_class (P,) the class owning each prototype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.backbones import TINY_CNN, Backbone, cells_to_pixels, like, model_map_geometry
from zoo.checks import check_new_head
from zoo.layers import in_weights_dtype
from zoo.registry import register_model

EPSILON = 1e-4  # the paper's epsilon in log((d + 1) / (d + eps))
HEADS = ("prototypes", "linear")
ADD_ON_INITS = ("authors", "pytorch")  # how the add-on convolutions start (`ProtoPNet` add_on_init)


def squared_distances(latent: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||z(h, w) - p_j||^2 for every position and prototype, (B, D, h, w) x (P, D) -> (B, P, h, w), as
    ||z||^2 - 2 z.p + ||p||^2 (one matmul, clamped at 0 against rounding); in float32 under any autocast."""
    with torch.autocast(device_type=latent.device.type, enabled=False):
        z, p = latent.float(), prototypes.float()
        cross = torch.einsum("bdhw,pd->bphw", z, p)  # (B, P, h, w)
        distances = z.pow(2).sum(1, keepdim=True) - 2 * cross + p.pow(2).sum(1)[None, :, None, None]
    return distances.clamp(min=0)


def similarity(distances: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """The paper's log((d + 1) / (d + eps)): large where a patch is close to a prototype."""
    return torch.log((distances + 1) / (distances + eps))


class PrototypeLayer(nn.Module):
    """The P prototypes (P, D), class by class (class c owns rows [c*m, (c+1)*m)), and where push found each one:
    `source_index` (P,) the training image (-1 before any push), `source_position` (P, 2) the latent cell (row,
    column) and `source_box` (P, 4) that cell's footprint in image pixels, xyxy: one cell's share of the image
    (image size / map size) centred on the cell's receptive-field centre (`zoo.protopnet.push.apply_push`), not its
    whole receptive field, nor the paper's 95th-percentile box of the upsampled similarity map."""

    def __init__(self, num_classes: int, per_class: int, channels: int) -> None:
        super().__init__()
        self.per_class = per_class
        self.vectors = nn.Parameter(torch.rand(num_classes * per_class, channels))  # uniform, as the authors' code
        self.register_buffer("prototype_class", torch.arange(num_classes).repeat_interleave(per_class))
        self.register_buffer("source_index", torch.full((num_classes * per_class,), -1, dtype=torch.long))
        self.register_buffer("source_position", torch.zeros(num_classes * per_class, 2, dtype=torch.long))
        self.register_buffer("source_box", torch.zeros(num_classes * per_class, 4))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return squared_distances(latent, self.vectors)  # (B, P, h, w)


class ProtoPNet(nn.Module):
    """Backbone -> add-on layers -> prototype distances -> similarities -> linear class scores (or, as a twin, a
    pooled linear head). See the module docstring.

    Args:
        backbone: a zoo backbone name (tinycnn, any timm CNN, torchvision:<name>).
        num_classes: C. prototypes_per_class: m (the paper: 10); for a twin, the channels per class its part
            metrics score.
        prototype_channels: D, the add-on layers' output (the paper: 128 on CUB).
        head: "prototypes" (ProtoPNet) or "linear" (the twin: global average pool + linear).
        add_on: the twin keeps the add-on layers (ProtoPNet always has them).
        incorrect_class_weight: the last layer's initial weight to the other classes' prototypes (the paper: -0.5).
        add_on_init: how the add-on convolutions start: "authors" (Kaiming-normal, fan-out, zero biases: the
            authors' `_initialize_weights`) or "pytorch" (PyTorch's default, uniform fan-in with biases: on the tiny
            CNN's parts world ProtoPNet learns faster from it at a 6-epoch budget, docs/results.md).
        feature_index: which backbone stage feeds the add-on layers (-1: the top map, as the paper); an earlier,
            finer map gives prototypes smaller receptive fields. The tiny CNN still runs its later stages, whose
            parameters then get no gradient (under DDP set the strategy's find_unused_parameters).
        in_chans, pretrained_path, freeze_backbone: as every zoo classifier.
    """

    def __init__(self, *, backbone: str = TINY_CNN, num_classes: int = 10, prototypes_per_class: int = 10,
                 prototype_channels: int = 128, head: str = "prototypes", add_on: bool = True,
                 incorrect_class_weight: float = -0.5, add_on_init: str = "authors", feature_index: int = -1,
                 in_chans: int = 3,
                 pretrained_path: str | Path | None = None, freeze_backbone: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}; got {head!r}.")
        if add_on_init not in ADD_ON_INITS:
            raise ValueError(f"add_on_init must be one of {ADD_ON_INITS}; got {add_on_init!r}.")
        if prototypes_per_class < 1 or prototype_channels < 1:
            raise ValueError(f"prototypes_per_class and prototype_channels must be >= 1; got {prototypes_per_class}, "
                             f"{prototype_channels}.")
        self.num_classes, self.per_class, self.head = num_classes, prototypes_per_class, head
        self.incorrect_class_weight = incorrect_class_weight
        self.backbone = Backbone(backbone, in_chans=in_chans, out_indices=(feature_index,),
                                 pretrained_path=pretrained_path, frozen=freeze_backbone)
        width = self.backbone.num_features
        self.add_on = nn.Sequential(
            nn.Conv2d(width, prototype_channels, 1), nn.ReLU(),
            nn.Conv2d(prototype_channels, prototype_channels, 1), nn.Sigmoid(),
        ) if head == "prototypes" or add_on else nn.Identity()
        for layer in self.add_on.modules():  # the authors' `_initialize_weights` (cfchen-duke/ProtoPNet model.py)
            if isinstance(layer, nn.Conv2d) and add_on_init == "authors":
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        latent = prototype_channels if isinstance(self.add_on, nn.Sequential) else width
        if head == "prototypes":
            self.prototypes = PrototypeLayer(num_classes, prototypes_per_class, latent)
            self.last_layer = nn.Linear(num_classes * prototypes_per_class, num_classes, bias=False)
            self.set_last_layer_connections()
        else:
            self.last_layer = nn.Linear(latent, num_classes)

    @property
    def has_prototypes(self) -> bool:
        return self.head == "prototypes"

    def set_last_layer_connections(self) -> None:
        """The paper's initial last layer: 1 from each prototype to its class, `incorrect_class_weight` elsewhere."""
        own = F.one_hot(self.prototypes.prototype_class, self.num_classes).T.float()  # (C, P)
        with torch.no_grad():
            self.last_layer.weight.copy_(own + self.incorrect_class_weight * (1 - own))

    # ------------------------------------------------------------------------------------------ the data path
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """z: the add-on layers on the backbone's top map, (B, D, h, w)."""
        return self.add_on_latent(self.forward_features(x))

    def add_on_latent(self, features: torch.Tensor) -> torch.Tensor:
        """z = add_on(features) (B, D, h, w), in float32 with autocast off: the distances are float32, and push
        (float32) puts each prototype on a latent patch, so under bf16 autocast a bf16 Sigmoid output would put
        every prototype about 4e-5 (median squared distance) away from its own source patch. Two 1x1 convs on the
        top map: the backbone's features alone are bf16. A model whose weights are themselves bf16 (`model.bfloat16()`,
        Lightning's "bf16-true") runs them in its weights' dtype."""
        with in_weights_dtype(self.add_on, features) as cast:  # in the weights' dtype: float32 under autocast
            return self.add_on(cast)

    @property
    def num_units(self) -> int:
        """U, how many units the part metrics can score: P prototypes, or the twin's top-map channels."""
        return self.last_layer.in_features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_latent(self.latent(x))

    def forward_latent(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head on z (B, D, h, w): logits, the unit maps and (ProtoPNet) each prototype's smallest distance;
        "pre_logits" is what the last layer reads: the prototypes' similarities (B, P) or the pooled z (B, D)."""
        if not self.has_prototypes:
            # in the last layer's dtype: without add-on layers z is promoted to float32 (`in_weights_dtype`)
            pooled = latent.mean(dim=(2, 3)).to(self.last_layer.weight.dtype)  # (B, D)
            return {"logits": self.last_layer(pooled), "pre_logits": pooled, "unit_maps": latent, "latent": latent}
        distances = self.prototypes(latent)  # (B, P, h, w)
        min_distances = distances.flatten(2).amin(-1)  # (B, P)
        scores = similarity(min_distances).to(self.last_layer.weight.dtype)  # (B, P)
        return {"logits": self.last_layer(scores), "pre_logits": scores, "unit_maps": similarity(distances),
                "latent": latent, "min_distances": min_distances, "last_layer_weight": self.last_layer.weight,
                "prototype_class": self.prototypes.prototype_class}

    def class_units(self) -> torch.Tensor:
        """(C, m): the units scored for each class: its own prototypes, or (twin) the m top-map channels of largest
        weight in the linear head."""
        if self.has_prototypes:
            return torch.arange(self.num_classes * self.per_class,
                                device=self.last_layer.weight.device).view(self.num_classes, self.per_class)
        return self.last_layer.weight.topk(min(self.per_class, self.last_layer.in_features), dim=1).indices

    def class_map(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """(B, h, w): the evidence for class `target` (B,) at each position. ProtoPNet: each prototype's similarity
        map times its positive connection to the class (relu of the last layer's row), the evidence FOR the class
        (spec, "Explanations"). Not the whole row: similarities share a large positive constant, so the (C - 1) m
        wrong-class prototypes at -0.5 outweighed the m own ones at +1 everywhere and the clipped map was zero.
        The twin: its class activation map (the whole row, negative weights included)."""
        weights = self.last_layer.weight[target].to(out["unit_maps"].dtype)  # (B, U)
        if self.has_prototypes:
            weights = weights.relu()  # the connections for the class only
        return torch.einsum("bu,buhw->bhw", weights, out["unit_maps"])

    def own_explanation(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What `zoo.explain(model, images)` ("own") shows: `class_map` upsampled to the image, (B, H, W), each cell
        at its receptive-field centre (`cells_to_pixels`, as the part metrics place it), negative values (the twin's
        evidence against the class) clipped as for a class activation map (ProtoPNet's map is not negative)."""
        maps = self.class_map(self(inputs), target)  # (B, h, w)
        return cells_to_pixels(maps, inputs.shape[-2:], model_map_geometry(self, inputs.shape[-2:])).relu()

    # --------------------------------------------------------------------------- the zoo's classifier head API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]  # (B, F, h, w), the backbone's top map

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class logits from the backbone's top map (add-on layers, prototypes, last layer); `pre_logits`: what the
        last layer reads instead (the prototype similarities, or the twin's pooled map)."""
        return self.forward_latent(self.add_on_latent(features))["pre_logits" if pre_logits else "logits"]

    def get_classifier(self) -> nn.Module:
        return self.last_layer

    @property
    def pool_type(self) -> str:
        """timm's name of the pool the last layer reads through (`reset_classifier`'s global_pool): "max" for
        ProtoPNet (each prototype's similarity map at its best position, its smallest distance), "avg" for the
        twin (its pooled latent map)."""
        return "max" if self.has_prototypes else "avg"

    @property
    def num_features(self) -> int:
        """timm's `num_features`: what the last layer (`get_classifier`) reads, `forward_head(pre_logits=True)`'s
        width: P prototype similarities, or the twin's D pooled channels (`num_units`)."""
        return self.last_layer.in_features

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes`: new prototypes (m per class) and last layer; backbone and add-on kept.
        `global_pool`: None or the model's `pool_type`."""
        check_new_head(self, num_classes, global_pool, self.pool_type)
        weight = self.last_layer.weight  # the new layers take its device and dtype
        self.num_classes = num_classes
        if self.has_prototypes:
            channels = self.prototypes.vectors.shape[1]
            self.prototypes = like(PrototypeLayer(num_classes, self.per_class, channels), weight)
            self.last_layer = like(nn.Linear(num_classes * self.per_class, num_classes, bias=False), weight)
            self.set_last_layer_connections()
        else:
            self.last_layer = like(nn.Linear(self.last_layer.in_features, num_classes), weight)


def _create_protopnet(backbone: str, **kwargs) -> ProtoPNet:
    return ProtoPNet(backbone=backbone, **kwargs)


@register_model
def protopnet_tinycnn(**kwargs) -> ProtoPNet:
    """ProtoPNet (Chen et al. 2019) on the tiny CNN: m prototypical 1x1 parts per class on an 8x8 map at 64 px."""
    return _create_protopnet(TINY_CNN, **kwargs)


@register_model
def protopnet_resnet18(**kwargs) -> ProtoPNet:
    """ProtoPNet on timm resnet18."""
    return _create_protopnet("resnet18", **kwargs)


@register_model
def protopnet_vgg16(**kwargs) -> ProtoPNet:
    """ProtoPNet on timm vgg16's convolutional part (one of the paper's backbones)."""
    return _create_protopnet("vgg16", **kwargs)


@register_model
def protopnet_timm(backbone: str = "resnet18", **kwargs) -> ProtoPNet:
    """ProtoPNet on any timm CNN: ``create_model("protopnet_timm", backbone="densenet121")``."""
    return _create_protopnet(backbone, **kwargs)
