"""L2X (Chen, Song, Wainwright & Jordan, ICML 2018) and INVASE (Yoon, Jordon & van der Schaar, ICLR 2019):
amortised instance-wise feature selectors that explain a frozen black box.

Faithful: the explainer maps x to scores w over d features; training selects with the Concrete k-subset
relaxation (noise drawn every step, `zoo.l2x.ops.concrete_k_subset`), evaluation with an exact top-k of w;
the approximator sees only the selected features and is trained against the black box's probabilities. The
layer sizes of the authors' synthetic nets are kept (explainer Dense100-Dense100-Dense(d), approximator
Dense200-BN-Dense200-BN-Dense(C); INVASE's code uses the same for actor, critic and baseline). Images are explained
on a grid of patches (the mask is upsampled by repetition to pixels), text on tokens (the approximator multiplies
each token's embedding by its selection weight; the black box sees unselected tokens replaced by padding). INVASE
selects each feature with its own Bernoulli probability, so the number of selected features varies per instance;
its actor/critic/baseline losses live in `losses.l2x.INVASELoss`.

Departures from the authors' code (Jianbo-Lab/L2X `synthetic/explain.py`, `imdb-word/explain.py`; INVASE:
jsyoon0823/INVASE `invase.py`):
- Vector activation: ReLU in every hidden layer by default; the authors use ReLU for orange skin and XOR, SELU for
  nonlinear additive and switch (`l2x_vector(activation="selu")`).
- Vector BatchNorm order: Linear-BN-ReLU by default; the authors' (and INVASE's) critic is Dense(activation) then
  BatchNormalization (`norm_after_activation=True`). Both defaults are kept because the recorded figures
  (docs/results.md) were measured with them.
- Regularisation: the authors put Keras l2(1e-3) (1e-3 * sum W^2 added to the loss) on the kernels of the
  explainer's two hidden layers and of every approximator layer, not on biases, BatchNorm or the explainer's output
  layer (INVASE's code: on every Dense kernel). The zoo's synthetic configs use Adam(weight_decay=1e-3) instead,
  which decays every parameter (biases, BatchNorm, the output layer too) at half that strength (a gradient of
  1e-3 W, i.e. 5e-4 * sum W^2).
- Initialisation and BatchNorm settings are PyTorch's (Linear weights and biases uniform in +-1/sqrt(fan_in); BN
  momentum 0.1, eps 1e-5), not Keras' (glorot_uniform kernels, zero biases; BN momentum 0.99 = PyTorch's 0.01,
  eps 1e-3).
- Text approximator: the selected embeddings are averaged over all L positions (`mean(1)`); the authors divide the
  sum by k (`K.sum(x, axis=1) / k`): the same vector scaled by k / L (1/40 on IMDB), which the next Dense layer can
  absorb but which changes its effective initialisation and step size.
- Text explainer: one width-3 convolution plus its global max as context, no dropout, instead of the authors'
  conv100 -> (global max -> Dense100) and (two more conv100) -> concat -> dropout 0.2 -> conv1x1 100 -> conv1x1 1.
  Padding gets a -1e4 score and is never reported as selected (a text of fewer than k words keeps all its words);
  the authors' explainer scores padding like any token and may select it.
- Test-time top-k takes exactly k features (ties to the lower index); the authors keep every w >= the k-th largest,
  more than k on ties.
- Images: the explainer/approximator are small CNNs sized for 8x8-64x64 inputs instead of the paper's 28x28 MNIST
  nets.
- Training settings live in the configs, not here: the authors train the synthetic nets with Adam 1e-3, batch 1000,
  one epoch of 1e6 samples, and the IMDB nets with RMSprop, batch 40, 5 epochs; the configs use Adam 1e-3 and
  smaller data.

Output dict (all selectors): ``{"logits": (B, C) approximator/critic logits on the selected input,
"scores": (B, d) non-negative feature importance used for ranking, "selection": (B, d) relaxed (train) or hard
(eval)}``; L2X adds ``"selection_logits"`` (w; scores = softmax(w)), INVASE ``"selection_probs"`` (= scores) and
``"baseline_logits"``. Image selectors (``*_patches``) add ``"pixel_selection"``: (B, 1, H, W), the selection
upsampled to pixels (what multiplies the image; pictures draw it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.checks import check_input
from zoo.l2x.ops import check_tau, concrete_k_subset, top_k_mask
from zoo.registry import input_size_aware, register_model

PAD_ID = 0  # token id of padding; a token the black box sees as "not selected"


# ------------------------------------------------------------------------------------------ feature spaces
class FeatureSpace(nn.Module):
    """What a selector's features are: `num_features`, the input check, and how a (B, d) selection applies to x."""

    num_features: int

    def check(self, x: torch.Tensor, model: str, like: nn.Module | None = None) -> None:
        """Refuse `x` unless it is this space's input (float inputs in the dtype of `like`'s parameters)."""
        raise NotImplementedError

    def mask_input(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        """`x` with the features `selection` (B, d) does not keep removed, in `x`'s dtype: the selection is drawn in
        float32 (under bf16 autocast too, `concrete_k_subset`), and under `--trainer.precision=bf16-true` or
        `64-true` a float32 product would reach layers whose parameters are in `x`'s dtype."""
        raise NotImplementedError

    def outputs(self, selection: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra entries of the selector's output dict (none by default)."""
        return {}

    def feature_ids(self) -> torch.Tensor | None:
        """Feature id of every input element, or None where the features are the input's entries."""
        return None

    def selectable(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, d) bool: which features of `x` a selection may keep, or None where every feature may be kept."""
        return None


class VectorFeatures(FeatureSpace):
    """Features are the entries of a (B, d) vector; a selection multiplies them."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def check(self, x: torch.Tensor, model: str, like: nn.Module | None = None) -> None:
        check_input(model, x, ("B", self.num_features), "feature vectors", like=like)

    def mask_input(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        return (x * selection).to(x.dtype)  # (B, d) float32 selection: back to x's dtype (a no-op in float32)


class PatchFeatures(FeatureSpace):
    """Features are the cells of a grid of `patch_size` x `patch_size` patches over (B, C, S, S) images; the
    selection is upsampled by repetition to pixels and multiplies the image (unselected pixels become 0)."""

    def __init__(self, in_chans: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or not 1 <= patch_size <= image_size:
            raise ValueError(f"patch_size (pixels per patch side) must be an integer in [1, image_size={image_size}]; "
                             f"got {patch_size!r}.")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}.")
        self.in_chans, self.image_size, self.patch_size = in_chans, image_size, patch_size
        self.grid = image_size // patch_size
        self.num_features = self.grid**2

    def check(self, x: torch.Tensor, model: str, like: nn.Module | None = None) -> None:
        check_input(model, x, ("B", self.in_chans, self.image_size, self.image_size), "images", like=like)

    def pixel_mask(self, selection: torch.Tensor) -> torch.Tensor:
        grid = selection.view(-1, 1, self.grid, self.grid)  # (B, 1, g, g)
        return grid.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)  # (B, 1, S, S)

    def mask_input(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        return (x * self.pixel_mask(selection)).to(x.dtype)  # float32 selection: back to x's dtype

    def outputs(self, selection: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_selection": self.pixel_mask(selection)}  # (B, 1, S, S)

    def feature_ids(self) -> torch.Tensor:
        """(1, 1, S, S) patch index of every pixel: Captum's `feature_mask` for KernelShap/Lime on patches."""
        return self.pixel_mask(torch.arange(self.num_features, dtype=torch.float32)[None]).long()


class TokenFeatures(FeatureSpace):
    """Features are the positions of a (B, L) token-id sequence; unselected positions become padding."""

    def __init__(self, max_len: int, vocab_size: int | None = None) -> None:
        super().__init__()
        self.num_features, self.vocab_size = max_len, vocab_size

    def check(self, x: torch.Tensor, model: str, like: nn.Module | None = None) -> None:
        check_input(model, x, ("B", self.num_features), "token ids", kind="long", ids_below=self.vocab_size)

    def mask_input(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        return torch.where(selection > 0.5, x, torch.full_like(x, PAD_ID))

    def selectable(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) the words: padding is not part of the text, so it is never reported as selected."""
        return x != PAD_ID


# ------------------------------------------------------------------------------------------ networks
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "selu": nn.SELU}


def mlp(sizes: list[int], batch_norm: bool = False, activation: str = "relu", norm_after_activation: bool = False
        ) -> nn.Sequential:
    """Dense layers with `activation` ("relu" or "selu") between them; the last layer is linear. With `batch_norm`,
    a BatchNorm1d on every hidden layer: Linear-BN-act by default, Linear-act-BN with `norm_after_activation` (the
    authors' Keras order, `Dense(200, activation)` then `BatchNormalization()`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}.")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            hidden = [nn.BatchNorm1d(n_out)] if batch_norm else []
            act = ACTIVATIONS[activation]()
            layers += [act, *hidden] if norm_after_activation else [*hidden, act]
    return nn.Sequential(*layers)


class VectorScorer(nn.Module):
    """Explainer for vectors (authors' code): Dense100-Dense100-Dense(d)."""

    def __init__(self, space: VectorFeatures, hidden: int = 100, activation: str = "relu") -> None:
        super().__init__()
        self.net = mlp([space.num_features, hidden, hidden, space.num_features], activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VectorApproximator(nn.Module):
    """Approximator for vectors (authors' code): Dense200-BN-Dense200-BN-Dense(C) on x * selection (BN before the
    activation unless `norm_after_activation`, see `mlp`)."""

    def __init__(self, space: VectorFeatures, num_classes: int, hidden: int = 200, activation: str = "relu",
                 norm_after_activation: bool = False) -> None:
        super().__init__()
        self.space = space
        self.net = mlp([space.num_features, hidden, hidden, num_classes], batch_norm=True, activation=activation,
                       norm_after_activation=norm_after_activation)

    def forward(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        return self.net(self.space.mask_input(x, selection))


class PatchScorer(nn.Module):
    """Explainer for images: three 3x3 convolutions, pooled to the patch grid, one score per patch."""

    def __init__(self, space: PatchFeatures, width: int = 32) -> None:
        super().__init__()
        self.grid = space.grid
        self.net = nn.Sequential(
            nn.Conv2d(space.in_chans, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.net(x), self.grid).flatten(1)  # (B, g*g)


class PatchApproximator(nn.Module):
    """Approximator for images: two 3x3 convolutions on the masked image, global max pool, linear."""

    def __init__(self, space: PatchFeatures, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.space = space
        self.net = nn.Sequential(
            nn.Conv2d(space.in_chans, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )

    def forward(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        return self.net(self.space.mask_input(x, selection))


class TokenScorer(nn.Module):
    """Explainer for text: embedding, a width-3 convolution (local), its global max (context), a 1x1 score per
    token from [local; context]; padding positions get a very low score so they are never selected."""

    def __init__(self, space: TokenFeatures, vocab_size: int, embed_dim: int = 50, width: int = 100) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.local = nn.Conv1d(embed_dim, width, 3, padding=1)
        self.score = nn.Conv1d(2 * width, 1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = F.relu(self.local(self.embed(tokens).transpose(1, 2)))  # (B, width, L)
        context = local.amax(-1, keepdim=True).expand_as(local)  # (B, width, L)
        scores = self.score(torch.cat([local, context], 1)).squeeze(1)  # (B, L)
        return scores.masked_fill(tokens == PAD_ID, -1e4)


class TokenApproximator(nn.Module):
    """Approximator for text (authors' IMDB net): embeddings scaled by the selection, averaged over all L positions
    (the authors divide the sum by k instead: the same direction, L / k times smaller), Dense250-Dense(C)."""

    def __init__(self, space: TokenFeatures, vocab_size: int, num_classes: int, embed_dim: int = 50,
                 hidden: int = 250) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.net = mlp([embed_dim, hidden, num_classes])

    def forward(self, tokens: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(tokens)  # (B, L, E) in the parameters' dtype
        # unselected tokens are zero vectors; the float32 selection's product back in the embeddings' dtype (bf16-true)
        embedded = (embedded * selection.unsqueeze(-1)).to(embedded.dtype)
        return self.net(embedded.mean(1))


# ------------------------------------------------------------------------------------------ selectors
class FeatureSelector(nn.Module):
    """What L2X and INVASE share: a feature space, a scorer (explainer/actor) and an approximator (critic).

    `mask_input(x, selection)` applies a hard selection in input space, the form in which the black box and the
    EVAL-X evaluator see an explanation; `feature_ids()` says which feature each input element belongs to
    ((1, 1, H, W) patch ids for images, None where features are the input's entries), as Captum's `feature_mask`.

    `num_features` is d, how many features a selection chooses from (the input's entries, patches or token
    positions: the setting `num_features` of the vector models), not timm's `num_features` of a classifier (the
    width its classifier reads): a selector has no single classifier to replace.
    """

    def __init__(self, space: FeatureSpace, scorer: nn.Module, approximator: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.space, self.scorer, self.approximator = space, scorer, approximator
        self.num_classes, self.num_features = num_classes, space.num_features

    def mask_input(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        return self.space.mask_input(x, selection)

    def feature_ids(self) -> torch.Tensor | None:
        return self.space.feature_ids()

    def selectable(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, d) bool: the features of `x` a selection may keep (text: the words, not padding); None: all."""
        return self.space.selectable(x)

    def keep_selectable(self, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        """`selection` (B, d) with the features that cannot be selected (padding) set to 0, on the device."""
        selectable = self.space.selectable(x)
        return selection if selectable is None else selection * selectable


class L2X(FeatureSelector):
    """Explainer + variational approximator; exactly `k` features per instance (a text of fewer than `k` words:
    all its words; padding is never reported as selected)."""

    def __init__(self, space: FeatureSpace, scorer: nn.Module, approximator: nn.Module, num_classes: int, *, k: int,
                 tau: float) -> None:
        super().__init__(space, scorer, approximator, num_classes)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= space.num_features:
            raise ValueError(f"k (features selected per sample) must be an integer in [1, {space.num_features}] (the "
                             f"number of features); got {k!r}.")
        check_tau(tau)  # here, not at the first training step: after the black box and the evaluator trained
        self.k, self.tau = k, tau

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.space.check(x, type(self).__name__, self)
        selection_logits = self.scorer(x)  # (B, d) w
        if self.training:  # padding's logit is -1e4 (TokenScorer): its relaxed weight is 0, and its embedding is 0
            selection = concrete_k_subset(selection_logits, self.k, self.tau)
        else:  # top-k takes k positions; on a text of fewer than k words the rest are padding, dropped here
            selection = top_k_mask(selection_logits, self.k, self.selectable(x))
        # softmax(w) ranks features as w does and is >= 0, so |score| rankings agree with the top-k of w
        return {"logits": self.approximator(x, selection), "scores": selection_logits.softmax(-1),
                "selection_logits": selection_logits, "selection": selection, **self.space.outputs(selection)}


class INVASE(FeatureSelector):
    """Actor (per-feature Bernoulli probabilities), critic on the selected input, baseline on the full input."""

    def __init__(self, space: FeatureSpace, scorer: nn.Module, approximator: nn.Module, baseline: nn.Module,
                 num_classes: int, *, threshold: float = 0.5) -> None:
        super().__init__(space, scorer, approximator, num_classes)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"threshold (a feature is selected where its probability exceeds it) must be a number in "
                             f"(0, 1): 0 or less keeps every feature, 1 or more none; got {threshold!r}.")
        self.baseline, self.threshold = baseline, threshold

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.space.check(x, type(self).__name__, self)
        probs = torch.sigmoid(self.scorer(x))  # (B, d)
        # padding's probability is sigmoid(-1e4) = 0, so it is never drawn; dropped at evaluation all the same
        if self.training:
            selection = torch.bernoulli(probs)
        else:
            selection = self.keep_selectable(x, (probs > self.threshold).float())
        return {
            "logits": self.approximator(x, selection),
            "baseline_logits": self.baseline(x, torch.ones_like(probs)),
            "scores": probs, "selection_probs": probs, "selection": selection, **self.space.outputs(selection),
        }


# ------------------------------------------------------------------------------------------ factories
def _parts(kind: str, num_classes: int, **kw) -> tuple[FeatureSpace, nn.Module, nn.Module, nn.Module]:
    """(space, scorer, approximator, second approximator) for one input kind."""
    if kind == "vector":
        space = VectorFeatures(kw["num_features"])
        nets = {"activation": kw["activation"], "norm_after_activation": kw["norm_after_activation"]}
        return (space, VectorScorer(space, activation=kw["activation"]), VectorApproximator(space, num_classes, **nets),
                VectorApproximator(space, num_classes, **nets))
    if kind == "patches":
        space = PatchFeatures(kw["in_chans"], kw["image_size"], kw["patch_size"])
        return space, PatchScorer(space), PatchApproximator(space, num_classes), PatchApproximator(space, num_classes)
    vocab = kw["vocab_size"]
    space = TokenFeatures(kw["max_len"], vocab)
    return (space, TokenScorer(space, vocab), TokenApproximator(space, vocab, num_classes),
            TokenApproximator(space, vocab, num_classes))


def _create_l2x(kind: str, num_classes: int, k: int, tau: float, **kw) -> L2X:
    space, scorer, approximator, _ = _parts(kind, num_classes, **kw)
    return L2X(space, scorer, approximator, num_classes, k=k, tau=tau)


def _create_invase(kind: str, num_classes: int, threshold: float, **kw) -> INVASE:
    space, scorer, critic, baseline = _parts(kind, num_classes, **kw)
    return INVASE(space, scorer, critic, baseline, num_classes, threshold=threshold)


@register_model
def l2x_vector(num_features: int = 10, num_classes: int = 2, k: int = 4, tau: float = 0.1, activation: str = "relu",
               norm_after_activation: bool = False) -> L2X:
    """L2X on feature vectors (the paper's synthetic nets), k features per instance.

    `activation` ("relu" or "selu") is every hidden layer's; `norm_after_activation` puts the approximator's
    BatchNorm after the activation. The authors' code: `activation="selu", norm_after_activation=True` for
    nonlinear additive and switch, `activation="relu", norm_after_activation=True` for orange skin and XOR. The
    defaults (ReLU, BN before it) are what the recorded figures were measured with."""
    return _create_l2x("vector", num_classes, k, tau, num_features=num_features, activation=activation,
                       norm_after_activation=norm_after_activation)


@register_model
@input_size_aware
def l2x_patches(num_classes: int = 2, in_chans: int = 1, image_size: int = 8, patch_size: int = 2, k: int = 4,
                tau: float = 0.1) -> L2X:
    """L2X on a grid of image patches (mask upsampled to pixels), k patches per image."""
    return _create_l2x("patches", num_classes, k, tau, in_chans=in_chans, image_size=image_size,
                       patch_size=patch_size)


@register_model
def l2x_tokens(vocab_size: int = 2000, max_len: int = 64, num_classes: int = 2, k: int = 5, tau: float = 0.5) -> L2X:
    """L2X on token sequences (embedding masking), k tokens per text."""
    return _create_l2x("tokens", num_classes, k, tau, vocab_size=vocab_size, max_len=max_len)


@register_model
def invase_vector(num_features: int = 10, num_classes: int = 2, threshold: float = 0.5, activation: str = "relu",
                  norm_after_activation: bool = False) -> INVASE:
    """INVASE on feature vectors: instance-wise number of selected features.

    The nets and the two options are `l2x_vector`'s (INVASE's code: the same sizes, activation ReLU by default,
    the critic's and baseline's BatchNorm after the activation)."""
    return _create_invase("vector", num_classes, threshold, num_features=num_features, activation=activation,
                          norm_after_activation=norm_after_activation)


@register_model
@input_size_aware
def invase_patches(num_classes: int = 2, in_chans: int = 1, image_size: int = 8, patch_size: int = 2,
                   threshold: float = 0.5) -> INVASE:
    """INVASE on a grid of image patches: instance-wise number of selected patches."""
    return _create_invase("patches", num_classes, threshold, in_chans=in_chans, image_size=image_size,
                          patch_size=patch_size)
