"""Datamodules: the parts world's ground truth is consistent, loaders read the real layouts, bad folders say why."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (CUB200DataModule, DatasetLayoutError, DataSettingError, DigitsDataModule, IMDBDataModule,
                         ImageFolderDataModule, L2XSyntheticDataModule, PartsWorldDataModule,
                         PartsWorldScenesDataModule, RuleSeriesDataModule, SeriesFileDataModule,
                         SyntheticSentimentDataModule, VOCDataModule)
from datamodules.image_folder import read_rgb
from datamodules.parts_world import COLOUR_VALUES, NUM_PART_TYPES, make_world
from tests.conftest import voc_annotation, write_image


@pytest.fixture(scope="module")
def world_batch() -> dict[str, torch.Tensor]:
    dm = PartsWorldDataModule(num_train=64, num_val=16, num_test=16, clutter=1.0, colour_jitter=0.0, noise=0.0)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_parts_world_is_deterministic_and_seeded() -> None:
    def train_images(seed: int) -> torch.Tensor:
        dm = PartsWorldDataModule(num_train=40, num_val=8, num_test=8, seed=seed)
        dm.setup()
        return dm.splits["train"].tensors["image"]

    assert torch.equal(train_images(0), train_images(0))
    assert not torch.equal(train_images(0), train_images(1))


def test_parts_world_ground_truth_is_consistent(world_batch: dict[str, torch.Tensor]) -> None:
    b = world_batch
    n, parts = b["part_types"].shape
    assert b["image"].shape == (n, 3, 64, 64) and b["image"].dtype == torch.float32
    assert 0 <= b["image"].min() and b["image"].max() <= 1
    boxes, marks, masks = b["part_boxes"], b["landmarks"], b["part_masks"]
    # Landmarks are the part box centres; every mask pixel lies inside its part box; masks are not empty.
    assert torch.allclose(marks, (boxes[..., :2] + boxes[..., 2:]) / 2, atol=1.0)
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    inside = ((xs >= boxes[..., 0, None, None] - 0.5) & (xs <= boxes[..., 2, None, None] + 0.5)
              & (ys >= boxes[..., 1, None, None] - 0.5) & (ys <= boxes[..., 3, None, None] + 0.5))
    assert not (masks & ~inside).any()
    assert masks.flatten(2).sum(-1).min() > 0
    # The object box contains every part box.
    assert (b["object_box"][:, None, :2] <= boxes[..., :2] + 1e-4).all()
    assert (b["object_box"][:, None, 2:] >= boxes[..., 2:] - 1e-4).all()
    # With no colour jitter or noise, mask pixels carry exactly their part type's colour.
    expected = COLOUR_VALUES[b["part_types"] % len(COLOUR_VALUES)]  # (N, P, 3)
    pixels = b["image"].permute(0, 2, 3, 1)[:, None].expand(-1, parts, -1, -1, -1)[masks]  # (M, 3)
    colours = expected[:, :, None, None].expand(-1, -1, 64, 64, -1)[masks]
    assert (pixels - colours).abs().max() <= 1 / 255 + 1e-6
    # Attributes: exactly the part types of the object.
    assert torch.equal(b["attributes"].nonzero()[:, 1].reshape(n, -1).sort(-1).values,
                       b["part_types"].sort(-1).values)
    assert b["attributes"].shape[1] == NUM_PART_TYPES


def test_crop_to_object_fills_the_image_with_the_object_and_moves_the_ground_truth_with_it() -> None:
    """The object crops (CUB's bird crops for the parts world): the same labels and part types as the uncropped
    world, the object box spanning most of the image, masks inside their boxes, landmarks at the mask centres."""
    settings = dict(num_train=32, num_val=8, num_test=8, clutter=1.0, colour_jitter=0.0, noise=0.0)
    plain, cropped = PartsWorldDataModule(**settings), PartsWorldDataModule(**settings, crop_to_object=True)
    plain.setup(), cropped.setup()
    a, b = plain.splits["train"].tensors, cropped.splits["train"].tensors
    assert torch.equal(a["label"], b["label"]) and torch.equal(a["part_types"], b["part_types"])
    assert b["image"].shape == a["image"].shape and b["part_masks"].shape == a["part_masks"].shape
    box = b["object_box"]
    assert ((box[:, 2:] - box[:, :2]).amax(1) >= 0.75 * 64).all()  # the object fills the crop (10 % margins)
    assert (b["part_masks"].float().mean() > 2 * a["part_masks"].float().mean())  # parts are larger
    boxes, masks = b["part_boxes"], b["part_masks"]
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    inside = ((xs >= boxes[..., 0, None, None] - 1) & (xs <= boxes[..., 2, None, None] + 1)
              & (ys >= boxes[..., 1, None, None] - 1) & (ys <= boxes[..., 3, None, None] + 1))
    assert not (masks & ~inside).any() and masks.flatten(2).sum(-1).min() > 0
    area = masks.flatten(2).sum(-1).clamp(min=1)  # (N, P)
    centre = torch.stack([(masks * xs).flatten(2).sum(-1), (masks * ys).flatten(2).sum(-1)], -1) / area[..., None]
    symmetric = (b["part_types"] // len(COLOUR_VALUES)) != 2  # shapes other than the (asymmetric) triangle
    assert (centre - b["landmarks"]).norm(dim=-1)[symmetric].max() < 1.5


def test_parts_world_labels_follow_the_class_definitions(world_batch: dict[str, torch.Tensor]) -> None:
    world = make_world(6, 3, world_seed=0)
    assert torch.equal(world.part_types[world_batch["label"]], world_batch["part_types"])


def test_shared_part_types_leave_only_the_layout_to_tell_classes_apart() -> None:
    world = make_world(5, 3, world_seed=0, shared_part_types=True)
    assert len({tuple(sorted(t)) for t in world.part_types.tolist()}) == 1  # one set of part types for all classes
    layouts = {tuple(sorted(zip(t, s))) for t, s in zip(world.part_types.tolist(), world.slots.tolist())}
    assert len(layouts) == 5  # ... at a different (type, slot) layout per class
    default = make_world(5, 3, world_seed=0)
    assert len({tuple(sorted(t)) for t in default.part_types.tolist()}) > 1
    with pytest.raises(ValueError, match="fit on the 3x3 slots in 9 ways"):  # one type: nine layouts at most
        make_world(10, 1, world_seed=0, shared_part_types=True)
    scenes = {}
    for shared in (False, True):
        scenes[shared] = PartsWorldScenesDataModule(num_train=6, num_val=2, num_test=2, shared_part_types=shared)
        scenes[shared].setup()
    assert torch.equal(scenes[True].world.part_types, make_world(4, 3, 0, True).part_types)
    assert not torch.equal(scenes[True].splits["train"].images, scenes[False].splits["train"].images)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 16}, "image_size must be at least 32"),
    ({"parts_per_class": 10}, r"parts_per_class must be in \[1, 9\]"),
    ({"num_classes": 1}, r"num_classes must be in \[2, 200\]"),
    ({"clutter": 1.5}, "clutter is a probability"),
])
def test_parts_world_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartsWorldDataModule(**kwargs)


def test_digits_subset_and_upsampling() -> None:
    dm = DigitsDataModule(classes=[8, 3], image_size=16)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert dm.num_classes == 2 and dm.num_channels == 1
    assert batch["image"].shape[1:] == (1, 16, 16) and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert torch.equal(batch["label"], (batch["digit"] == 3).long())  # classes=[8, 3]: 8 -> 0, 3 -> 1
    sizes = {s: len(d) for s, d in dm.splits.items()}
    assert sum(sizes.values()) == 357 and sizes["test"] == pytest.approx(0.2 * 357, abs=1)  # 183 threes, 174 eights
    with pytest.raises(ValueError, match="at least two distinct digits"):
        DigitsDataModule(classes=[3, 3])


def test_image_folder_reads_the_layout(image_folder_root: Path) -> None:
    dm = ImageFolderDataModule(str(image_folder_root), image_size=24)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert batch["image"].shape == (6, 3, 24, 24) and sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(dm.splits["test"]) == 4  # no test/ folder: the val split


def test_image_folder_test_and_predict_read_a_test_folder_else_val(image_folder_root: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The README's layout root/{train,val[,test]}: a test/ folder is what test and predict read (it was ignored:
    both read val/ and said nothing); without one they read val/, said once; a test_dir given still wins."""
    for c, name in enumerate(("cat", "dog")):  # 3 test images per class; val holds 2
        for i in range(3):
            write_image(image_folder_root / "test" / name / f"{i}.png", (40, 30), seed=500 + 10 * c + i)

    def files(loader: torch.utils.data.DataLoader, dm: ImageFolderDataModule) -> list[str]:
        names = dm.sample_names("test")
        return [names[i] for batch in loader for i in batch["index"].tolist()]

    dm = ImageFolderDataModule(str(image_folder_root), image_size=16, batch_size=4)
    expected = [f"test/{name}/{i}.png" for name in ("cat", "dog") for i in range(3)]
    assert files(dm.test_dataloader(), dm) == expected and files(dm.predict_dataloader(), dm) == expected
    assert len(dm.split_samples("val")) == 4

    explicit = ImageFolderDataModule(str(image_folder_root), image_size=16, test_dir="val")
    assert files(explicit.predict_dataloader(), explicit)[0] == "val/cat/0.png"
    with pytest.raises(DatasetLayoutError, match=r"split folder '.*elsewhere' does not exist"):
        ImageFolderDataModule(str(image_folder_root), test_dir="elsewhere")

    shutil.rmtree(image_folder_root / "test" / "dog")  # a test/ laid out otherwise: val/, warned when read
    dm = ImageFolderDataModule(str(image_folder_root), image_size=16, batch_size=4)  # fit never reads it: no error
    with pytest.warns(UserWarning, match=r"test' is not laid out as train/ \(its classes \['cat'\].*read the val"):
        assert files(dm.test_dataloader(), dm)[0] == "val/cat/0.png"
    with pytest.raises(DatasetLayoutError, match=r"Split 'test' .* has classes \['cat'\]"):  # given: checked
        ImageFolderDataModule(str(image_folder_root), test_dir="test")
    shutil.rmtree(image_folder_root / "test" / "cat")  # an empty test/ alike
    dm = ImageFolderDataModule(str(image_folder_root), image_size=16, batch_size=4)
    with pytest.warns(UserWarning, match=r"not laid out as train/ \(.*holds no class folders"):
        assert files(dm.predict_dataloader(), dm)[0] == "val/cat/0.png"

    shutil.rmtree(image_folder_root / "test")
    dm = ImageFolderDataModule(str(image_folder_root), image_size=16, batch_size=4)
    with caplog.at_level(logging.INFO):
        val_files = files(dm.test_dataloader(), dm)
        assert files(dm.predict_dataloader(), dm) == val_files
    assert val_files == [f"val/{name}/{i}.{'jpg' if i % 2 else 'png'}" for name in ("cat", "dog") for i in range(2)]
    said = [r.getMessage() for r in caplog.records if "test and predict read the val split" in r.getMessage()]
    assert len(said) == 1 and str(image_folder_root / "val") in said[0]


def test_image_folder_train_samples_without_augmentation_read_the_same_every_time(image_folder_root: Path) -> None:
    """`train_samples(augment=False)` (what ProtoPNet's push reads) gives the training images unflipped, normalised as
    the loaders' samples, on every read; `train_samples()` keeps the random flips of `augment=True`."""
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    plain = ImageFolderDataModule(str(image_folder_root), image_size=24, mean=mean, std=std)
    augmented = ImageFolderDataModule(str(image_folder_root), image_size=24, augment=True, mean=mean, std=std)
    expected = torch.stack([sample["image"] for sample in plain.split_samples("train")])  # (N, 3, 24, 24)
    torch.manual_seed(0)
    for _ in range(4):
        read = torch.stack([sample["image"] for sample in augmented.train_samples(augment=False)])
        assert torch.equal(read, expected)
    flipped = [torch.equal(augmented.train_samples()[0]["image"], expected[0].flip(-1)) for _ in range(16)]
    assert any(flipped) and not all(flipped)
    assert torch.equal(plain.train_samples(augment=False)[0]["image"], expected[0])  # no augmentation: the split


def test_image_folder_errors_name_the_layout(image_folder_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"root '.*nowhere' does not exist(.|\n)*train/<class name>"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    shutil.rmtree(image_folder_root / "val")
    with pytest.raises(DatasetLayoutError, match=r"split folder '.*val' does not exist"):
        ImageFolderDataModule(str(image_folder_root))
    (image_folder_root / "val").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds no class folders with images"):
        ImageFolderDataModule(str(image_folder_root))


def test_truncated_image_names_the_file(image_folder_root: Path, cub_root: Path) -> None:
    """A truncated image was a plain ValueError: train.py printed a traceback, in the first epoch, after the move of
    an earlier run to stale/. It is a DatasetLayoutError (said in one line), naming the file, from a loader worker
    too (which builds the error again from its message), and from the CUB and VOC readers (`read_rgb`)."""
    from zoo.cli.errors import is_configuration_error

    victim = image_folder_root / "train" / "cat" / "0.png"
    victim.write_bytes(victim.read_bytes()[:60])
    dm = ImageFolderDataModule(str(image_folder_root))
    dm.setup()
    with pytest.raises(DatasetLayoutError, match=r"Cannot read image '.*cat/0.png': .*truncated.*\. Replace or "
                                                 r"remove the file\.") as caught:
        next(iter(dm.train_dataloader()))
    assert is_configuration_error(caught.value) and "Expected layout" not in str(caught.value)
    dm.num_workers = 1
    with pytest.raises(DatasetLayoutError, match=r"Cannot read image '.*cat/0.png'"):
        next(iter(dm.train_dataloader()))
    bird = next((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    bird.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetLayoutError, match=rf"Cannot read image '.*{bird.name}': cannot identify image file"):
        read_rgb(bird)


def test_image_folder_with_one_class_is_refused_naming_the_folder(image_folder_root: Path) -> None:
    """One class folder reached the model, and torchmetrics refused it ("num_classes ... larger than 1"), naming
    neither the folder nor the cause."""
    for split in ("train", "val"):
        shutil.rmtree(image_folder_root / split / "dog")
    with pytest.raises(DatasetLayoutError, match=r"split folder '.*imagefolder/train' holds one class folder "
                                                 r"\(\['cat'\]\); classification needs two or more"):
        ImageFolderDataModule(str(image_folder_root))


@pytest.mark.parametrize("image_size", [0, -8, 2.5, None])
def test_image_size_below_one_pixel_is_refused_when_built(image_folder_root: Path, cub_root: Path, voc_root: Path,
                                                          image_size: object) -> None:
    """ImageFolder, CUB and VOC stored any image_size; 0 failed in PIL's resize inside the first epoch, after the
    move of an earlier run to stale/ (PartsWorld, Digits and IDX check theirs)."""
    message = rf"image_size must be a whole number of pixels >= 1; got {image_size!r}\."
    with pytest.raises(ValueError, match=rf"ImageFolderDataModule: {message}"):
        ImageFolderDataModule(str(image_folder_root), image_size=image_size)
    with pytest.raises(ValueError, match=rf"CUB200DataModule: {message}"):
        CUB200DataModule(str(cub_root), image_size=image_size)
    with pytest.raises(ValueError, match=rf"VOCDataModule: {message}"):
        VOCDataModule(str(voc_root), image_size=image_size)


def test_cub_caption_vocabulary_without_room_for_a_word_is_refused(cub_root: Path) -> None:
    """max_vocab <= 4 kept <pad>, <bos>, <eos> and <unk> alone: every caption word read as <unk>."""
    with pytest.raises(DataSettingError, match=r"CUB200DataModule: max_vocab must be a whole number >= 5 \(<pad>, "
                                               r"<bos>, <eos>, <unk> and at least one word\); got 4\."):
        CUB200DataModule(str(cub_root), max_vocab=4)


SYNTHETIC = {  # each synthetic datamodule, and whether its test split may be empty (setup generates it all the same)
    datamodule.__name__: (datamodule, test_optional) for datamodule, test_optional in (
        (PartsWorldDataModule, False), (PartsWorldScenesDataModule, False), (RuleSeriesDataModule, True),
        (L2XSyntheticDataModule, True), (SyntheticSentimentDataModule, True))}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_split_sizes_are_checked_when_built(name: str) -> None:
    """num_train=0 (or num_val=0, or a negative size) failed only at setup, with an IndexError or torch.arange's
    "upper bound and lower bound inconsistent" traceback, after `train.py fit` moved an earlier run to stale/ (and
    after earlier ablate points trained). num_test may be 0 where an empty test split generates (fit never reads
    it); PartsWorld's renderers cannot draw none."""
    datamodule, test_optional = SYNTHETIC[name]
    sizes = {"num_train": 8, "num_val": 4, "num_test": 4}
    for setting, value in (("num_train", 0), ("num_val", 0), ("num_train", -5), ("num_val", 2.5), ("num_test", -1),
                           ("num_test", None)):
        minimum = 0 if setting == "num_test" and test_optional else 1
        with pytest.raises(DataSettingError, match=rf"^{name}: {setting} \(the samples generated for the "
                                                   rf"'{setting[4:]}' split.*\) must be a whole number >= "
                                                   rf"{minimum}; got {value!r}\.$"):
            datamodule(**sizes | {setting: value})
    if test_optional:
        datamodule(**sizes | {"num_test": 0})
    else:
        with pytest.raises(DataSettingError, match=r"num_test \(.*setup generates the test split too\).* >= 1; got 0"):
            datamodule(**sizes | {"num_test": 0})


def test_cub_reads_labels_boxes_and_landmarks(cub_root: Path) -> None:
    dm = CUB200DataModule(str(cub_root), image_size=30)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.splits["train"]) == 5 and len(dm.splits["test"]) == 3
    sample = dm.splits["train"][0]  # images.txt line 1: id 3, class 1, 60x40 image, box (10, 5, 40, 30)
    assert sample["image"].shape == (3, 30, 30) and sample["label"] == 0
    sx, sy = 30 / 60, 30 / 40
    assert torch.allclose(sample["object_box"], torch.tensor([10 * sx, 5 * sy, 50 * sx, 35 * sy]))
    visible = torch.tensor([(p + 3) % 3 != 0 for p in range(1, 16)])
    assert torch.equal(sample["landmark_visible"], visible)
    part = torch.arange(1, 16, dtype=torch.float32)
    expected = torch.stack([(12 + part) * sx, (6 + part) * sy], -1) * visible[:, None]
    assert torch.allclose(sample["landmarks"], expected)


CUB_CONFIGS = sorted(path for path in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                     if "datamodules.CUB200DataModule" in path.read_text())


def test_cub_configs_validating_on_the_test_split_choose_no_checkpoint_by_it() -> None:
    """With val_fraction 0 (the papers' protocol) validation is the release's test split; the CUB configs kept
    `checkpoint.monitor: val/acc`, so their "best" checkpoint was picked on test images. As VOC's config: no monitor,
    the last epoch's checkpoint. Parsed as `fit` parses them (no data needed), compare_cub200's runs too."""
    from zoo.cli.compare import _fit_args, read_compare_spec
    from zoo.cli.lightning import ParsedCLI

    repo = Path(__file__).resolve().parents[1]
    assert {"configs/baselines/cub200.yaml", "configs/icnn/cub200.yaml", "configs/protopnet/cub200.yaml"} <= {
        path.relative_to(repo).as_posix() for path in CUB_CONFIGS}
    spec = repo / "configs/icnn/compare_cub200.yaml"
    parsed = {path.relative_to(repo).as_posix(): ParsedCLI(args=["--config", str(path)], run=False).config
              for path in CUB_CONFIGS}
    parsed |= {f"compare_cub200 {name}": ParsedCLI(args=_fit_args(name, run, spec, [], []), run=False).config
               for name, run in read_compare_spec(spec)["runs"].items()}
    for name, config in parsed.items():
        if config.data.init_args.val_fraction == 0:  # validation is the test split
            assert config.checkpoint.monitor is None, name
            assert config.checkpoint.filename == "epoch{epoch}-step{step}", name  # not named best-*


def test_cub_crop_to_box_moves_landmarks_into_the_crop(cub_root: Path) -> None:
    dm = CUB200DataModule(str(cub_root / "CUB_200_2011"), image_size=20, crop_to_box=True)
    dm.setup()
    sample = dm.splits["train"][0]
    assert torch.allclose(sample["object_box"], torch.tensor([0.0, 0.0, 20.0, 20.0]))
    assert torch.allclose(sample["landmarks"][0], torch.tensor([(13 - 10) * 20 / 40, (7 - 5) * 20 / 30]))


def test_cub_errors_name_the_file_and_layout(cub_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"No CUB-200-2011 images.txt(.|\n)*part_locs.txt"):
        CUB200DataModule(str(tmp_path / "empty"))
    base = cub_root / "CUB_200_2011"
    with open(base / "bounding_boxes.txt", "a") as f:
        f.write("9 1.0 2.0\n")
    with pytest.raises(DatasetLayoutError, match=r"bounding_boxes.txt:9: expected 5 fields, got 3"):
        CUB200DataModule(str(cub_root))
    (base / "parts" / "part_locs.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"lacks \['parts/part_locs.txt'\]"):
        CUB200DataModule(str(cub_root))


# ------------------------------------------------------------------------------------- defects of the real loaders
def test_read_rgb_scales_16_bit_and_float_grey_instead_of_clipping(tmp_path: Path) -> None:
    """A 16-bit grey PNG (PIL mode "I;16", "I" on older Pillows) is scaled 65535 -> 255, not clipped to white;
    float grey in [0, 1] is scaled by 255; values outside a mode's range raise, naming the file."""
    grey16 = np.array([[0, 100 * 257, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode in ("I;16", "I")
    assert np.asarray(read_rgb(tmp_path / "grey16.png"))[..., 0].tolist() == [[0, 100, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert np.asarray(read_rgb(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0, 100 * 257]], dtype=np.int32)).save(tmp_path / "int32.tif")
    assert np.asarray(read_rgb(tmp_path / "int32.tif"))[0, :, 1].tolist() == [0, 100]  # mode "I" as 16-bit
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"Cannot read image '.*wide.tif': mode 'I' pixel values span \[0, 70000\]"):
        read_rgb(tmp_path / "wide.tif")


def test_image_folder_skips_hidden_folders_and_files(image_folder_root: Path) -> None:
    """Jupyter's .ipynb_checkpoints/ (with an image, or empty) and macOS's ._<image> files are no classes or
    samples, as in torchvision users' expectations."""
    write_image(image_folder_root / "train" / ".ipynb_checkpoints" / "0-checkpoint.png", (40, 30), seed=7)
    (image_folder_root / "val" / ".ipynb_checkpoints").mkdir()
    (image_folder_root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_image(image_folder_root / "train" / "dog" / ".hidden" / "9.png", (40, 30), seed=9)
    dm = ImageFolderDataModule(str(image_folder_root), image_size=16)
    assert dm.classes == ["cat", "dog"] and len(dm.folders["train"].samples) == 6
    dm.setup()
    assert len(next(iter(dm.train_dataloader()))["label"]) == 6
    shutil.rmtree(image_folder_root / "val" / "cat"), shutil.rmtree(image_folder_root / "val" / "dog")
    with pytest.raises(DatasetLayoutError, match="holds no class folders with images"):
        ImageFolderDataModule(str(image_folder_root))  # val holds only a hidden folder


def rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def test_cub_malformed_index_lines_name_the_file_and_line(cub_root: Path) -> None:
    base = cub_root / "CUB_200_2011"
    rewrite(base / "images.txt", "2 ", "2x ")  # line 3 holds id 2
    with pytest.raises(DatasetLayoutError, match=r"images.txt:3: expected '<image_id> <path>' with an integer id, "
                                                 r"got '2x 003.Sooty"):
        CUB200DataModule(str(cub_root))
    rewrite(base / "images.txt", "2x ", "2 ")
    rewrite(base / "bounding_boxes.txt", "1 10.0", "1 nan")  # line 2 holds id 1
    with pytest.raises(DatasetLayoutError, match=r"bounding_boxes.txt:2: expected 5 fields of an integer id, then "
                                                 r"finite numbers, got '1 nan"):
        CUB200DataModule(str(cub_root))


def test_cub_attribute_file_errors_name_the_file_and_line(cub_root: Path) -> None:
    attributes = cub_root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    attributes.parent.mkdir()
    attributes.write_text("")
    with pytest.raises(DatasetLayoutError, match="image_attribute_labels.txt' lists no attribute labels"):
        CUB200DataModule(str(cub_root), attributes=True)
    attributes.write_text("3 1 1 3 1.5\n3 2 1 3 2.0 extra\n1 1 yes 3 1.0\n")  # extra fields: the release's defect
    with pytest.raises(DatasetLayoutError, match=r"image_attribute_labels.txt:3: expected 4 fields of integers, "
                                                 r"got '1 1 yes 3 1.0'"):
        CUB200DataModule(str(cub_root), attributes=True)


def test_cub_zero_size_box_with_crop_to_box_names_the_image(cub_root: Path) -> None:
    base = cub_root / "CUB_200_2011"
    rewrite(base / "bounding_boxes.txt", "4 10.0 5.0 40.0 30.0", "4 10.0 5.0 0.0 30.0")
    CUB200DataModule(str(cub_root), image_size=20)  # without cropping, a zero-size box does no harm
    with pytest.raises(DatasetLayoutError, match=r"bounding_boxes.txt: image ids \[4\] have a box of zero width"):
        CUB200DataModule(str(cub_root), image_size=20, crop_to_box=True)


def test_empty_training_split_is_named_with_its_cause(cub_root: Path, imdb_root: Path) -> None:
    """Before the loaders' sampler fails with "num_samples=0": the split, where its samples come from, the sizes."""
    split_file = cub_root / "CUB_200_2011" / "train_test_split.txt"
    split_file.write_text(split_file.read_text().replace(" 1\n", " 0\n"))
    dm = CUB200DataModule(str(cub_root), image_size=20)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"CUB200DataModule: the 'train' split has no samples; it holds the images "
                                         r"train_test_split.txt marks is_training_image=1. Split sizes: "
                                         r"\{'train': 0, 'val': 8, 'test': 8\}"):
        dm.train_dataloader()
    assert len(next(iter(dm.test_dataloader()))["label"]) == 8  # a test-only run still works
    with pytest.raises(ValueError, match=r"the 'train' split has no samples; it holds the reviews of "
                                         r"'.*train' left after val_fraction=1.0"):
        IMDBDataModule(imdb_root, max_len=8, max_vocab=30, val_fraction=1.0).train_dataloader()


def test_voc2012_defaults_to_its_released_splits(voc_root: Path) -> None:
    """VOC2012 has no test list: by default it trains on train and validates and tests on val; 2007 keeps
    trainval / test."""
    base = voc_root / "VOC2012"
    shutil.copytree(voc_root / "VOC2007", base)
    (base / "ImageSets" / "Main" / "test.txt").unlink()
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n000009\n")
    dm = VOCDataModule(str(voc_root), year="2012", flip=False)
    dm.setup()
    assert dm.split_names == {"train": "train", "val": "val", "test": "val"}
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    (voc_root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n000009\n")
    assert VOCDataModule(str(voc_root)).split_names == {"train": "trainval", "val": "test", "test": "test"}
    assert VOCDataModule(str(voc_root), year="2012", val_split="trainval").split_names["val"] == "trainval"


def test_voc_year_and_class_lists_read_what_they_name(voc_root: Path) -> None:
    """A VOC<year> folder given as root with another `year` is refused (it silently read VOC2007 with VOC2012's
    protocol); a devkit class list (`<class>_<set>.txt`, "<id> 1 | 0 | -1") keeps the images without -1 (it kept the
    negatives too)."""
    with pytest.raises(DatasetLayoutError, match=r"is VOC2007, but year='2012' asks for VOC2012"):
        VOCDataModule(str(voc_root / "VOC2007"), year="2012")
    main = voc_root / "VOC2007" / "ImageSets" / "Main"
    (main / "person_trainval.txt").write_text("000005  1\n000007 -1\n000009  0\n")
    dm = VOCDataModule(str(voc_root), train_split="person_trainval", val_split="val", test_split="val", flip=False)
    dm.setup()
    assert len(dm.splits["train"]) == 2  # 000005 (a person) and 000009 (only difficult ones), not 000007


def test_cub_subsets_and_parts_outside_the_crop(cub_root: Path) -> None:
    """images.txt decides which images there are: trimming it to a subset works (the other tables were refused for
    listing more ids); an image it lists that is missing on disk is said at once, naming it; a part clicked outside
    the bird's box is not visible in the cropped image (it stayed visible at coordinates outside the image)."""
    base = cub_root / "CUB_200_2011"
    lines = (base / "images.txt").read_text().splitlines()
    (base / "images.txt").write_text("\n".join(lines[:4]) + "\n")
    dm = CUB200DataModule(str(cub_root), image_size=20)
    dm.setup()
    assert sum(len(dm.splits[s]) for s in ("train", "test")) == 4
    (base / "images" / lines[0].split()[1]).unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of the 4 images listed in .*images.txt are missing, e.g."):
        CUB200DataModule(str(cub_root))
    (base / "images.txt").write_text("\n".join(lines[1:]) + "\n")
    locs = (base / "parts" / "part_locs.txt").read_text().splitlines()
    first = lines[1].split()[0]  # image 1: its tail (part 14) moved outside the box (10, 5, 40, 30), visible
    locs = [f"{first} 14 55.0 38.0 1" if line.startswith(f"{first} 14 ") else line for line in locs]
    (base / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    dm = CUB200DataModule(str(cub_root), image_size=20, crop_to_box=True)
    dm.setup()
    dataset = dm.splits["train"]
    sample = next(dataset[i] for i in range(len(dataset)) if int(dataset[i]["index"]) == 0)  # images.txt row 0
    assert not sample["landmark_visible"][13] and torch.equal(sample["landmarks"][13], torch.zeros(2))
    inside = sample["landmarks"][sample["landmark_visible"]]
    assert ((inside >= 0) & (inside <= 20)).all()


def test_voc_broken_annotations_are_layout_errors_naming_the_file(voc_root: Path) -> None:
    annotation = voc_root / "VOC2007" / "Annotations" / "000007.xml"
    annotation.write_text("<annotation><object><name>car")
    splits = dict(train_split="train", val_split="val", test_split="val")
    with pytest.raises(DatasetLayoutError, match=r"000007.xml' is not valid XML(.|\n)*Expected layout"):
        VOCDataModule(str(voc_root), **splits).setup()
    annotation.write_text(voc_annotation("000007", [("unicorn", (1, 1, 5, 5), 0)]))
    with pytest.raises(DatasetLayoutError, match=r"000007.xml: object 0 has class 'unicorn', not one of the 20"):
        VOCDataModule(str(voc_root), **splits).setup()
    annotation.write_text(voc_annotation("000007", [("car", (5, 5, 3, 9), 0)]))
    with pytest.raises(DatasetLayoutError, match=r"000007.xml: object 0 \(car\) has an empty box"):
        VOCDataModule(str(voc_root), **splits).setup()


def test_series_file_arrays_are_checked_against_the_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    series = rng.normal(size=(6, 16))
    np.savez(tmp_path / "strings.npz", series=series, label=np.array(["a", "b"] * 3))
    with pytest.raises(DatasetLayoutError, match=r"array 'label' is \(6,\) <U1; expected \(N,\) int in \[0, 2\)"):
        SeriesFileDataModule(tmp_path / "strings.npz", num_classes=2)
    np.savez(tmp_path / "short.npz", series=series, label=np.zeros(6, int), patterns=rng.random((5, 2, 16)))
    with pytest.raises(DatasetLayoutError, match=r"series \(6, 16\) and patterns \(5, 2, 16\) do not match; "
                                                 r"expected patterns \(N, K, T\) in \[0, 1\] with the series' N and T"):
        SeriesFileDataModule(tmp_path / "short.npz", num_classes=2)
    np.savez(tmp_path / "flat.npz", series=series, label=np.zeros(6, int), patterns=rng.random((6, 16)))
    with pytest.raises(DatasetLayoutError, match=r"array 'patterns' is \(6, 16\) float64; expected \(N, K, T\)"):
        SeriesFileDataModule(tmp_path / "flat.npz", num_classes=2)
    np.savez(tmp_path / "scaled.npz", series=series, label=np.zeros(6, int), patterns=2 * np.ones((6, 1, 16)))
    with pytest.raises(DatasetLayoutError, match=r"array 'patterns' spans \[2, 2\]; expected \(N, K, T\) in \[0, 1\]"):
        SeriesFileDataModule(tmp_path / "scaled.npz", num_classes=2)
    np.savez(tmp_path / "two.npz", series=series[:2], label=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"SeriesFileDataModule: the 'train' split has no samples; it holds the rows "
                                         r"of '.*two.npz' \(2\) left after val_fraction=0.15 and test_fraction=0.15"):
        SeriesFileDataModule(tmp_path / "two.npz", num_classes=2).train_dataloader()


@pytest.mark.parametrize(("num_train", "devices", "distributed_sampler", "sizes"), [
    (257, 1, True, [256]),  # 256 + 1: the batch of one (BatchNorm cannot train on it) is dropped
    (258, 1, True, [256, 2]),  # any other remainder is kept
    (200, 1, True, [200]),  # a split smaller than a batch is never emptied
    (514, 2, True, [256]),  # Lightning's DistributedSampler gives each rank 257: 256 + 1
    (515, 2, True, [256, 2]),  # 258 per rank
    (514, 2, False, [256, 256, 2]),  # no injected sampler: each rank iterates the 514 samples as built
])
def test_train_loader_drops_only_a_last_batch_of_one_sample_per_rank(num_train: int, devices: int,
                                                                     distributed_sampler: bool, sizes: list[int]
                                                                     ) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    from datamodules import L2XSyntheticDataModule

    dm = L2XSyntheticDataModule(dataset="xor", num_train=num_train, num_val=8, num_test=8, batch_size=256)
    if devices > 1:  # built, not launched: what the datamodule sees of a 2-process DDP run
        dm.trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp", logger=False,
                                use_distributed_sampler=distributed_sampler, enable_progress_bar=False)
    loader = dm.train_dataloader()
    if devices > 1 and distributed_sampler:  # the sampler Lightning injects; it keeps the loader's drop_last
        loader = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=devices, rank=devices - 1))
    assert [len(batch["features"]) for batch in loader] == sizes
    # evaluation loaders drop nothing: all 8 samples, or under DDP this rank's 4 (the other rank's 4 are its own)
    assert [len(batch["features"]) for batch in dm.val_dataloader()] == [8 // devices if distributed_sampler else 8]


def test_series_training_loader_drops_a_last_batch_of_one() -> None:
    """The series datamodules build their own training loader (an epoch of `epoch_samples` drawn samples): the same
    rule, so a BatchNorm model never trains on a batch of one."""
    from datamodules import RuleSeriesDataModule

    data = RuleSeriesDataModule(num_train=33, num_val=8, batch_size=16)
    data.setup("fit")
    assert [len(batch["label"]) for batch in data.train_dataloader()] == [16, 16]
    data = RuleSeriesDataModule(num_train=34, num_val=8, batch_size=16)
    data.setup("fit")
    assert [len(batch["label"]) for batch in data.train_dataloader()] == [16, 16, 2]


@pytest.mark.parametrize("rank", [0, 1])
def test_evaluation_shards_under_ddp_hold_every_sample_once(rank: int) -> None:
    """Two processes: rank r evaluates samples r, r + 2, ..., none repeated (Lightning's injected sampler padded the
    shards with repeats); a split smaller than the world falls back to the padded sampler, with a warning."""
    from types import SimpleNamespace

    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(num_train=8, num_val=5, num_test=1, batch_size=4, image_size=32)
    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}, global_rank=rank,
                                   _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    data.setup("fit")
    indices = [int(i) for batch in data.val_dataloader() for i in batch["index"]]
    assert indices == list(range(rank, 5, 2))
    data.setup("test")
    with pytest.warns(UserWarning, match="holds 1 samples for 2 processes"):
        loader = data.test_dataloader()
    assert not isinstance(loader.sampler, torch.utils.data.DistributedSampler)  # Lightning injects its own


# ------------------------------------------------------------------------------------ loaders resumed mid-epoch
@pytest.mark.parametrize("replacement, num_samples", [(False, None), (True, 70)])
def test_resumable_sampler_draws_as_random_sampler_and_resumes_part_way(replacement: bool,
                                                                       num_samples: int | None) -> None:
    """The same shuffles as torch's RandomSampler from the same global stream (runs that never resume are
    unchanged), and `resume(seed, start)` replays the tail of an epoch (ReNN's loader samples with replacement)."""
    from torch.utils.data import RandomSampler

    from datamodules.resumable import ResumableRandomSampler

    data = list(range(50))
    torch.manual_seed(3)
    theirs = [list(RandomSampler(data, replacement=replacement, num_samples=num_samples)) for _ in range(2)]
    torch.manual_seed(3)
    sampler = ResumableRandomSampler(data, replacement=replacement, num_samples=num_samples)
    ours, seeds = [], []
    for _ in range(2):
        ours.append(list(sampler))
        seeds.append(sampler.seed)
    assert ours == theirs
    state = torch.get_rng_state()
    sampler.resume(seeds[0], 17)
    assert list(sampler) == theirs[0][17:]
    assert torch.equal(torch.get_rng_state(), state)  # a resumed epoch draws nothing from the run's stream


def test_resumable_loader_state_round_trip_and_a_sampler_that_cannot_resume() -> None:
    """state_dict() holds the epoch's seed and the samples trained on; a fresh loader given it continues there; one
    written at an epoch's end starts the next anew; a distributed sampler in its place warns."""
    from torch.utils.data import DistributedSampler

    from datamodules.resumable import ResumableDataLoader, ResumableRandomSampler

    data = torch.arange(40)
    progress = [(3, 5)]
    loader = ResumableDataLoader(data, batch_size=8, sampler=ResumableRandomSampler(data),
                                 epoch_progress=lambda *length: progress[0])
    epoch = [batch.tolist() for batch in loader]
    state = loader.state_dict()
    assert state["samples"] == 24 and not state["finished"] and state["seed"] is not None
    again = ResumableDataLoader(data, batch_size=8, sampler=ResumableRandomSampler(data))
    again.load_state_dict(state)
    assert [batch.tolist() for batch in again] == epoch[3:]
    assert len([batch for batch in again]) == 5  # the next epoch is whole
    done = ResumableDataLoader(data, batch_size=8, sampler=ResumableRandomSampler(data))
    done.load_state_dict({**state, "finished": True})
    assert len(list(done)) == 5
    shard = ResumableDataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.warns(UserWarning, match="cannot resume it"):
        shard.load_state_dict({**state, "seed": None})
