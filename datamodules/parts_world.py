"""parts_world: a procedurally generated image world that knows its ground truth.

Each class is a fixed composition of parts (a shape, a colour and a slot on a 3x3 layout around the object
centre). Images jitter the object's position, scale, part positions and colours, add distractor parts of any
type away from the object, and noise. Every image carries its label, object box, part boxes, part landmarks,
part masks, attribute vector, visible distractor types and three reference sentences ("captions", token ids of
CAPTION_VOCABULARY), so every interpretability claim can be scored against the truth.
Deterministic: the class definitions depend on `world_seed`, the images of each split on (`seed`, split).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from datamodules._base import DetectionDataModule, DictDataModule, TensorDictDataset, check_split_sizes, decode_tokens

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
COLOURS = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10), "magenta": (0.85, 0.20, 0.85), "cyan": (0.10, 0.85, 0.85),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_VALUES = torch.tensor(list(COLOURS.values()))  # (n_colours, 3)
NUM_PART_TYPES = len(SHAPES) * len(COLOURS)
# Part slots: the 3x3 layout around the object centre, (dx, dy) in units of the part spacing.
SLOTS = torch.tensor([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float32)  # (9, 2)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def part_type_name(part_type: int) -> str:
    """"red triangle" for a part type id (shape-major: id = shape * n_colours + colour)."""
    shape, colour = divmod(int(part_type), len(COLOURS))
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


@dataclass(frozen=True)
class WorldDefinition:
    """The classes of one world: part types (C, P) and slot indices (C, P) into the 3x3 layout."""

    part_types: torch.Tensor
    slots: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.part_types.shape[0]

    @property
    def parts_per_class(self) -> int:
        return self.part_types.shape[1]


def make_world(num_classes: int, parts_per_class: int, world_seed: int = 0,
               shared_part_types: bool = False) -> WorldDefinition:
    """Draw distinct class compositions: each class a set of distinct part types on distinct layout slots.

    shared_part_types: every class uses the same part types and classes differ only in where each type sits, so
    telling classes apart needs the layout, not just the parts present."""
    if not 2 <= num_classes <= 200:
        raise ValueError(f"num_classes must be in [2, 200]; got {num_classes}.")
    if not 1 <= parts_per_class <= len(SLOTS):
        raise ValueError(f"parts_per_class must be in [1, {len(SLOTS)}]; got {parts_per_class}.")
    layouts = math.perm(len(SLOTS), parts_per_class)  # ways to put the shared types on distinct slots
    if shared_part_types and num_classes > layouts:
        raise ValueError(f"shared_part_types: {parts_per_class} part types fit on the 3x3 slots in {layouts} ways, "
                         f"fewer than num_classes={num_classes}.")
    rng = np.random.default_rng(world_seed)
    seen: set[tuple[int, ...]] = set()
    types, slots = [], []
    shared = rng.choice(NUM_PART_TYPES, parts_per_class, replace=False) if shared_part_types else None
    while len(types) < num_classes:  # a loop over classes, once per world
        t = rng.choice(NUM_PART_TYPES, parts_per_class, replace=False) if shared is None else rng.permutation(shared)
        s = rng.choice(len(SLOTS), parts_per_class, replace=False)
        key = tuple(sorted(zip(t.tolist(), s.tolist())))
        if key not in seen:
            seen.add(key)
            types.append(t)
            slots.append(s)
    return WorldDefinition(torch.as_tensor(np.stack(types)), torch.as_tensor(np.stack(slots)))


def shape_masks(shape_ids: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Boolean masks of parts; offsets dx, dy: (N, P, H, W) from each part centre, radius: (N, P, 1, 1)."""
    u, v = dx / radius, dy / radius
    dist = torch.sqrt(u**2 + v**2)
    by_shape = torch.stack([
        dist <= 1.0,                                                         # circle
        torch.maximum(u.abs(), v.abs()) <= 0.85,                             # square
        (v.abs() <= 0.85) & (u.abs() <= (v + 0.85) / 1.7),                   # triangle, apex up
        (dist <= 1.0) & (dist >= 0.5),                                       # ring
        ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),  # cross
        u.abs() + v.abs() <= 1.0,                                            # diamond
    ])  # (n_shapes, N, P, H, W)
    index = shape_ids[None, :, :, None, None].expand(1, *u.shape)
    return by_shape.gather(0, index)[0]  # (N, P, H, W)


def _boxes_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise-aligned xyxy overlap test; a, b broadcastable (..., 4)."""
    return (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])


@dataclass(frozen=True)
class Jitter:
    """How much images of one class vary, and how much clutter surrounds them."""

    scale: float = 0.15          # object scale ~ U(1 - scale, 1 + scale)
    position: float = 1.0        # fraction of the free canvas the object centre may move over
    part: float = 0.15           # part centre noise, in part radii
    colour: float = 0.08         # per-channel colour noise
    clutter: float = 0.5         # probability of each distractor part
    max_distractors: int = 2
    noise: float = 0.04          # pixel noise std


def render(world: WorldDefinition, labels: torch.Tensor, image_size: int, jitter: Jitter,
           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Render one image per label, all at once (vectorised over images and parts).

    Returns uint8 images (N, 3, S, S) and the ground truth: object_box (N, 4) xyxy, part_boxes (N, P, 4),
    landmarks (N, P, 2) xy, part_masks (N, P, S, S) bool, part_types (N, P), attributes (N, A) multi-hot.
    """
    n, parts, size = len(labels), world.parts_per_class, image_size
    d = jitter.max_distractors

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    scale = uniform(n, 1, low=1 - jitter.scale, high=1 + jitter.scale)           # (N, 1)
    spacing = 0.21 * size * scale                                                 # (N, 1)
    radius = 0.075 * size * scale * uniform(n, parts, low=0.9, high=1.1)          # (N, P)
    margin = spacing + radius.max(1, keepdim=True).values + 1                     # (N, 1)
    free = (size - 2 * margin).clamp(min=0)
    centre = size / 2 + jitter.position * (uniform(n, 2) - 0.5) * free            # (N, 2)
    offsets = SLOTS[world.slots[labels]] * spacing[..., None]                    # (N, P, 2)
    part_xy = centre[:, None] + offsets + jitter.part * radius[..., None] * torch.randn(n, parts, 2,
                                                                                        generator=generator)
    part_types = world.part_types[labels]                                         # (N, P)

    part_boxes = torch.cat([part_xy - radius[..., None], part_xy + radius[..., None]], -1)  # (N, P, 4)
    object_box = torch.cat([part_boxes[..., :2].min(1).values, part_boxes[..., 2:].max(1).values], -1)

    # Distractors: random types and places, kept only if clear of the object box (a few vectorised redraws).
    d_radius = 0.075 * size * uniform(n, d, low=0.8, high=1.2)
    d_xy = uniform(n, d, 2, low=0, high=size)
    for _ in range(8):  # redraw rounds, not a loop over samples
        d_boxes = torch.cat([d_xy - d_radius[..., None], d_xy + d_radius[..., None]], -1)
        clash = _boxes_overlap(d_boxes, object_box[:, None] + torch.tensor([-2.0, -2, 2, 2]))
        d_xy = torch.where(clash[..., None], uniform(n, d, 2, low=0, high=size), d_xy)
    d_boxes = torch.cat([d_xy - d_radius[..., None], d_xy + d_radius[..., None]], -1)
    d_present = (uniform(n, d) < jitter.clutter) & ~_boxes_overlap(d_boxes, object_box[:, None])
    d_types = torch.randint(NUM_PART_TYPES, (n, d), generator=generator)

    # Draw object parts and distractors together; later layers paint over earlier ones.
    all_xy = torch.cat([part_xy, d_xy], 1)                                        # (N, P+D, 2)
    all_r = torch.cat([radius, d_radius], 1)[..., None, None]                     # (N, P+D, 1, 1)
    all_types = torch.cat([part_types, d_types], 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - all_xy[..., 0, None, None]                 # (N, P+D, 1, S)
    dy = coords[None, None, :, None] - all_xy[..., 1, None, None]                 # (N, P+D, S, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)
    masks = shape_masks(all_types // len(COLOURS), dx, dy, all_r)                 # (N, P+D, S, S)
    masks[:, parts:] &= d_present[..., None, None]

    colours = COLOUR_VALUES[all_types % len(COLOURS)]                             # (N, P+D, 3)
    colours = (colours + jitter.colour * torch.randn(colours.shape, generator=generator)).clamp(0, 1)
    layer = torch.arange(1, parts + d + 1)[None, :, None, None]
    top = (masks * layer).amax(1)                                                 # (N, S, S), 0 = background
    background = uniform(n, 3, 1, 1, low=0.25, high=0.55) + jitter.noise * torch.randn(n, 3, size, size,
                                                                                        generator=generator)
    painted = colours.gather(1, (top.clamp(min=1) - 1).flatten(1)[..., None].expand(-1, -1, 3))  # (N, S*S, 3)
    painted = painted.transpose(1, 2).reshape(n, 3, size, size)
    image = torch.where(top[:, None] > 0, painted, background)
    image = (image + 0.5 * jitter.noise * torch.randn(image.shape, generator=generator)).clamp(0, 1)

    attributes = torch.zeros(n, NUM_PART_TYPES).scatter_(1, part_types, 1.0)
    visible_distractors = d_present & (masks[:, parts:].flatten(2).any(-1))  # not painted over entirely
    return {
        "image": (image * 255).round().to(torch.uint8),
        "label": labels.long(),
        "object_box": object_box.clamp(0, size),
        "part_boxes": part_boxes.clamp(0, size),
        "landmarks": part_xy.clamp(0, size - 1),
        "part_masks": masks[:, :parts],
        "part_types": part_types.long(),
        "attributes": attributes,
        "distractor_types": torch.where(visible_distractors, d_types, -1).long(),  # (N, D), -1: none
    }


# Reference sentences: what a person would write about the image, in a few phrasings, mentioning 1-3 of the
# visible parts (object parts three times as likely as distractors), e.g. "this object has a red triangle and a
# blue ring". Token ids index CAPTION_VOCABULARY; each caption is <bos> words <eos> <pad>...
PAD, BOS, EOS = 0, 1, 2
_OPENINGS = (("this", "object", "has"), ("there", "is"), ("it", "has"))
CAPTION_VOCABULARY = ["<pad>", "<bos>", "<eos>", "<unk>", "this", "object", "has", "there", "is", "it", "a", "and",
                      ",", *COLOUR_NAMES, *SHAPES]
CAPTION_LENGTH = 18
_WORD_ID = {word: i for i, word in enumerate(CAPTION_VOCABULARY)}


def part_phrase(part_type: int) -> list[int]:
    """Token ids of "a <colour> <shape>"."""
    shape, colour = divmod(int(part_type), len(COLOURS))
    return [_WORD_ID["a"], _WORD_ID[COLOUR_NAMES[colour]], _WORD_ID[SHAPES[shape]]]


def make_captions(part_types: torch.Tensor, distractor_types: torch.Tensor, num_captions: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(N, num_captions, CAPTION_LENGTH) token ids. Runs once per generated split (a loop over images that
    assembles variable-length sentences; the random choices are drawn for all images at once)."""
    n = len(part_types)
    items = torch.cat([part_types, distractor_types], 1)  # (N, P + D)
    weights = torch.cat([torch.full(part_types.shape, 3.0), (distractor_types >= 0).float()], 1)
    keys = torch.rand(n, num_captions, items.shape[1], generator=generator) ** (1 / weights[:, None])  # (N, R, I)
    order = keys.argsort(-1, descending=True)  # weighted sampling without replacement
    counts = torch.randint(1, 4, (n, num_captions), generator=generator)
    openings = torch.randint(0, len(_OPENINGS), (n, num_captions), generator=generator)
    captions = torch.zeros(n, num_captions, CAPTION_LENGTH, dtype=torch.long)
    for i in range(n):
        for r in range(num_captions):
            chosen = [int(items[i, j]) for j in order[i, r, : int(counts[i, r])] if weights[i, j] > 0]
            words = [_WORD_ID[w] for w in _OPENINGS[int(openings[i, r])]]
            for k, part_type in enumerate(chosen):
                if k:
                    words.append(_WORD_ID["and"] if k == len(chosen) - 1 else _WORD_ID[","])
                words += part_phrase(part_type)
            tokens = [BOS, *words, EOS]
            captions[i, r, : len(tokens)] = torch.tensor(tokens)
    return captions


def decode_caption(tokens: torch.Tensor) -> str:
    """Words of a caption up to <eos> (<bos> and padding dropped)."""
    return " ".join(decode_tokens(tokens, CAPTION_VOCABULARY, end_token=EOS, skip=(PAD, BOS)))


def mention_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """(B, NUM_PART_TYPES) multi-hot of the part types that sentences (B, L) name as "<colour> <shape>" bigrams."""
    first_colour, first_shape = _WORD_ID[COLOUR_NAMES[0]], _WORD_ID[SHAPES[0]]
    colour = tokens[:, :-1] - first_colour  # (B, L-1)
    shape = tokens[:, 1:] - first_shape
    named = (colour >= 0) & (colour < len(COLOURS)) & (shape >= 0) & (shape < len(SHAPES))
    part_type = (shape.clamp(0, len(SHAPES) - 1) * len(COLOURS) + colour.clamp(0, len(COLOURS) - 1))
    # float32 whatever the default dtype: under `--trainer.precision=bf16-true` or `64-true` Lightning sets it to the
    # run's while a step runs, and scatter_add_ takes a source of out's dtype
    out = torch.zeros(len(tokens), NUM_PART_TYPES, dtype=torch.float32, device=tokens.device)
    return out.scatter_add_(1, part_type, named.float()).clamp(max=1)


OBJECT_CROP_CANVAS = 1.75  # object crops are rendered on a canvas this much larger, so they are resampled little


def crop_to_objects(data: dict[str, torch.Tensor], size: int, margin: float = 0.1) -> dict[str, torch.Tensor]:
    """Each image cropped to a square around its object box (`margin` of the box's longer side on every side, kept
    inside the canvas) and resized to `size`, with its masks, landmarks and boxes: the world's analogue of CUB's
    bird crops (`CUB200DataModule(crop_to_box=True)`), on which ProtoPNet is trained and evaluated."""
    from torchvision.ops import roi_align

    canvas = data["image"].shape[-1]
    box = data["object_box"].float()  # (N, 4) xyxy
    side = ((box[:, 2:] - box[:, :2]).amax(1) * (1 + 2 * margin)).clamp(max=canvas)  # (N,)
    centre = ((box[:, :2] + box[:, 2:]) / 2).clamp(min=side[:, None] / 2, max=canvas - side[:, None] / 2)
    origin = centre - side[:, None] / 2  # (N, 2) the crop's top-left corner
    rois = torch.cat([torch.arange(len(box), dtype=torch.float32)[:, None], origin, origin + side[:, None]], 1)

    def resample(maps: torch.Tensor) -> torch.Tensor:  # (N, K, S, S) -> (N, K, size, size)
        return roi_align(maps.float(), rois, output_size=size, aligned=True, sampling_ratio=2)

    scale = (size / side)[:, None, None]  # (N, 1, 1)
    shift = origin[:, None]  # (N, 1, 2)
    cropped = dict(data)
    cropped["image"] = resample(data["image"]).round().clamp(0, 255).to(torch.uint8)
    cropped["part_masks"] = resample(data["part_masks"]) > 0.5
    cropped["landmarks"] = ((data["landmarks"] - shift) * scale).clamp(0, size - 1)
    cropped["part_boxes"] = ((data["part_boxes"] - shift.repeat(1, 1, 2)) * scale).clamp(0, size)
    cropped["object_box"] = ((box[:, None] - shift.repeat(1, 1, 2)) * scale)[:, 0].clamp(0, size)
    return cropped


def generate_split(world: WorldDefinition, num_images: int, image_size: int, jitter: Jitter, seed: int,
                   split: str, chunk: int = 256, crop_to_object: bool = False) -> dict[str, torch.Tensor]:
    """Balanced labels, rendered in chunks to bound memory; identical for identical (seed, split).
    `crop_to_object`: rendered on a canvas `OBJECT_CROP_CANVAS` times larger, then cropped (`crop_to_objects`)."""
    generator = torch.Generator().manual_seed(seed * 1000 + SPLIT_IDS[split])
    labels = torch.arange(num_images) % world.num_classes
    labels = labels[torch.randperm(num_images, generator=generator)]
    canvas = round(image_size * OBJECT_CROP_CANVAS) if crop_to_object else image_size
    pieces = [render(world, labels[i:i + chunk], canvas, jitter, generator) for i in range(0, num_images, chunk)]
    if crop_to_object:
        pieces = [crop_to_objects(piece, image_size) for piece in pieces]
    data = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    # captions draw from their own generator, so adding them left every image as it was
    caption_generator = torch.Generator().manual_seed(seed * 1000 + SPLIT_IDS[split] + 500)
    data["captions"] = make_captions(data["part_types"], data["distractor_types"], 3, caption_generator)
    return data


@functools.lru_cache(maxsize=6)
def cached_split(num_classes: int, parts_per_class: int, world_seed: int, num_images: int, image_size: int,
                 jitter: Jitter, seed: int, split: str, shared_part_types: bool = False,
                 crop_to_object: bool = False) -> dict[str, torch.Tensor]:
    """`generate_split` memoised per process: runs that share a world (compare, ablate) draw it once.
    Callers must not modify the returned tensors."""
    world = make_world(num_classes, parts_per_class, world_seed, shared_part_types)
    return generate_split(world, num_images, image_size, jitter, seed, split, crop_to_object=crop_to_object)


class PartsWorldDataModule(DictDataModule):
    """parts_world classification: dict batches with image, label and the full ground truth.

    Args:
        num_classes: classes, each a distinct composition of `parts_per_class` parts.
        image_size: square canvas side in pixels (parts scale with it).
        num_train / num_val / num_test: images per split.
        seed: images; world_seed: class definitions.
        scale_jitter, position_jitter, part_jitter, colour_jitter: see `Jitter`.
        clutter: probability of each of `max_distractors` distractor parts; noise: pixel noise std.
        shared_part_types: all classes have the same part types in different places (see `make_world`): the class
            is in the layout only (the harder settings of configs/icnn/parts_world_hard.yaml).
        crop_to_object: each image is its object's box (with a margin) resized to `image_size`, as CUB's bird crops
            (`crop_to_objects`); distractors still appear inside the crop.
        mean / std: per-channel normalisation of the [0, 1] images (lists), "pretrained" (mean only: the model's
            backbone's timm pretrained mean and std, resolved by train.py), or None: none (`DictDataModule`).

    `class_names` are "class 0", "class 1", ... (the world's compositions have no names).
    """

    num_channels = 3

    def __init__(
        self,
        num_classes: int = 6,
        parts_per_class: int = 3,
        image_size: int = 64,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        seed: int = 0,
        world_seed: int = 0,
        scale_jitter: float = 0.15,
        position_jitter: float = 1.0,
        part_jitter: float = 0.15,
        colour_jitter: float = 0.08,
        clutter: float = 0.5,
        max_distractors: int = 2,
        noise: float = 0.04,
        mean: list[float] | str | None = None,
        std: list[float] | str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        shared_part_types: bool = False,
        crop_to_object: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.set_normalization(mean, std)
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels for parts to be drawable; got {image_size}.")
        if not 0.0 <= clutter <= 1.0:
            raise ValueError(f"clutter is a probability in [0, 1]; got {clutter}.")
        # setup renders every split, the test split too (`generate_split` cannot render none): num_test >= 1
        check_split_sizes(type(self).__name__, num_train=num_train, num_val=num_val, num_test=num_test,
                          test_optional=False)
        self.save_hyperparameters()
        self.world = make_world(num_classes, parts_per_class, world_seed, shared_part_types)
        self.num_classes, self.image_size = num_classes, image_size
        self.class_names = [f"class {c}" for c in range(num_classes)]
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.jitter = Jitter(scale_jitter, position_jitter, part_jitter, colour_jitter, clutter, max_distractors, noise)

    vocabulary = CAPTION_VOCABULARY

    @staticmethod
    def decode(tokens: torch.Tensor) -> str:
        """The words of a sentence (L,) of `vocabulary` ids (a reference or a generated one), up to <eos>."""
        return decode_caption(tokens)

    @staticmethod
    def mentioned(tokens: torch.Tensor) -> torch.Tensor:
        """Part types named by generated sentences (B, L): what `zoo.textual.metrics.AttributeMention` scores."""
        return mention_matrix(tokens)

    @property
    def attribute_names(self) -> list[str]:
        return [part_type_name(t) for t in range(NUM_PART_TYPES)]

    def setup(self, stage: str | None = None) -> None:
        for split, size in self.sizes.items():
            if split not in self.splits:  # generated once, then cached in memory
                world = self.hparams
                data = cached_split(world.num_classes, world.parts_per_class, world.world_seed, size, self.image_size,
                                    self.jitter, self.seed, split, world.shared_part_types,
                                    world.crop_to_object)
                self.splits[split] = TensorDictDataset(data)


# ----------------------------------------------------------------------------------------------------- scene mode
def render_scenes(world: WorldDefinition, num_scenes: int, canvas_size: int, max_objects: int,
                  object_sizes: tuple[int, int], jitter: Jitter, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Scenes of 1..max_objects non-overlapping objects for detection.

    Objects are rendered with `render` on square patches (sizes from `object_sizes`, 4 distinct sizes, one batched
    call each) and their part pixels pasted on a noisy background. Returns uint8 images (N, 3, S, S) and per object
    (M rows): scene (M,), label (M,) 0-based, box (M, 4) and part_boxes (M, P, 4) xyxy in canvas pixels."""
    counts = torch.randint(1, max_objects + 1, (num_scenes,), generator=generator)
    total = int(counts.sum())
    labels = torch.randint(world.num_classes, (total,), generator=generator)
    size_choices = torch.linspace(object_sizes[0], object_sizes[1], 4).round().long()
    sizes = size_choices[torch.randint(4, (total,), generator=generator)]
    patch_jitter = replace(jitter, position=0.0, clutter=0.0)
    patches: list[dict[str, torch.Tensor] | None] = [None] * total
    for size in size_choices.unique().tolist():  # four batched render calls
        rows = (sizes == size).nonzero().flatten()
        if len(rows):
            drawn = render(world, labels[rows], size, patch_jitter, generator)
            for j, row in enumerate(rows.tolist()):
                patches[row] = {k: drawn[k][j] for k in ("image", "part_masks", "object_box", "part_boxes")}
    background = torch.rand(num_scenes, 3, 1, 1, generator=generator) * 0.3 + 0.25
    images = background + jitter.noise * torch.randn(num_scenes, 3, canvas_size, canvas_size, generator=generator)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    tries = torch.rand(total, 20, 2, generator=generator)  # candidate placements, drawn up front
    scene_of, kept = [], []
    first = 0
    for scene, count in enumerate(counts.tolist()):  # generation time only: place objects without overlap
        placed: list[torch.Tensor] = []
        for row in range(first, first + count):
            patch, size = patches[row], int(sizes[row])
            for x0, y0 in (tries[row] * (canvas_size - size)).floor().tolist():
                box = patch["object_box"] + torch.tensor([x0, y0, x0, y0])
                if not any(bool(_boxes_overlap(box, other + torch.tensor([-3.0, -3, 3, 3]))) for other in placed):
                    placed.append(box)
                    region = images[scene, :, int(y0):int(y0) + size, int(x0):int(x0) + size]
                    foreground = patch["part_masks"].any(0)  # (size, size)
                    region[:] = torch.where(foreground, patch["image"], region)
                    scene_of.append(scene)
                    kept.append((row, x0, y0))
                    break
        first += count
    rows = torch.tensor([r for r, _, _ in kept])
    shift = torch.tensor([[x0, y0, x0, y0] for _, x0, y0 in kept])  # (M, 4)
    return {
        "image": images,
        "scene": torch.tensor(scene_of),
        "label": labels[rows],
        "box": torch.stack([patches[r]["object_box"] for r in rows.tolist()]) + shift,
        "part_boxes": torch.stack([patches[r]["part_boxes"] for r in rows.tolist()]) + shift[:, None],
    }


class SceneDataset(torch.utils.data.Dataset):
    """(image, target) per scene: target {"boxes", "labels" (1-based), "part_boxes" (n, P, 4), "index"}."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.images = data["image"]
        self.objects = {k: data[k] for k in ("box", "label", "part_boxes")}
        order = data["scene"]
        self.starts = torch.searchsorted(order, torch.arange(len(self.images) + 1))  # objects are sorted by scene

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, b = int(self.starts[index]), int(self.starts[index + 1])
        target = {"boxes": self.objects["box"][a:b].float(), "labels": self.objects["label"][a:b] + 1,
                  "part_boxes": self.objects["part_boxes"][a:b].float(), "index": torch.tensor(index)}
        return self.images[index].float() / 255.0, target


@functools.lru_cache(maxsize=6)
def cached_scenes(num_classes: int, parts_per_class: int, world_seed: int, num_scenes: int, canvas_size: int,
                  max_objects: int, object_sizes: tuple[int, int], jitter: Jitter, seed: int, split: str,
                  shared_part_types: bool = False) -> dict[str, torch.Tensor]:
    """`render_scenes` for one split, memoised per process (compare/ablate runs draw it once)."""
    generator = torch.Generator().manual_seed(seed * 1000 + SPLIT_IDS[split] + 700)
    world = make_world(num_classes, parts_per_class, world_seed, shared_part_types)
    return render_scenes(world, num_scenes, canvas_size, max_objects, object_sizes, jitter, generator)


class PartsWorldScenesDataModule(DetectionDataModule):
    """parts_world scene mode for detection: 1..max_objects objects per canvas with object and part boxes.

    The classes are the classification world's (same `world_seed` = same compositions); batches are
    {"images": [...], "targets": [{"boxes", "labels", "part_boxes", "index"}]}.

    Args:
        canvas_size: square canvas side in pixels; object_sizes: (min, max) side of the square an object is drawn
            in (the object box is about 0.6x that).
        max_objects: objects per scene are uniform in 1..max_objects (fewer when no free place is found).
        shared_part_types: all classes have the same part types in different places (see `make_world`): the
            class is in the layout only.
        Other arguments as `PartsWorldDataModule`.
    """

    num_channels = 3

    def __init__(self, num_classes: int = 4, parts_per_class: int = 3, canvas_size: int = 128, max_objects: int = 4,
                 object_sizes: tuple[int, int] = (40, 64), num_train: int = 600, num_val: int = 150,
                 num_test: int = 150, seed: int = 0, world_seed: int = 0, scale_jitter: float = 0.15,
                 part_jitter: float = 0.15, colour_jitter: float = 0.08, noise: float = 0.04, batch_size: int = 8,
                 num_workers: int = 0, shared_part_types: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not 1 <= max_objects <= 8:
            raise ValueError(f"max_objects must be in [1, 8]; got {max_objects}.")
        low, high = object_sizes
        if not 24 <= low <= high <= canvas_size:
            raise ValueError(f"object_sizes must satisfy 24 <= min <= max <= canvas_size ({canvas_size}); got "
                             f"{tuple(object_sizes)}.")
        # setup renders every split, the test split too (`render_scenes` cannot render none): num_test >= 1
        check_split_sizes(type(self).__name__, num_train=num_train, num_val=num_val, num_test=num_test,
                          test_optional=False)
        self.save_hyperparameters()
        self.world = make_world(num_classes, parts_per_class, world_seed, shared_part_types)
        self.num_classes, self.image_size = num_classes, canvas_size
        self.class_names = [f"class {c}" for c in range(num_classes)]
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.jitter = Jitter(scale_jitter, 0.0, part_jitter, colour_jitter, 0.0, 0, noise)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        for split, size in self.sizes.items():
            if split not in self.splits:
                data = cached_scenes(h.num_classes, h.parts_per_class, h.world_seed, size, h.canvas_size,
                                     h.max_objects, tuple(h.object_sizes), self.jitter, h.seed, split,
                                     h.shared_part_types)
                self.splits[split] = SceneDataset(data)
