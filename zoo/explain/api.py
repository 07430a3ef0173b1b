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

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.layers import eval_mode

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
    if has_pooled_head(model):
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
    if hasattr(model, "num_concepts"):  # a concept bottleneck: its explanation is what it predicts of each concept
        raise ValueError(f"{type(model).__name__}'s own explanation is its concepts, not a map: the model's output "
                         f"\"concept_probs\" (B, K) (ConceptsCallback draws them); for a map use a Captum method "
                         f"(saliency, integrated_gradients, occlusion).")
    raise ValueError(f"{type(model).__name__} has no own explanation map (it is an opaque model, or a detector or "
                     f"generator that explains with boxes or sentences); use a Captum method instead.")


def has_pooled_head(model: nn.Module) -> bool:
    """Whether the model's classifier is global-average-pool + linear on `forward_features` (its `head` is a
    `zoo.backbones.PooledLinearHead`, as `PooledHeadMixin` models have), so that the class activation map is exact.
    timm's `get_classifier` alone does not say so: a concept bottleneck's classifier reads concepts."""
    from zoo.backbones import PooledLinearHead

    return isinstance(getattr(model, "head", None), PooledLinearHead) and hasattr(model, "forward_features")


def can_explain(model: nn.Module, method: str) -> bool:
    """Whether `model` can run `method`: the self-explanation ("cam" or "own") needs an `own_explanation`, a pooled
    head (`has_pooled_head`) or ReNN's rule map (`rule_names`), Grad-CAM on the head's input needs a `head` module; a
    flattening head or a model with another head (concept bottlenecks, prototypes, the opaque 1-D CNN and LSTM of
    series) has none."""
    from zoo.explain.captum import SELF_EXPLANATION

    if method in (SELF_EXPLANATION, OWN):
        return callable(getattr(model, "own_explanation", None)) or has_pooled_head(model) or \
            hasattr(model, "rule_names")
    if method == "layer_gradcam":
        return hasattr(model, "forward_head") and isinstance(getattr(model, "head", None), nn.Module)
    return True


def explain(model: nn.Module, images: torch.Tensor, method: str = OWN,
            target: int | torch.Tensor | None = None, n_samples: int | None = None, segment: int = 1
            ) -> torch.Tensor:
    """Importance maps of `method` ("own" or a Captum method name) for class `target` (None: the prediction).

    Args:
        model: a System (its model is explained) or a bare registered model returning {"logits": ...}.
        images: a batch as the model takes it, normalised as in training: (B, C, H, W) images, (B, C, T)
            series, (B, d) vectors or token ids.
        method: "own" (the model's own explanation) or one of `zoo.explain.captum.POSTHOC_METHODS` (images) /
            `FEATURE_METHODS` (vectors, tokens).
        target: one class id for the batch, (B,) ids, or None for each sample's predicted class. Ids are integers;
            whole-valued floats (2.0) are taken as the id they equal, while other floats (2.7, NaN) and bools are
            refused (truncating them would silently explain another class).
        n_samples: perturbations per sample of KernelShap and Lime, a whole number >= 1 (default: Captum's,
            25 / 50); the other methods draw no samples and ignore it.
        segment: series: time steps per feature KernelShap and Lime perturb together, each segment's attribution
            spread evenly over its steps (1: every step alone; with T features and Captum's 25 / 50 samples their
            surrogates are fit on fewer samples than features and score near a random map). Gradient methods
            attribute every step.
    Returns:
        (B, H, W) / (B, T) / (B, d) float, >= 0, higher = more important, at the input's resolution.

    Gradient methods run with autograd on even under `torch.no_grad()` or `torch.inference_mode()` (Lightning's
    validate, test and predict loops): the inputs and `target` are cloned out of inference mode, which changes no
    value of the map.
    """
    from zoo.checks import positive_int
    from zoo.explain.captum import FEATURE_METHODS, POSTHOC_METHODS, attribute_features
    from zoo.explain.captum import explain as captum_explain

    net = unwrap(model)
    if not isinstance(images, torch.Tensor) or images.ndim not in (2, 3, 4):
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else f"a {type(images).__name__}"
        raise ValueError(f"zoo.explain explains classifiers of (B, C, H, W) images, (B, C, T) series or (B, d) "
                         f"vectors and token ids; got {got} (detectors explain with boxes, generators with sentences, "
                         f"in their Systems' pictures).")
    if images.ndim != 4 and method in POSTHOC_METHODS and method not in FEATURE_METHODS:
        single = (" (one image without its batch dimension? pass images[None], shape "
                  f"{(1, *images.shape)})" if images.ndim == 3 else "")
        raise ValueError(f"{method!r} explains images of shape (B, C, H, W); got shape {tuple(images.shape)}, which "
                         f"reads as {'series (B, C, T)' if images.ndim == 3 else 'vectors (B, d)'}{single}.")
    known = POSTHOC_METHODS if images.ndim == 4 else FEATURE_METHODS
    if method != OWN and method not in known:
        raise ValueError(f"Unknown explanation method {method!r} for inputs of shape {tuple(images.shape)}; "
                         f"choose from {(OWN, *known)}.")
    if method == "layer_gradcam" and not can_explain(net, method):
        raise ValueError(f"{type(net).__name__} has no pooled head for layer_gradcam (it explains the head's input "
                         f"map); choose from {(OWN, *(m for m in known if m != method))}.")
    if n_samples is not None and not positive_int(n_samples):
        raise ValueError(f"n_samples (perturbations per sample of KernelShap and Lime) must be a whole number >= 1; "
                         f"got {n_samples!r}; pass None for Captum's default.")
    if not _takes_one_input(net):
        raise ValueError(f"{type(net).__name__} takes more than the inputs (a generator's labels and captions): "
                         f"zoo.explain explains classifiers.")
    if _is_detector(net):
        raise ValueError(f"{type(net).__name__} is a detector: it explains with boxes (and, for aog_rcnn, parse trees "
                         f"over each box), drawn by its System's pictures; zoo.explain explains classifiers.")
    images = images.to(next(net.parameters()).device)
    # out of inference mode, so that gradient methods can record a graph; inference tensors are cloned to normal ones
    # (autograd cannot save them for backward)
    with eval_mode(net), torch.inference_mode(False):
        images = images.clone() if images.is_inference() else images
        if target is None:
            with torch.no_grad():
                out = net(images)
            if not isinstance(out, dict) or "logits" not in out:
                raise ValueError(f"{type(net).__name__} returns no class logits (a detector or a generator): "
                                 f"zoo.explain explains classifiers.")
            target = out["logits"].argmax(-1)
        else:
            target = _checked_target(target, len(images), getattr(net, "num_classes", None)).to(images.device)
            target = target.clone() if target.is_inference() else target
        if method == OWN:
            maps = own_explanation(net, images, target)
        elif images.ndim == 4:
            with torch.enable_grad():
                maps = captum_explain(net, images, target, method)
        elif images.ndim == 3:  # series: every time step (all channels) is one feature, or a segment of them
            maps = _series_attribution(net, images, target, method, n_samples, segment)
        else:
            with torch.enable_grad():
                maps = attribute_features(net, images, target, method, n_samples=n_samples)
        return maps.detach().float()


def _series_attribution(net: nn.Module, series: torch.Tensor, target: torch.Tensor, method: str,
                        n_samples: int | None, segment: int) -> torch.Tensor:
    """(B, T) attribution of a Captum feature method over the time steps of (B, C, T) series: KernelShap and Lime
    perturb `segment` consecutive steps as one feature (the last segment may be shorter) and each step gets its
    segment's attribution over the segment's length; gradient methods score every step."""
    from zoo.explain.captum import PERTURBATION_METHODS, attribute_features

    from zoo.checks import positive_int

    if not positive_int(segment):
        raise ValueError(f"segment must be a whole number of time steps >= 1; got {segment!r}.")
    steps = series.shape[-1]
    segment = segment if method in PERTURBATION_METHODS else 1
    ids = torch.arange(steps, device=series.device) // segment  # (T,) each step's feature
    count = int(ids[-1]) + 1
    with torch.enable_grad():
        scores = attribute_features(net, series, target, method, ids.view(1, 1, steps), count,
                                    n_samples)  # (B, count)
    sizes = torch.bincount(ids, minlength=count).to(scores.dtype)  # (count,) steps per segment
    return (scores / sizes)[:, ids]  # (B, T)


def _is_detector(net: nn.Module) -> bool:
    """A torchvision detector (FasterRCNN and its kind, the zoo's AOG and vote R-CNNs among them)."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(net, GeneralizedRCNN)


def _takes_one_input(net: nn.Module) -> bool:
    """Whether `net(inputs)` binds: a classifier's forward, not a generator's (images, labels, tokens)."""
    try:
        inspect.signature(net.forward).bind(None)
    except TypeError:
        return False
    return True


def _checked_target(target: int | torch.Tensor, batch: int, num_classes: int | None) -> torch.Tensor:
    """`target` as (B,) class ids, refused by name when it is not one id or B ids in [0, num_classes) (the range
    unchecked for a model that does not say its class count), or holds non-integer values (bools; floats other than
    whole numbers, which `.long()` would truncate to another class)."""
    given = torch.as_tensor(target)
    if given.dtype == torch.bool or given.is_complex():
        raise ValueError(f"target must be integer class ids; got {given.dtype} values.")
    if given.is_floating_point():
        bad = given[~(torch.isfinite(given) & (given == given.round()))]  # the values that are no class id
        if bad.numel():
            shown = ", ".join(f"{v:g}" for v in sorted(set(bad.flatten().tolist()))[:8])
            raise ValueError(f"target must be integer class ids; got [{shown}].")
    ids = given.long()
    if ids.ndim > 1 or (ids.ndim == 1 and len(ids) != batch):
        raise ValueError(f"target must be one class id or {batch} ids (one per input); got shape {tuple(ids.shape)}.")
    if num_classes is not None and ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"target holds class ids {sorted(set(ids.flatten().tolist()))[:8]}, outside "
                         f"[0, {num_classes}).")
    return ids.expand(batch)
