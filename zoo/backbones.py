"""Feature extractors: any timm CNN through ``features_only=True``, torchvision classifiers with a ``features``
body (``"torchvision:mobilenet_v2"``), and a tiny built-in CNN for CPU runs.

Every backbone returns a list of feature maps and says their channels and strides (reductions), so a family
head (ICNN filters, L2X selector, AOG parser, LSTM explainer) can sit on any of them. Pretrained weights come
from a local file only (no hub at run time); what a file gave is kept as `Backbone.load_report`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence, TypeVar

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from zoo.checks import check_input, check_new_head, close_names
from zoo.layers import eval_mode
from zoo.weights import LoadReport, load_backbone_weights

TINY_CNN = "tinycnn"
TORCHVISION = "torchvision:"  # backbone-name prefix of the torchvision source, e.g. "torchvision:mobilenet_v2"


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


class TorchvisionFeatures(nn.Module):
    """The ``features`` body of a torchvision classifier (MobileNetV2/V3, EfficientNet, VGG, ConvNeXt, ...), cut
    after the last layer of each resolution, so a torchvision ImageNet checkpoint loads by its own key names
    ("features.0.0.weight", ...) and only its classifier is left over. The whole body is kept, up to the last layer
    (MobileNetV2's 1280-channel 1x1 conv), so every backbone tensor of the checkpoint is used."""

    def __init__(self, arch: str, in_chans: int = 3) -> None:
        super().__init__()
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if arch not in names:
            close = close_names(arch, names, cutoff=0.5)
            hint = f"Did you mean: {', '.join(close)}?" if close else "torchvision.models.list_models() lists them."
            raise ValueError(f"Unknown torchvision model {arch!r}. {hint}")
        features = getattr(torchvision.models.get_model(arch, weights=None), "features", None)
        if not isinstance(features, nn.Sequential):
            raise ValueError(f"torchvision model {arch!r} has no `features` Sequential body; use its timm name "
                             f"instead (timm loads torchvision ResNet checkpoints).")
        if in_chans != 3:
            raise ValueError(f"torchvision backbones take 3-channel images (got in_chans={in_chans}); replicate grey "
                             f"images to 3 channels (datamodules.idx does).")
        self.features = features
        self.stage_ends, self.channels, self.reductions = self._stages(features)

    @staticmethod
    @torch.no_grad()
    def _stages(features: nn.Sequential, size: int = 64, step: int = 64) -> tuple[list[int], list[int], list[int]]:
        """Index, channels and reduction of the last layer at each resolution, read from two dry runs.

        The reduction (stride) is how many input pixels one more map cell takes: `step` / the growth of the map from
        a `size` to a `size + step` input, exact for every stride that divides `step`. The map's size alone is not:
        unpadded layers lose border cells (AlexNet's maps are 15, 7, 3, 1 at 64 px, so `size // map` gave 4, 9, 21,
        64 for its strides 4, 8, 16, 32)."""
        runs = []
        with eval_mode(features):
            for side in (size, size + step):
                x, shapes = torch.zeros(1, 3, side, side), []
                for layer in features:
                    x = layer(x)
                    shapes.append(x.shape)
                runs.append(shapes)
        shapes, larger = runs
        ends = [i for i in range(len(shapes)) if i == len(shapes) - 1 or shapes[i + 1][-1] < shapes[i][-1]]
        growth = [larger[i][-1] - shapes[i][-1] for i in ends]  # a map that does not grow (global pooling): by size
        reductions = [round(step / g) if g > 0 else round(size / shapes[i][-1]) for i, g in zip(ends, growth)]
        return ends, [shapes[i][1] for i in ends], reductions

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.stage_ends:
                maps.append(x)
        return maps


@functools.lru_cache(maxsize=32)
def top_conv_index(backbone: str) -> int:
    """Which backbone feature is the top conv layer's ReLU map (where ICNN puts its interpretable layers, and what its
    plain twin's scored map must be): the one before a trailing pooling layer, else the last. VGG's and AlexNet's
    features (timm's and torchvision's, "torchvision:vgg16", "torchvision:alexnet") end with pool5 (stride 32); their
    conv5 map (relu5_3 / relu5, stride 16) is the one before, where the authors put the masked layer (their
    vgg_vd_16.m strips everything after relu5_3, adds the interpretable conv, then pool5). Read from the layer's type
    (`ends_in_pooling`), not the name."""
    return -2 if ends_in_pooling(backbone) else -1


_POOLING = (nn.MaxPool2d, nn.AvgPool2d)


def ends_in_pooling(backbone: str) -> bool:
    """Whether the backbone's last feature map is a pooling layer's output (a torchvision `features` body that ends in
    a max-pool, timm's VGG); the network is built on the meta device (no memory, no initialisation). False for the
    tiny CNN, an unknown name (`Backbone` names it) or a network that cannot be built there."""
    if backbone == TINY_CNN:
        return False
    try:
        with torch.device("meta"):
            if backbone.startswith(TORCHVISION):
                import torchvision

                features = getattr(torchvision.models.get_model(backbone.removeprefix(TORCHVISION), weights=None),
                                   "features", None)
                return isinstance(features, nn.Sequential) and isinstance(features[-1], _POOLING)
            if not timm.is_model(backbone):
                return False
            model = timm.create_model(backbone, pretrained=False)
            info = getattr(model, "feature_info", None)
            return bool(info) and isinstance(model.get_submodule(info[-1]["module"]), _POOLING)
    except Exception:  # noqa: BLE001 - not buildable on the meta device: the last map, as for any other network
        return False


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
        if name == TINY_CNN or name.startswith(TORCHVISION):
            arch = name.removeprefix(TORCHVISION)
            body = TinyCNN(in_chans) if name == TINY_CNN else TorchvisionFeatures(arch, in_chans)
            stage_ids = [range(len(body.channels))[i] for i in out_indices]
            self.channels = [body.channels[i] for i in stage_ids]
            self.reductions = [body.reductions[i] for i in stage_ids]
            self._stage_ids = stage_ids  # the body returns every stage; keep these
        else:
            if not timm.is_model(name):
                close = close_names(name, [TINY_CNN, *timm.list_models()], cutoff=0.5)
                hint = f"Did you mean: {', '.join(close)}?" if close else f"Use {TINY_CNN!r} or a timm model name."
                raise ValueError(f"Unknown backbone {name!r}. {hint}")
            body = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans,
                                     out_indices=tuple(out_indices))
            self.channels = list(body.feature_info.channels())
            self.reductions = list(body.feature_info.reduction())
            self._stage_ids = None
        self.body = body
        self.load_report: LoadReport | None = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)
        self.requires_grad_(not frozen)  # a frozen backbone: fine-tune only what sits on top
        self.train(self.training)  # frozen: in eval mode from the start (`train`)

    def map_geometry(self, image_size: int | tuple[int, int]) -> list[MapGeometry | None]:
        """Where the cells of each returned map sit in an `image_size` image (`MapGeometry`), from one traced dry
        run (cached per size): padded strided convolutions and 2 x 2 pools put cells at different places."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        cache = self.__dict__.setdefault("_geometry_cache", {})
        if size not in cache:
            weight = next(self.parameters(), torch.zeros(()))  # the dry run in the weights' device and dtype
            cache[size] = trace_map_geometry(self, weight.new_zeros(1, self.in_chans, *size))
        return cache[size]

    @property
    def num_features(self) -> int:
        """Channels of the last (top) returned map."""
        return self.channels[-1]

    @property
    def frozen(self) -> bool:
        """Whether no parameter of the backbone trains (`frozen=True`, `freeze_backbone`, a stage that leaves it
        out): then it also stays in eval mode."""
        params = list(self.parameters())
        return bool(params) and not any(p.requires_grad for p in params)

    def train(self, mode: bool = True) -> Backbone:
        """`nn.Module.train`, but a frozen backbone stays in eval mode: its BatchNorm layers keep normalising with,
        and never update, their running statistics (as the weights, they are what the backbone was trained to)."""
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(f"Backbone {self.name!r}", x, ("B", self.in_chans, "H", "W"), "images", like=self)
        maps = self.body(x)
        return [maps[i] for i in self._stage_ids] if self._stage_ids is not None else maps

    def load_pretrained(self, path: str | Path) -> None:
        """Load every backbone tensor of a local weight file strictly (missing or mis-shaped ones raise; an RGB stem
        convolution is adapted to other input channels); tensors of the whole architecture the backbone has no place
        for (an ImageNet classifier, stages after the last kept one) are skipped, and tensors of another network
        raise, naming it. What happened is `self.load_report`; `zoo.create_model` completes it with the model's new
        layers and logs it."""
        self.load_report = load_backbone_weights(
            self.body, path, f"backbone {self.name!r}", full_keys=lambda: architecture_keys(self.name, self.in_chans),
            identify=lambda shapes: identify_architecture(self.name, shapes))


@functools.lru_cache(maxsize=16)
def _architectures(name: str, in_chans: int = 3) -> dict[str, dict[str, torch.Size]]:
    """Key -> shape of the whole network a backbone `name` is cut from, by source ("timm 'resnet18'",
    "torchvision 'vgg16'"): timm's and, for a name torchvision also has, torchvision's layout (both are common
    ImageNet files); built on the meta device (no memory, no initialisation; on the CPU for a model that cannot)."""
    import torchvision

    arch = name.removeprefix(TORCHVISION)
    builders = {}
    if name == TINY_CNN:
        builders["the tiny CNN"] = lambda: TinyCNN(in_chans)
    else:
        if not name.startswith(TORCHVISION) and timm.is_model(name):
            builders[f"timm {name!r}"] = lambda: timm.create_model(name, pretrained=False, in_chans=in_chans)
        if arch in torchvision.models.list_models(module=torchvision.models):
            builders[f"torchvision {arch!r}"] = lambda: torchvision.models.get_model(arch, weights=None)
    shapes = {}
    for source, build in builders.items():
        try:
            with torch.device("meta"):
                model = build()
        except Exception:  # noqa: BLE001 - a model whose constructor reads tensor values: build it for real
            model = build()
        shapes[source] = {k: v.shape for k, v in model.state_dict().items()}
    return shapes


def architecture_keys(name: str, in_chans: int = 3) -> set[str]:
    """State-dict keys of the whole network (classifier included) a backbone `name` is cut from."""
    return {key for shapes in _architectures(name, in_chans).values() for key in shapes}


def identify_architecture(name: str, file_shapes: dict[str, torch.Size]) -> str | None:
    """Which sibling of backbone `name` (the same name but for its numbers: resnet34 for resnet18, vgg16_bn for
    vgg11_bn), in timm's or torchvision's layout, has every tensor of a weight file by name and shape: the one that
    is exactly the file, else the smallest; None if none has (or for the tiny CNN). For error messages only."""
    import torchvision

    def skeleton(model_name: str) -> str:
        return re.sub(r"\d+", "#", model_name.removeprefix(TORCHVISION))

    def numbers(model_name: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", model_name)]

    if name == TINY_CNN:
        return None
    names = timm.list_models() + torchvision.models.list_models(module=torchvision.models)
    siblings = sorted(dict.fromkeys(n for n in names if skeleton(n) == skeleton(name)), key=numbers)
    wanted = {k.replace(".", "_"): tuple(v) for k, v in file_shapes.items()}
    fits: list[tuple[int, str]] = []
    for sibling in siblings:  # smallest first: stop at the one that is the file
        try:
            architectures = _architectures(sibling)
        except Exception:  # noqa: BLE001, S112 - a sibling that cannot be built is not the answer (error path)
            continue
        for source, shapes in architectures.items():
            have = {k.replace(".", "_"): tuple(v) for k, v in shapes.items()}
            if all(have.get(k) == shape for k, shape in wanted.items()):
                if len(have) == len(wanted):
                    return source
                fits.append((len(have), source))
    return min(fits)[1] if fits else None


class MapGeometry(NamedTuple):
    """Where a feature map's cells sit in the image: cell (i, j)'s receptive-field centre is
    (offset[0] + i * stride[0], offset[1] + j * stride[1]) pixels (y, x), with pixel p covering [p, p + 1)."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    def centres(self, index: torch.Tensor, axis: int) -> torch.Tensor:
        """Receptive-field centres (pixels) of the cells `index` along `axis` (0 = y, 1 = x)."""
        return self.offset[axis] + index * self.stride[axis]

    def resized(self, image_size: Sequence[int], size: Sequence[int]) -> MapGeometry:
        """The same cells in the pixels of the image resized from `image_size` to `size` (H, W), e.g. masks drawn at
        another size: pixel centre p + 0.5 moves to (p + 0.5) x size / image_size, so stride and offset scale."""
        scale = [new / old for new, old in zip(size, image_size)]
        return MapGeometry(tuple(s * r for s, r in zip(self.stride, scale)),
                           tuple(o * r for o, r in zip(self.offset, scale)))


def model_map_geometry(model: nn.Module, image_size: int | Sequence[int]) -> MapGeometry | None:
    """Where the cells of a zoo model's top map (the backbone's last returned map, which its pooled head and ICNN's
    filters read) sit in an `image_size` image; None for a model without a traceable `backbone`."""
    backbone = getattr(model, "backbone", None)
    if not hasattr(backbone, "map_geometry"):
        return None
    return backbone.map_geometry(image_size if isinstance(image_size, int) else tuple(image_size))[-1]


def cells_to_pixels(maps: torch.Tensor, size: Sequence[int], geometry: MapGeometry | None = None) -> torch.Tensor:
    """Maps (..., h, w) of a feature map's cells -> (..., H, W) pixels, bilinear between cell centres (maps of any
    leading shape: (B, h, w) saliencies, (N, F, h, w) filter maps). With the map's `MapGeometry`, cell (i, j) sits at
    its receptive-field centre (offset + index x stride, in pixels): nets that downsample by padded strided
    convolutions (resnet, mobilenet) centre a cell half a cell from where an even spread of the cells over the image
    (`F.interpolate`, align_corners=False) puts it, and an image that is no multiple of the stride has pixels no cell
    covers (they take the nearest cell's value). The even spread is kept where it is exact (offset = stride / 2,
    H = h x stride: the 2 x 2 max-pool nets), and without a geometry: there the result is `F.interpolate`'s, to the
    bit (a 4-D input is interpolated as it is, a 3-D one as (B, 1, h, w))."""
    height, width = size
    h, w = maps.shape[-2:]
    even = geometry is None or all(geometry.offset[a] == geometry.stride[a] / 2
                                   and (height, width)[a] == (h, w)[a] * geometry.stride[a] for a in (0, 1))
    if even and maps.ndim in (3, 4):
        planes = maps[:, None] if maps.ndim == 3 else maps  # (B, 1 or C, h, w)
        up = F.interpolate(planes, size=(height, width), mode="bilinear", align_corners=False)
        return up[:, 0] if maps.ndim == 3 else up
    if even:
        up = F.interpolate(maps.reshape(1, -1, h, w), size=(height, width), mode="bilinear", align_corners=False)
        return up.reshape(*maps.shape[:-2], height, width)
    cells = [(torch.arange(n, device=maps.device, dtype=torch.float32) + 0.5 - geometry.offset[a]) / geometry.stride[a]
             for a, n in ((0, height), (1, width))]  # pixel centres in cell coordinates (cell i at i)
    grid_y, grid_x = (c * 2 / max(n - 1, 1) - 1 for c, n in zip(cells, (h, w)))  # align_corners=True coordinates
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], -1)[None]  # (1, H, W, 2): x, y
    planes = maps.reshape(1, -1, h, w).float()  # one grid for every map: the leading dims as channels, one batch
    up = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=True)  # (1, M, H, W)
    return up.reshape(*maps.shape[:-2], height, width)


_GEOMETRY_ATTR = "_zoo_map_geometry"  # (MapGeometry, (h, w)) on the tensors of a geometry dry run only


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """(y, x) of a conv / pool argument given as one int or a one- or two-element sequence."""
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else value[:2]


class _GeometryTracer(TorchFunctionMode):
    """Follows every tensor of a forward pass with the geometry of its cells (`MapGeometry`) and its (h, w):
    convolutions and pools move the centre of cell 0 by ((kernel - 1) x dilation / 2 - padding) input cells and
    multiply the step by the stride, `F.pad` moves it back by the left / top pad, any other op keeps the geometry of
    its largest input that carries one (a residual sum, a squeeze-excite product, a dense concatenation) if the output
    still has that input's (h, w) as two consecutive dimensions (channels-last permutes too). Ops it cannot follow
    (interpolation, adaptive pools, flattening) leave no geometry, and neither does anything computed from them."""

    _WINDOWS = ("conv2d", "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "pad")

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - TorchFunctionMode's API
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", "")
        tag = None
        if name in self._WINDOWS:
            geometry = getattr(args[0], _GEOMETRY_ATTR, (None,))[0] if args else None
            if geometry is not None:
                tag = (self._window_geometry(name, geometry, args, kwargs), tuple(outputs[0].shape[-2:]))
        else:
            inputs = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (list, tuple)) else [a])]
            carriers = [a for a in inputs if getattr(a, _GEOMETRY_ATTR, (None,))[0] is not None]  # cat's list too
            if carriers:
                tag = getattr(max(carriers, key=torch.Tensor.numel), _GEOMETRY_ATTR)
                if not all(self._has_cells(t, tag[1]) for t in outputs):
                    tag = None
        for tensor in outputs:  # an in-place op's output is its input, with the same geometry
            setattr(tensor, _GEOMETRY_ATTR, tag if tag is not None else (None, None))
        return out

    @staticmethod
    def _window_geometry(name: str, geometry: MapGeometry, args: tuple, kwargs: dict) -> MapGeometry:
        """The output geometry of a sliding window (or a pad): its cell 0 is centred (k - 1) d / 2 - p input cells
        after the input's cell 0, and its step is the input's times the stride."""
        if name == "pad":
            pad = tuple(_argument(args, kwargs, 1, "pad", ())) + (0, 0, 0, 0)
            (sy, sx), (oy, ox) = geometry
            return MapGeometry((sy, sx), (oy - pad[2] * sy, ox - pad[0] * sx))
        if name == "conv2d":
            kernel = tuple(_argument(args, kwargs, 1, "weight", None).shape[-2:])
            stride, padding = _argument(args, kwargs, 3, "stride", 1), _argument(args, kwargs, 4, "padding", 0)
            dilation = _pair(_argument(args, kwargs, 5, "dilation", 1))
            if padding == "same":
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
            padding = 0 if padding == "valid" else padding
        else:
            kernel = _pair(_argument(args, kwargs, 1, "kernel_size", None))
            stride = _argument(args, kwargs, 2, "stride", None) or kernel
            padding = _argument(args, kwargs, 3, "padding", 0)
            dilation = (1, 1) if name == "avg_pool2d" else _pair(_argument(args, kwargs, 4, "dilation", 1))
        offset = tuple(o + ((k - 1) * d / 2 - p) * s for o, k, d, p, s in
                       zip(geometry.offset, kernel, dilation, _pair(padding), geometry.stride))
        return MapGeometry(tuple(s * t for s, t in zip(geometry.stride, _pair(stride))), offset)

    @staticmethod
    def _has_cells(out: torch.Tensor, cells: tuple[int, int]) -> bool:
        shape = tuple(out.shape)
        return any(shape[i:i + 2] == cells for i in range(len(shape) - 1))


@torch.no_grad()
def trace_map_geometry(module: nn.Module, image: torch.Tensor) -> list[MapGeometry | None]:
    """Run `module` once (eval mode, no grad, mode restored) on `image` (B, C, H, W) and return, for each tensor of
    its output (a tensor or a list of them), where its cells sit in the image (`MapGeometry`), or None where the
    geometry cannot be followed (see `_GeometryTracer`). The receptive-field centre depends on the padding and
    kernels, not only the stride: 2 x 2 max-pools (VGG, the tiny CNN) put cell i at (i + 0.5) x stride, padded
    strided convolutions (ResNet, MobileNet) at about i x stride + 0.5."""
    image = image.clone()
    setattr(image, _GEOMETRY_ATTR, (MapGeometry((1.0, 1.0), (0.5, 0.5)), tuple(image.shape[-2:])))  # pixel p: p + 0.5
    with eval_mode(module), _GeometryTracer():  # every module's mode kept: a frozen part of a training model too
        out = module(image)
    return [getattr(t, _GEOMETRY_ATTR, (None,))[0] for t in (out if isinstance(out, (list, tuple)) else [out])]


M = TypeVar("M", bound=nn.Module)


def like(layer: M, weight: torch.Tensor) -> M:
    """A new layer (a `reset_classifier` head) on the device and in the dtype of the weights it replaces: a model
    moved to the GPU or made `.double()` keeps running after its head is reset."""
    return layer.to(device=weight.device, dtype=weight.dtype)


class PooledLinearHead(nn.Module):
    """Global average pool -> dropout -> linear: the classifier every family shares with its opaque twin."""

    pool_type = "avg"  # timm's name of its global pool (`reset_classifier`'s global_pool)

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return pooled if pre_logits else self.fc(self.drop(pooled))

    def reset(self, num_classes: int) -> None:
        self.fc = like(nn.Linear(self.in_features, num_classes), self.fc.weight)


class ClassifierHeadMixin:
    """timm's `reset_classifier` and `num_features` for every model whose classifier is `self.head`: an `nn.Linear`
    or a `PooledLinearHead` (the one reset_classifier of the zoo). `pool_type` is timm's name of the pooling the
    head reads the features through ("" where it pools nothing), what `reset_classifier`'s `global_pool` may
    repeat."""

    head: nn.Module
    num_classes: int
    pool_type: str = ""

    @property
    def num_features(self) -> int:
        """timm's `num_features`: the width the classifier reads (its `in_features`), so that a new classifier is
        ``nn.Linear(model.num_features, k)``."""
        return self.head.in_features

    def check_reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Refuse a `reset_classifier` before it changes anything (`zoo.checks.check_new_head`); a model with more
        to reset (ICNN's filter statistics) checks that too."""
        check_new_head(self, num_classes, global_pool, self.pool_type)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's head swap: a new classifier for `num_classes`; `global_pool` None or the head's own `pool_type`."""
        self.check_reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        if isinstance(self.head, PooledLinearHead):
            self.head.reset(num_classes)
        else:
            self.head = like(nn.Linear(self.head.in_features, num_classes), self.head.weight)


class PooledHeadMixin(ClassifierHeadMixin):
    """timm's head API for models whose classifier is `self.head`, a `PooledLinearHead`."""

    head: PooledLinearHead
    pool_type = PooledLinearHead.pool_type

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(features, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc
