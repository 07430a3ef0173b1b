"""Opaque classifiers: a backbone and a pooled linear head, the twin every interpretable family is compared with.

Output dict: ``{"logits": (B, num_classes), "features": (B, C, h, w)}`` (the top feature map, so post-hoc
explainers such as LayerGradCam and the interpretability metrics can read the same layer as the family model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from zoo.checks import check_input
from zoo.registry import register_model
from zoo.backbones import (TINY_CNN, Backbone, ClassifierHeadMixin, PooledHeadMixin, PooledLinearHead,
                           top_conv_index)
from zoo.layers import LSTM


class OpaqueClassifier(PooledHeadMixin, nn.Module):
    """Backbone -> global average pool -> linear.

    `top_conv=True` reads the top conv layer's ReLU map (`zoo.backbones.top_conv_index`: VGG's conv5_3, stride 16)
    instead of the backbone's last feature (VGG's pool5, stride 32; the same map on other backbones): the plain twin
    of an Interpretable CNN, whose features are then scored on the layer the ICNN's filters read, at the same
    resolution."""

    def __init__(
        self,
        *,
        backbone: str = TINY_CNN,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        pretrained_path: str | Path | None = None,
        freeze_backbone: bool = False,
        top_conv: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        out_indices = (top_conv_index(backbone),) if top_conv else (-1,)
        self.backbone = Backbone(backbone, in_chans=in_chans, out_indices=out_indices, pretrained_path=pretrained_path,
                                 frozen=freeze_backbone)
        self.head = PooledLinearHead(self.backbone.num_features, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(x)
        return {"logits": self.forward_head(features), "features": features}


class MLPClassifier(ClassifierHeadMixin, nn.Module):
    """Dense-ReLU layers on (B, d) vectors; the black box explained by L2X and the post-hoc explainers on the
    synthetic benchmarks. Each ReLU is its own module, so Captum's DeepLift hooks every nonlinearity.

    `num_features` is d, the input vectors' size (the setting, as L2X's and INVASE's `num_features`), not timm's
    `num_features` (the width the classifier reads, every other classifier's): that is `head.in_features` here."""

    def __init__(self, *, num_features: int = 10, num_classes: int = 2, hidden: tuple[int, ...] = (200, 200)) -> None:
        super().__init__()
        self.in_features, self.num_classes = num_features, num_classes
        sizes = [num_features, *hidden]
        self.body = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(sizes[-1], num_classes)

    @property
    def num_features(self) -> int:  # the input's d, as the setting says (see the class docstring)
        return self.in_features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("MLPClassifier", x, ("B", self.num_features), "vectors", like=self)
        features = self.body(x)
        return {"logits": self.head(features), "features": features}


class SmallCNN(ClassifierHeadMixin, nn.Module):
    """The L2X paper's MNIST black box: Conv8-ReLU-pool-Conv16-ReLU-pool-Dense, the last pool adaptive (2x2) so
    any input size works; separate ReLU modules so Captum's DeepLift hooks each. No global pool (`pool_type` ""):
    the head reads the flattened 2x2 map."""

    def __init__(self, *, in_chans: int = 1, num_classes: int = 2, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
        )
        self.head = nn.Linear(4 * widths[1], num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("SmallCNN", x, ("B", self.in_chans, "H", "W"), "images", like=self)
        features = self.body(x)  # (B, 16, 2, 2)
        return {"logits": self.head(features.flatten(1)), "features": features}


class SeriesCNN(ClassifierHeadMixin, nn.Module):
    """Opaque 1-D CNN for series: four dilated width-7 convolutions (receptive field 91 steps), max + mean over
    time, linear; ReNN's opaque twin on rule_series."""

    pool_type = "catavgmax"  # max and mean over time, concatenated

    def __init__(self, *, in_chans: int = 1, num_classes: int = 4, width: int = 24, length: int | None = None) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        layers: list[nn.Module] = []
        for i, dilation in enumerate((1, 2, 4, 8)):
            layers += [nn.Conv1d(in_chans if i == 0 else width, width, 7, padding=3 * dilation, dilation=dilation),
                       nn.BatchNorm1d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("SeriesCNN", x, ("B", self.in_chans, "T"), "series", like=self)
        features = self.body(x)  # (B, width, T)
        return {"logits": self.head(torch.cat([features.amax(-1), features.mean(-1)], 1)), "features": features}


class SeriesLSTM(ClassifierHeadMixin, nn.Module):
    """Opaque LSTM for series: a width-5 convolution (local features, stride 2), one LSTM layer, max + last hidden
    state, linear; the recurrent opaque baseline on rule_series."""

    pool_type = "catmaxlast"  # max over time and the last state, concatenated (no timm pool)

    def __init__(self, *, in_chans: int = 1, num_classes: int = 4, hidden: int = 40, length: int | None = None
                 ) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.stem = nn.Sequential(nn.Conv1d(in_chans, 16, 5, stride=2, padding=2), nn.ReLU())
        self.lstm = LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("SeriesLSTM", x, ("B", self.in_chans, "T"), "series", like=self)
        states, _ = self.lstm(self.stem(x).transpose(1, 2))  # (B, T / 2, hidden)
        features = torch.cat([states.amax(1), states[:, -1]], 1)
        return {"logits": self.head(features), "features": states.transpose(1, 2)}


class TokenCNN(ClassifierHeadMixin, nn.Module):
    """Text classifier on (B, L) token ids (pad id 0): embedding, width-3 convolution, global max pool, linear
    (the L2X paper's IMDB black box, smaller)."""

    pool_type = "max"

    def __init__(self, *, vocab_size: int = 2000, num_classes: int = 2, max_len: int | None = None, embed_dim: int = 50,
                 width: int = 100) -> None:
        super().__init__()
        self.vocab_size, self.num_classes, self.max_len = vocab_size, num_classes, max_len
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.conv = nn.Conv1d(embed_dim, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input("TokenCNN", tokens, ("B", "L" if self.max_len is None else self.max_len), "token ids", "long",
                    ids_below=self.vocab_size)
        features = self.relu(self.conv(self.embed(tokens).transpose(1, 2))).amax(-1)  # (B, width)
        return {"logits": self.head(features), "features": features}



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


@register_model
def baseline_mlp(**kwargs) -> MLPClassifier:
    """Two-layer ReLU MLP on feature vectors (the synthetic L2X benchmarks' black box)."""
    return MLPClassifier(**kwargs)


@register_model
def baseline_smallcnn(**kwargs) -> SmallCNN:
    """Two-conv CNN for small images (the L2X paper's MNIST black box; digits 3 vs 8)."""
    return SmallCNN(**kwargs)


@register_model
def baseline_cnn1d(**kwargs) -> SeriesCNN:
    """Dilated 1-D CNN on series (receptive field 91 steps): ReNN's opaque convolutional baseline."""
    return SeriesCNN(**kwargs)


@register_model
def baseline_lstm(**kwargs) -> SeriesLSTM:
    """Convolutional stem + LSTM on series: ReNN's opaque recurrent baseline."""
    return SeriesLSTM(**kwargs)


@register_model
def baseline_textcnn(**kwargs) -> TokenCNN:
    """Embedding + convolution + max-pool text classifier on token ids."""
    return TokenCNN(**kwargs)
