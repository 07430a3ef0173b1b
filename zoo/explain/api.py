"""One explanation API for every model of the zoo: ``zoo.explain(model, images, method="own", target=None)``.

The convention every method follows: a float tensor of importances, >= 0, higher = more important for the
explained class, at the input's resolution: (B, H, W) for images (B, C, H, W), (B, T) for series (B, C, T), (B, d)
for vectors and token sequences (B, d). `target` is the class explained: None = the model's predicted class.

`method="own"` is the model's own explanation (what it computes to decide, not a post-hoc estimate). A model that
defines `own_explanation(inputs, target) -> Tensor` (in the convention above) gives it; that is how a new family
brings its own maps (prototype similarities, say) without touching this file. Otherwise, by the model's shape:
- pooled-head classifiers (the baselines, the Interpretable CNN): the class activation map, sum_f w_{c,f} A_f over
  the pooled feature maps, which for ICNN are its interpretable filters' maps (Zhou et al. 2016; exact: it
  decomposes the class logit over positions);
- feature selectors (L2X, INVASE): the selected features (1 kept, 0 dropped; the selection is the same for every
  class, `target` does not change it);
- ReNN: the strongest rule activation at each time step (max over rules of `rule_map`).
Detectors and sentence generators explain with boxes and sentences (their Systems' pictures), not maps: "own"
raises for them. Any other method is a Captum attribution (`zoo.explain.captum`): `POSTHOC_METHODS` for images,
`FEATURE_METHODS` for vectors and tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

OWN = "own"


def unwrap(model: nn.Module) -> nn.Module:
    """The registered model of a System (its `model`, the thing its `hparams.model_name` built), else `model`."""
    inner = getattr(model, "model", None)
    return inner if hasattr(model, "hparams") and isinstance(inner, nn.Module) else model


def own_explanation(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model's own map for `target` in the module convention (see the module docstring)."""
    from zoo.explain.captum import class_activation_map

    if callable(getattr(model, "own_explanation", None)):
        return model.own_explanation(inputs, target)
    if all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier")):
        return class_activation_map(model, inputs, target)
    if hasattr(model, "mask_input"):  # a feature selector: its selection, at the input's resolution
        with torch.no_grad():
            selection = model(inputs)["selection"].float()  # (B, d)
            if inputs.ndim == 4:
                return model.mask_input(torch.ones_like(inputs[:, :1], dtype=torch.float32), selection)[:, 0]
            return selection
    if hasattr(model, "rule_names"):  # ReNN: rule activations (B, R, T') per step, resized to the series length
        with torch.no_grad():
            strongest = model(inputs)["rule_map"].float().amax(1, keepdim=True)  # (B, 1, T')
            return F.interpolate(strongest, size=inputs.shape[-1], mode="linear", align_corners=False)[:, 0]
    raise ValueError(f"{type(model).__name__} has no own explanation map (detectors explain with boxes, generators "
                     f"with sentences); use a Captum method instead.")


def explain(model: nn.Module, images: torch.Tensor, method: str = OWN,
            target: int | torch.Tensor | None = None) -> torch.Tensor:
    """Importance maps of `method` ("own" or a Captum method name) for class `target` (None: the prediction).

    Args:
        model: a System (its model is explained) or a bare registered model returning {"logits": ...}.
        images: a batch as the model takes it, normalised as in training: (B, C, H, W) images, (B, C, T)
            series, (B, d) vectors or token ids.
        method: "own" (the model's own explanation) or one of `zoo.explain.captum.POSTHOC_METHODS` (images) /
            `FEATURE_METHODS` (vectors, tokens).
        target: one class id for the batch, (B,) ids, or None for each sample's predicted class.
    Returns:
        (B, H, W) / (B, T) / (B, d) float, >= 0, higher = more important, at the input's resolution.
    """
    from zoo.explain.captum import FEATURE_METHODS, POSTHOC_METHODS, attribute_features
    from zoo.explain.captum import explain as captum_explain

    net = unwrap(model)
    images = images.to(next(net.parameters()).device)
    was_training = net.training
    net.eval()
    try:
        if target is None:
            with torch.no_grad():
                out = net(images)
            if not isinstance(out, dict) or "logits" not in out:
                raise ValueError(f"{type(net).__name__} returns no class logits (a detector or a generator): "
                                 f"zoo.explain explains classifiers.")
            target = out["logits"].argmax(-1)
        target = torch.as_tensor(target, device=images.device).long().expand(len(images))
        if method == OWN:
            maps = own_explanation(net, images, target)
        elif images.ndim == 4 and method in POSTHOC_METHODS:
            with torch.enable_grad():
                maps = captum_explain(net, images, target, method)
        elif images.ndim == 2 and method in FEATURE_METHODS:
            with torch.enable_grad():
                maps = attribute_features(net, images, target, method)
        else:
            known = POSTHOC_METHODS if images.ndim == 4 else FEATURE_METHODS
            raise ValueError(f"Unknown explanation method {method!r} for inputs of shape {tuple(images.shape)}; "
                             f"choose from {(OWN, *known)}.")
    finally:
        net.train(was_training)
    return maps.detach().float()
