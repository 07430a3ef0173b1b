"""Post-hoc explainers from Captum, and the self-explanation of pooled-head models, as (B, H, W) saliency maps.

Every method returns `saliency_map` conventions (absolute attribution summed over channels), so that all maps
are scored by the same faithfulness metrics. Models are zoo models returning dicts; Captum sees logits only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from captum.attr import (DeepLift, InputXGradient, IntegratedGradients, KernelShap, LayerGradCam, Lime, Occlusion,
                         Saliency)

from zoo.backbones import cells_to_pixels, model_map_geometry  # cells_to_pixels: also imported from here
from zoo.explain.faithfulness import saliency_map

POSTHOC_METHODS = ("saliency", "integrated_gradients", "layer_gradcam", "occlusion")
SELF_EXPLANATION = "cam"
FEATURE_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "deeplift", "kernel_shap", "lime")
PERTURBATION_METHODS = ("kernel_shap", "lime")  # one surrogate model per sample, fit on `n_samples` perturbations


def perturbation_samples(method: str) -> tuple[str, int | None]:
    """"lime:5000" -> ("lime", 5000): a perturbation method may carry its sample count; any other name -> (name,
    None)."""
    name, _, count = method.partition(":")
    if count and (name not in PERTURBATION_METHODS or not count.isdigit() or int(count) < 1):
        raise ValueError(f"{method!r}: only {PERTURBATION_METHODS} take a sample count, a positive integer "
                         "(e.g. 'lime:5000').")
    return name, int(count) if count else None


class LogitsOnly(nn.Module):
    """A zoo model seen as images -> logits, as Captum expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["logits"]


def class_activation_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model's own explanation when its head is global-average-pool + linear: sum_f w_{target,f} A_f, which
    decomposes the target logit exactly over positions (Zhou et al. 2016). (B, H, W), negative parts clipped; each
    cell drawn at its receptive-field centre (`cells_to_pixels`), where ICNN's location instability places it."""
    with torch.no_grad():
        features = model.forward_features(images)  # (B, F, h, w)
        weights = model.get_classifier().weight[target].float()  # (B, F), float as the features (bf16 models)
        cam = torch.einsum("bf,bfhw->bhw", weights, features.float())
        return cells_to_pixels(cam, images.shape[-2:], model_map_geometry(model, images.shape[-2:])).relu()


def explain(model: nn.Module, images: torch.Tensor, target: torch.Tensor, method: str,
            internal_batch_size: int = 64) -> torch.Tensor:
    """Saliency (B, H, W) of `method` for the `target` class: one of POSTHOC_METHODS or "cam"."""
    if method == SELF_EXPLANATION:
        return class_activation_map(model, images, target)
    forward = LogitsOnly(model)
    images = images.detach().clone().requires_grad_(method in ("saliency", "integrated_gradients"))
    if method == "saliency":
        attribution = Saliency(forward).attribute(images, target=target)
    elif method == "integrated_gradients":
        attribution = IntegratedGradients(forward).attribute(images, target=target, n_steps=32,
                                                             internal_batch_size=internal_batch_size)
    elif method == "layer_gradcam":  # on the head's input: the top feature map every zoo classifier pools
        cam = LayerGradCam(forward, model.head).attribute(images, target=target, attribute_to_layer_input=True,
                                                          relu_attributions=True)  # (B, 1, h, w)
        # each cell at its receptive-field centre, on the own CAM's grid (Captum's `LayerAttribution.interpolate`
        # spreads the cells evenly: half a cell off on resnet / mobilenet)
        attribution = cells_to_pixels(cam, images.shape[-2:], model_map_geometry(model, images.shape[-2:]))
    elif method == "occlusion":
        channels = images.shape[1]
        attribution = Occlusion(forward).attribute(images, target=target, sliding_window_shapes=(channels, 8, 8),
                                                   strides=(channels, 8, 8), perturbations_per_eval=64)
    else:
        raise ValueError(f"Unknown explainer {method!r}; choose from {(SELF_EXPLANATION, *POSTHOC_METHODS)}.")
    return saliency_map(attribution.detach())


class TokenPresence(nn.Module):
    """A text classifier on fixed token ids (B, L) seen as (B, L) float token presences -> logits, so Captum's
    feature methods explain token positions, the features L2X selects. Each token's embedding is scaled by its
    presence, in every `nn.Embedding` that reads the text (a selector's scorer and its predictor both see the token
    removed): 1 is the text as it is, 0 the zero vector, which is the padding embedding, i.e. what L2X's masking
    gives an unselected token. Captum batches IG steps as repeats of the batch, so the tokens are repeated to the
    presences' length; KernelShap and Lime perturb one text at a time (`attribute_features` runs them per text)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens
        self.embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not self.embeddings:
            raise ValueError(f"{type(model).__name__} has no nn.Embedding: token inputs cannot be attributed.")
        self.embedding = self.embeddings[0]

    def forward(self, presence: torch.Tensor) -> torch.Tensor:
        if len(presence) % len(self.tokens):
            raise ValueError(f"{len(presence)} presence rows for {len(self.tokens)} texts: perturbation methods "
                             f"explain one text at a time.")
        tokens = self.tokens.repeat(len(presence) // len(self.tokens), 1)  # (B', L)

        def scale(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            # (B', L, E) embeddings of the text: scaled; an embedding of something else (a class) passes
            # (in the embeddings' dtype: float32 presences made a bf16 model's embeddings float32, refused by its conv)
            return out * presence.unsqueeze(-1).to(out.dtype) if out.shape[:2] == presence.shape else out

        hooks = [embedding.register_forward_hook(scale) for embedding in self.embeddings]
        try:
            return self.model(tokens)["logits"]
        finally:
            for hook in hooks:
                hook.remove()


def attribute_features(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, method: str,
                       feature_mask: torch.Tensor | None = None, num_features: int | None = None,
                       n_samples: int | None = None) -> torch.Tensor:
    """Per-feature importance (B, d) of a Captum method for the `target` class, for ranking against ground truth.

    Vectors: one feature per entry. Images: `feature_mask` (1, 1, H, W) gives each pixel's feature (patch) id;
    KernelShap and Lime perturb whole patches, gradient methods' |attribution| is summed per patch. Token ids
    (B, L): one feature per position, attributed through `TokenPresence` (presence 1 vs baseline 0 = padding);
    padding positions score 0 (they are not part of the text; KernelShap's regression would give them noise).
    Captum's default sample counts unless `n_samples` is given (KernelShap 25, Lime 50 perturbations per sample;
    IG 50 steps), zero baselines. The original packages draw far more (lime's text explainer 5000, shap's
    KernelExplainer 2 d + 2048), which is what the L2X paper compared against.
    """
    tokens = None if inputs.is_floating_point() else inputs
    if tokens is not None and method in ("kernel_shap", "lime") and len(tokens) > 1:
        # Captum perturbs one example at a time: each text gets its own presences, over its own tokens
        return torch.cat([attribute_features(model, tokens[i:i + 1], target[i:i + 1], method, feature_mask,
                                             num_features, n_samples) for i in range(len(tokens))])
    forward = LogitsOnly(model) if tokens is None else TokenPresence(model, tokens)
    if tokens is not None:
        inputs = torch.ones(tokens.shape, device=tokens.device)  # (B, L) presences
    inputs = inputs.detach().clone().requires_grad_(method not in ("kernel_shap", "lime"))
    if method == "saliency":
        attribution = Saliency(forward).attribute(inputs, target=target, abs=True)
    elif method == "input_x_gradient":
        attribution = InputXGradient(forward).attribute(inputs, target=target)
    elif method == "integrated_gradients":
        attribution = IntegratedGradients(forward).attribute(inputs, target=target, internal_batch_size=4096)
    elif method == "deeplift":
        attribution = DeepLift(forward).attribute(inputs, target=target)
    elif method in ("kernel_shap", "lime"):
        explainer = KernelShap(forward) if method == "kernel_shap" else Lime(forward)
        samples = {} if n_samples is None else {"n_samples": n_samples}
        attribution = explainer.attribute(inputs, target=target, feature_mask=feature_mask, perturbations_per_eval=64,
                                          **samples)
    else:
        raise ValueError(f"Unknown feature attribution method {method!r}; choose from {FEATURE_METHODS}.")
    attribution = attribution.detach().abs()
    if tokens is not None and forward.embedding.padding_idx is not None:
        return attribution.masked_fill(tokens == forward.embedding.padding_idx, 0.0)
    if feature_mask is None:
        return attribution.flatten(1)
    ids = feature_mask.expand_as(attribution).flatten(1)  # (B, C*H*W) feature id of every input element
    scores = torch.zeros(len(attribution), num_features or int(ids.max()) + 1, device=attribution.device)
    return scores.scatter_add_(1, ids, attribution.flatten(1).float())
