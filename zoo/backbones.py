"""Feature extractors: any timm CNN through ``features_only=True`` plus a tiny built-in CNN for CPU runs.

Every backbone returns a list of feature maps and says their channels and strides (reductions), so a family
head (ICNN filters, L2X selector, AOG parser, LSTM explainer) can sit on any of them. Pretrained weights come
from a local file only (no hub at run time).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn as nn

from zoo.checks import check_input
from zoo.weights import CheckpointError, match_state_dict, read_state_dict

log = logging.getLogger(__name__)

TINY_CNN = "tinycnn"


def conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False), nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True)
    )


class TinyCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU stages at strides 2, 4, 8, 8: an 8x8 top map on 64x64 inputs, trains in minutes on CPU."""

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (32, 64, 128, 128)) -> None:
        super().__init__()
        pools = (True, True, True, False)
        chans = [in_chans, *widths]
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_relu(chans[i], chans[i + 1]), nn.MaxPool2d(2) if pools[i] else nn.Identity())
            for i in range(len(widths))
        )
        self.channels = list(widths)
        self.reductions = [2, 4, 8, 8]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class Backbone(nn.Module):
    """A CNN that returns the feature maps at `out_indices`, with `channels` and `reductions` for each."""

    def __init__(
        self,
        name: str = TINY_CNN,
        *,
        in_chans: int = 3,
        out_indices: Sequence[int] = (-1,),
        pretrained_path: str | Path | None = None,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.name, self.in_chans = name, in_chans
        if name == TINY_CNN:
            body = TinyCNN(in_chans)
            stage_ids = [range(len(body.channels))[i] for i in out_indices]
            self.channels = [body.channels[i] for i in stage_ids]
            self.reductions = [body.reductions[i] for i in stage_ids]
            self._tiny_ids = stage_ids
        else:
            if not timm.is_model(name):
                close = difflib.get_close_matches(name, [TINY_CNN, *timm.list_models()], n=5, cutoff=0.5)
                raise ValueError(f"Unknown backbone {name!r}. Did you mean: {', '.join(close) or TINY_CNN}?")
            body = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans,
                                     out_indices=tuple(out_indices))
            self.channels = list(body.feature_info.channels())
            self.reductions = list(body.feature_info.reduction())
            self._tiny_ids = None
        self.body = body
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)
        self.requires_grad_(not frozen)  # a frozen backbone: fine-tune only what sits on top

    @property
    def num_features(self) -> int:
        """Channels of the last (top) returned map."""
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(f"Backbone {self.name!r}", x, ("B", self.in_chans, "H", "W"), "images")
        maps = self.body(x)
        return [maps[i] for i in self._tiny_ids] if self._tiny_ids is not None else maps

    def load_pretrained(self, path: str | Path) -> None:
        """Load a local weight file; missing or mis-shaped backbone weights raise, unused ones are logged."""
        own = self.body.state_dict()
        state, missing, unexpected = match_state_dict(read_state_dict(path), list(own))
        bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in state.items() if v.shape != own[k].shape]
        if missing or bad_shapes:
            raise CheckpointError(
                f"{str(path)!r} does not fit backbone {self.name!r}: {len(missing)} missing keys {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}; shape mismatches {bad_shapes[:8]}."
            )
        if unexpected:
            log.warning("Ignored %d keys of %s not in backbone %r: %s", len(unexpected), path, self.name,
                        unexpected[:8])
        self.body.load_state_dict(state)


class PooledLinearHead(nn.Module):
    """Global average pool -> dropout -> linear: the classifier every family shares with its opaque twin."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return pooled if pre_logits else self.fc(self.drop(pooled))

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.in_features, num_classes)


class ClassifierHeadMixin:
    """timm's `reset_classifier` for every model whose classifier is `self.head`: an `nn.Linear` or a
    `PooledLinearHead` (the one reset_classifier of the zoo)."""

    head: nn.Module
    num_classes: int

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        if isinstance(self.head, PooledLinearHead):
            self.head.reset(num_classes)
        else:
            self.head = nn.Linear(self.head.in_features, num_classes)


class PooledHeadMixin(ClassifierHeadMixin):
    """timm's head API for models whose classifier is `self.head`, a `PooledLinearHead`."""

    head: PooledLinearHead

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(features, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc
