"""Concept Bottleneck Models (Koh et al., ICML 2020) and Concept Embedding Models (Espinosa Zarlenga et al., NeurIPS
2022) on any zoo backbone.

CBM: x -> backbone -> global average pool -> `concept_head` (linear to K concept logits, the bottleneck) -> sigmoid
-> `task_head` f (linear on the K concept probabilities) -> class logits. Faithful to the paper's x -> c -> y with a
linear f; the training modes (independent, sequential, joint) live in the System, which decides what f reads.

CEM: `concept_head` makes two embeddings per concept (c+_i, c-_i in R^m, one linear layer for all concepts and a
LeakyReLU), a scoring layer shared by all concepts gives p_i = sigmoid(s([c+_i, c-_i])), and f reads the mixtures
p_i c+_i + (1 - p_i) c-_i (K * m values). RandInt training (replace p_i by the truth with probability 0.25) is the
System's, since it needs the batch's concepts.

Standard twin (`bottleneck=False`): f reads the pooled features directly (the paper's "standard" model); the concept
head is a linear probe on the *detached* pooled features, so its loss trains the probe only, never the network.

Interventions: `decode(encoded, concepts, intervene)` replaces the probability of concept i of sample b by
`concepts[b, i]` wherever `intervene[b, i]` (truth 0/1, or the sigmoid of the paper's 5th/95th percentile logits).

Output dict:
    concept_logits (B, K) the bottleneck's (or the probe's) logits; concept_probs (B, K) the probabilities f read
    (after any intervention); logits (B, C); features (B, F, h, w) the backbone's top map; on request (`forward`'s
    `predicted` / `intervened`) logits_predicted (B, C) and logits_intervened (B, C).
Under autocast the concept layer runs in float32 (concept logits and probabilities are float32), f in autocast's
dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.backbones import TINY_CNN, Backbone, like
from zoo.checks import check_new_head
from zoo.layers import in_weights_dtype
from zoo.registry import register_model

PARTS_WORLD_CONCEPTS = 36  # the parts world's part types (6 shapes x 6 colours): its `attributes`


class ConceptEmbeddingHead(nn.Module):
    """CEM's concept layer: pooled features (B, F) -> embeddings (B, K, 2, m) and concept logits (B, K)."""

    def __init__(self, in_features: int, num_concepts: int, embedding_size: int) -> None:
        super().__init__()
        self.num_concepts, self.embedding_size = num_concepts, embedding_size
        self.embed = nn.Linear(in_features, num_concepts * 2 * embedding_size)  # every phi+_i, phi-_i at once
        self.score = nn.Linear(2 * embedding_size, 1)  # shared by all concepts, as in the paper

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pooled.shape[0]
        embeddings = F.leaky_relu(self.embed(pooled)).view(batch, self.num_concepts, 2, self.embedding_size)
        logits = self.score(embeddings.flatten(2)).squeeze(-1)  # (B, K)
        return logits, embeddings


class ConceptBottleneckModel(nn.Module):
    """Backbone -> concept logits (K) -> task logits (C); see the module docstring for the variants.

    Args:
        backbone: a zoo backbone name (tinycnn, any timm CNN, torchvision:<name>).
        num_classes: C; num_concepts: K (default: the parts world's 36 part types).
        embedding_size: m > 0 makes it a Concept Embedding Model; 0 is the plain CBM.
        bottleneck: False: the standard twin (f on the features, a detached linear concept probe).
        in_chans, pretrained_path, freeze_backbone: as every zoo classifier.
    """

    def __init__(self, *, backbone: str = TINY_CNN, num_classes: int = 10, num_concepts: int = PARTS_WORLD_CONCEPTS,
                 embedding_size: int = 0, bottleneck: bool = True, in_chans: int = 3,
                 pretrained_path: str | Path | None = None, freeze_backbone: bool = False) -> None:
        super().__init__()
        if num_concepts < 1 or embedding_size < 0:
            raise ValueError(f"num_concepts must be >= 1 and embedding_size >= 0; got {num_concepts}, "
                             f"{embedding_size}.")
        self.num_classes, self.num_concepts = num_classes, num_concepts
        self.embedding_size, self.bottleneck = embedding_size if bottleneck else 0, bottleneck
        self.backbone = Backbone(backbone, in_chans=in_chans, pretrained_path=pretrained_path, frozen=freeze_backbone)
        width = self.backbone.num_features
        if self.embedding_size:
            self.concept_head: nn.Module = ConceptEmbeddingHead(width, num_concepts, self.embedding_size)
        else:
            self.concept_head = nn.Linear(width, num_concepts)
        self.task_head = nn.Linear(self.task_inputs, num_classes)

    @property
    def task_inputs(self) -> int:
        """What f reads: K probabilities (CBM), K * m mixed embeddings (CEM) or the pooled features (standard)."""
        if not self.bottleneck:
            return self.backbone.num_features
        return self.num_concepts * max(self.embedding_size, 1)

    # ------------------------------------------------------------------------------------------ the data path
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything up to the bottleneck: features, pooled, concept_logits (and CEM's concept_embeddings)."""
        return self.encode_features(self.backbone(x)[-1])

    def encode_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encode` from the backbone's top map (B, F, h, w). The pooling and the concept head run in the head's
        weights' dtype with autocast off (`in_weights_dtype`: float32 under bf16 autocast; bf16 for a
        `model.bfloat16()` model), as ProtoPNet's add-on layers: bf16 concept logits kept 8 bits, so 500 images
        gave 494 distinct logits (of ~18,000) and the concept AUROC ranked mostly ties. The backbone's features alone are bf16."""
        with in_weights_dtype(self.concept_head, features) as cast:
            pooled = cast.mean(dim=(2, 3))  # (B, F)
            encoded = {"features": features, "pooled": pooled}
            if not self.bottleneck:
                encoded["concept_logits"] = self.concept_head(pooled.detach())  # a probe: trains nothing below it
            elif self.embedding_size:
                encoded["concept_logits"], encoded["concept_embeddings"] = self.concept_head(pooled)
            else:
                encoded["concept_logits"] = self.concept_head(pooled)  # (B, K)
        return encoded

    def decode(self, encoded: dict[str, torch.Tensor], concepts: torch.Tensor | None = None,
               intervene: torch.Tensor | None = None, detach: bool = False) -> dict[str, torch.Tensor]:
        """f on the bottleneck. Where `intervene` (B, K) is true, concept probabilities are `concepts` (B, K) in
        [0, 1]; `detach`: f reads the probabilities without a gradient to g (the sequential model)."""
        probs, task_input = self.bottleneck_output(encoded, concepts, intervene, detach)
        out = {"concept_logits": encoded["concept_logits"], "concept_probs": probs,
               "logits": self.task_head(task_input)}
        return out | ({"features": encoded["features"]} if "features" in encoded else {})

    def bottleneck_output(self, encoded: dict[str, torch.Tensor], concepts: torch.Tensor | None = None,
                          intervene: torch.Tensor | None = None, detach: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The concept probabilities (B, K), intervened as `decode` says, and what f reads (B, task_inputs). In the
        concept logits' dtype (float32 under autocast, `encode_features`): sigmoid and intervention values alike."""
        probs = torch.sigmoid(encoded["concept_logits"])  # (B, K)
        if intervene is not None:
            probs = torch.where(intervene, concepts.to(probs.dtype), probs)
        if detach:
            probs = probs.detach()
        if not self.bottleneck:
            return probs, encoded["pooled"]
        if self.embedding_size:
            embeddings = encoded["concept_embeddings"]  # (B, K, 2, m)
            p = probs[..., None]  # (B, K, 1)
            return probs, (p * embeddings[:, :, 0] + (1 - p) * embeddings[:, :, 1]).flatten(1)  # (B, K * m)
        return probs, probs

    def forward(self, x: torch.Tensor, concepts: torch.Tensor | None = None, intervene: torch.Tensor | None = None,
                detach: bool = False, *, predicted: bool = False, intervened: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Test-time intervention: where `intervene` (B, K) bool is true, f reads `concepts` (B, K) instead of g's
        probabilities (0 / 1 truth, or `zoo.cbm.intervene.replacement_values`).

        What a training or evaluation step also scores, in the same call (so `compile` captures the whole step):
        `predicted`: also `logits_predicted` (B, C), f on g's own probabilities, without gradient (how f does when
        an intervention fed it other values); `intervened` (B, K) true 0 / 1 concepts: also `logits_intervened`
        (B, C), f with every concept replaced by them."""
        if (concepts is None) != (intervene is None):
            raise ValueError("An intervention needs both `concepts` (B, K), the values to use, and `intervene` (B, K) "
                             "bool, which of them replace the model's; got only "
                             f"{'concepts' if intervene is None else 'intervene'}.")
        if intervene is not None and (intervene.dtype != torch.bool or intervene.shape != concepts.shape
                                      or intervene.shape[-1] != self.num_concepts):
            raise ValueError(f"intervene must be a bool (B, {self.num_concepts}) mask of the concepts' shape; got "
                             f"{intervene.dtype} {tuple(intervene.shape)} for concepts {tuple(concepts.shape)}.")
        encoded = self.encode(x)
        out = self.decode(encoded, concepts, intervene, detach)
        if predicted:
            with torch.no_grad():
                out["logits_predicted"] = self.decode(encoded)["logits"]  # (B, C); f alone, cheap
        if intervened is not None:
            everything = torch.ones_like(intervened, dtype=torch.bool)
            out["logits_intervened"] = self.decode(encoded, intervened, everything)["logits"]  # (B, C)
        return out

    # --------------------------------------------------------------------------- the zoo's classifier head API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]  # (B, F, h, w)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class logits from the top map (no intervention): what post-hoc explainers and the contract call;
        `pre_logits`: what f reads instead (the concept probabilities, CEM's mixed embeddings, or the twin's pooled
        features)."""
        task_input = self.bottleneck_output(self.encode_features(features))[1]
        return task_input if pre_logits else self.task_head(task_input)

    def get_classifier(self) -> nn.Module:
        return self.task_head

    pool_type = "avg"  # timm's name of the pool before the concept head (`reset_classifier`'s global_pool)

    @property
    def num_features(self) -> int:
        """timm's `num_features`: what f (`get_classifier`) reads, `forward_head(pre_logits=True)`'s width: K concept
        probabilities (CBM), K * m mixed embeddings (CEM) or the pooled backbone features (the standard twin)."""
        return self.task_inputs

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new f for `num_classes` (the concept layer, what transfers, is kept); `global_pool`: None or "avg"."""
        check_new_head(self, num_classes, global_pool, self.pool_type)
        self.num_classes = num_classes
        self.task_head = like(nn.Linear(self.task_inputs, num_classes), self.task_head.weight)


def _create_cbm(backbone: str, **kwargs) -> ConceptBottleneckModel:
    return ConceptBottleneckModel(backbone=backbone, **kwargs)


@register_model
def cbm_tinycnn(**kwargs) -> ConceptBottleneckModel:
    """Concept bottleneck model (Koh et al. 2020) on the tiny CNN: image -> K concepts -> linear f -> class."""
    return _create_cbm(TINY_CNN, **kwargs)


@register_model
def cbm_resnet18(**kwargs) -> ConceptBottleneckModel:
    """Concept bottleneck model on timm resnet18."""
    return _create_cbm("resnet18", **kwargs)


@register_model
def cbm_timm(backbone: str = "resnet18", **kwargs) -> ConceptBottleneckModel:
    """Concept bottleneck model on any timm CNN: ``create_model("cbm_timm", backbone="efficientnet_b0")``."""
    return _create_cbm(backbone, **kwargs)


@register_model
def cem_tinycnn(embedding_size: int = 16, **kwargs) -> ConceptBottleneckModel:
    """Concept embedding model (Espinosa Zarlenga et al. 2022) on the tiny CNN: two embeddings per concept."""
    return _create_cbm(TINY_CNN, embedding_size=embedding_size, **kwargs)
