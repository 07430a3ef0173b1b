"""Opaque classifiers: a backbone and a pooled linear head, the twin every interpretable family is compared with.

Output dict: ``{"logits": (B, num_classes), "features": (B, C, h, w)}`` (the top feature map, so post-hoc
explainers such as LayerGradCam and the interpretability metrics can read the same layer as the family model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from zoo._registry import register_model
from zoo.backbones import TINY_CNN, Backbone, PooledHeadMixin, PooledLinearHead


class OpaqueClassifier(PooledHeadMixin, nn.Module):
    """Backbone -> global average pool -> linear."""

    def __init__(
        self,
        *,
        backbone: str = TINY_CNN,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        pretrained_path: str | Path | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = Backbone(backbone, in_chans=in_chans, pretrained_path=pretrained_path)
        self.backbone.requires_grad_(not freeze_backbone)
        self.head = PooledLinearHead(self.backbone.num_features, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(x)
        return {"logits": self.forward_head(features), "features": features}



def _create_baseline(backbone: str, **kwargs) -> OpaqueClassifier:
    return OpaqueClassifier(backbone=backbone, **kwargs)


@register_model
def baseline_tinycnn(**kwargs) -> OpaqueClassifier:
    """Tiny 4-stage CNN (stride 8), the CPU default."""
    return _create_baseline(TINY_CNN, **kwargs)


@register_model
def baseline_resnet18(**kwargs) -> OpaqueClassifier:
    """timm resnet18 (stride 32)."""
    return _create_baseline("resnet18", **kwargs)


@register_model
def baseline_vgg11(**kwargs) -> OpaqueClassifier:
    """timm vgg11 convolutional part (stride 32); VGG is the ICNN paper's main architecture."""
    return _create_baseline("vgg11", **kwargs)


@register_model
def baseline_vgg16(**kwargs) -> OpaqueClassifier:
    """timm vgg16 convolutional part (stride 32)."""
    return _create_baseline("vgg16", **kwargs)


@register_model
def baseline_timm(backbone: str = "resnet18", **kwargs) -> OpaqueClassifier:
    """Any timm CNN by name: ``create_model("baseline_timm", backbone="efficientnet_b0")``."""
    return _create_baseline(backbone, **kwargs)
