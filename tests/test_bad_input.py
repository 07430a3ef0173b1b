"""Bad input gets a clear error naming what is wrong, raised before torch fails deep inside: wrong shapes and
dtypes for every registered model, NaN inputs in every System, missing / empty / malformed dataset folders and
files for every datamodule that reads disk, labels out of range, unknown names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from datamodules import (CUB200DataModule, DatasetLayoutError, IMDBDataModule, ImageFolderDataModule,
                         SeriesFileDataModule)
from tests.test_registry import DETECTOR_MODELS, SMALL_MODEL_INPUTS, TEXTUAL_MODELS


def example_input(name: str) -> torch.Tensor:
    return SMALL_MODEL_INPUTS[name]() if name in SMALL_MODEL_INPUTS else torch.rand(2, 3, 64, 64)


@pytest.mark.parametrize("name", [n for n in zoo.list_models() if n not in DETECTOR_MODELS + TEXTUAL_MODELS])
def test_every_model_names_a_wrong_dtype_or_rank(name: str) -> None:
    model = zoo.create_model(name, num_classes=3)
    x = example_input(name)
    wrong_dtype = x.float() if x.dtype == torch.long else (x * 255).to(torch.uint8)
    with pytest.raises(ValueError, match="expects"):
        model(wrong_dtype)
    with pytest.raises(ValueError, match="expects"):
        model(x[0])  # the batch dimension forgotten
    if x.is_floating_point():  # float64 into a float32 model: named, not a dtype error deep in a layer
        with pytest.raises(ValueError, match="of dtype torch.float32 \\(its parameters'\\); got torch.float64"):
            model(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()(x.half())  # autocast casts any float input but float64
        model.double()(x.double())  # a float64 model takes float64 inputs


@pytest.mark.parametrize("system", ["classification", "staged", "selector", "textual"])
def test_nan_inputs_name_the_samples(system: str) -> None:
    from zoo.baselines.system import ClassifierSystem
    from zoo.l2x.system import L2XSystem
    from zoo.renn.system import ReNNSystem

    if system == "classification":
        module, key, x = ClassifierSystem(num_classes=3), "image", torch.rand(4, 3, 32, 32)
    elif system == "staged":
        module, key = ReNNSystem(model_name="renn_series", in_chans=None, input_key="series"), "series"
        x = torch.randn(4, 1, 128)
    elif system == "textual":
        from zoo.textual.system import TextualSystem

        module, key, x = TextualSystem(variant="explanation-label", hidden=16), "image", torch.rand(4, 3, 32, 32)
    else:
        module, key, x = L2XSystem(data_inputs={"num_features": 10}, model_kwargs={"k": 2}), "features", \
            torch.randn(4, 10)
    x[2].view(-1)[0] = float("nan")
    batch = {key: x, "label": torch.zeros(4, dtype=torch.long), "index": torch.tensor([10, 11, 12, 13]),
             "captions": torch.ones(4, 3, 5, dtype=torch.long)}  # (B, R, L) token ids, read by the textual System
    with pytest.raises(ValueError, match=rf"{key}' holds NaN or inf values \(dataset indices \[12\]\)"):
        module.training_step(batch, 0)


def test_nan_detection_images_name_the_samples() -> None:
    from zoo.aog_rcnn.system import AOGRCNNSystem

    module = AOGRCNNSystem(num_classes=3, image_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(3)]
    images[1][0, 3, 3] = float("nan")
    targets = [{"boxes": torch.tensor([[8.0, 10, 40, 44]]), "labels": torch.tensor([1]), "index": torch.tensor(i)}
               for i in (20, 21, 22)]
    for stage_step in (module.training_step, module.validation_step):
        with pytest.raises(ValueError, match=r"'images' holds NaN or inf values \(dataset indices \[21\]\)"):
            stage_step({"images": images, "targets": targets}, 0)
    images[1][0, 3, 3] = float("inf")
    unindexed = [{k: t[k] for k in ("boxes", "labels")} for t in targets]
    with pytest.raises(ValueError, match=r"'images' holds NaN or inf values \(batch positions \[1\]\)"):
        module.training_step({"images": images, "targets": unindexed}, 0)


def test_folder_datamodules_name_missing_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    for make in (lambda root: ImageFolderDataModule(root=root), lambda root: CUB200DataModule(root=root),
                 lambda root: IMDBDataModule(root=root)):
        for root in (tmp_path / "missing", tmp_path / "empty"):
            with pytest.raises(DatasetLayoutError, match="Expected layout"):
                module = make(root)
                module.setup("fit")


def test_series_files_with_bad_content(tmp_path: Path) -> None:
    (tmp_path / "text.csv").write_text("1,0.5,0.2\nzero,0.1,0.3\n")
    with pytest.raises(DatasetLayoutError, match="Could not read series"):
        SeriesFileDataModule(tmp_path / "text.csv", num_classes=2)
    np.savez(tmp_path / "frac.npz", series=np.zeros((3, 16)), label=np.array([0.0, 0.5, 1.0]))
    with pytest.raises(DatasetLayoutError, match="labels must be integers"):
        SeriesFileDataModule(tmp_path / "frac.npz", num_classes=2)
    np.savez(tmp_path / "nolabel.npz", series=np.zeros((3, 16)))
    with pytest.raises(DatasetLayoutError, match="lacks \\['label'\\]"):
        SeriesFileDataModule(tmp_path / "nolabel.npz", num_classes=2)
    (tmp_path / "s.txt").write_text("1,2")
    with pytest.raises(DatasetLayoutError, match="unsupported suffix"):
        SeriesFileDataModule(tmp_path / "s.txt", num_classes=2)


def test_labels_out_of_range_are_caught_before_the_loss(image_folder_root: Path) -> None:
    from zoo.baselines.system import ClassifierSystem

    module = ClassifierSystem(num_classes=2)
    batch = {"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 5])}
    with pytest.raises(ValueError, match="labels span \\[0, 5\\], outside \\[0, 2\\)"):
        module.training_step(batch, 0)
    # a head of another size than the data's classes: refused as built, naming both (its metrics count 10 classes;
    # a label past the 3-way head, or a 1000-way head on 6 classes, failed at the first batch, the latter inside
    # torchmetrics: "preds.shape[1] should be equal to number of classes")
    for head, data in ((3, 10), (1000, 6)):
        with pytest.raises(ValueError, match=rf"ClassifierSystem: model_kwargs num_classes={head} but "
                                             rf"num_classes={data} \(the data's classes.*Drop num_classes from "
                                             rf"model_kwargs"):
            ClassifierSystem(num_classes=data, model_kwargs={"num_classes": head})
    assert ClassifierSystem(num_classes=6, model_kwargs={"num_classes": 6}).model.num_classes == 6


def test_token_and_class_ids_out_of_range_are_named_before_an_embedding_reads_them() -> None:
    """An id past an embedding's table raised a bare IndexError ("index out of range in self")."""
    from zoo.textual.system import TextualSystem

    with pytest.raises(ValueError, match=r"TokenCNN expects token ids in \[0, 100\); got ids from 0 to 100"):
        zoo.create_model("baseline_textcnn", num_classes=2, vocab_size=100)(torch.tensor([[0, 5, 100]]))
    with pytest.raises(ValueError, match=r"L2X expects token ids in \[0, 100\)"):
        zoo.create_model("l2x_tokens", num_classes=2, vocab_size=100, max_len=4, k=2)(torch.tensor([[1, 2, 3, 100]]))
    generator = zoo.create_model("textual_explanation", num_classes=6, vocab_size=25)
    images, tokens = torch.rand(2, 3, 64, 64), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expects labels in \[0, 6\); got ids from 0 to 7"):
        generator(images, torch.tensor([0, 7]), tokens)
    with pytest.raises(ValueError, match=r"expects labels in \[0, 6\)"):
        generator.explain(images, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"expects token ids in \[0, 25\); got ids from 1 to 30"):
        generator(images, torch.tensor([0, 1]), tokens.index_fill(1, torch.tensor([2]), 30))
    system = TextualSystem(variant="explanation-label", hidden=16)
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 9, 0]),
             "captions": torch.ones(4, 3, 5, dtype=torch.long)}
    for step in (system.training_step, system.validation_step):
        with pytest.raises(ValueError, match="labels span \\[0, 9\\], outside \\[0, 6\\)"):
            step(batch, 0)


def test_degenerate_sizes_and_empty_batches_are_named() -> None:
    """0 classes or channels built a model that failed at its first batch; an empty ICNN batch raised a math domain
    error; a detector's empty image list an IndexError."""
    for key in ("num_classes", "in_chans", "image_size"):
        with pytest.raises(ValueError, match=f"icnn_tinycnn: {key} must be a positive integer; got 0"):
            zoo.create_model("icnn_tinycnn", **{key: 0})
    with pytest.raises(ValueError, match="num_classes must be a positive integer; got 2.5"):
        zoo.create_model("baseline_tinycnn", num_classes=2.5)
    assert zoo.create_model("baseline_tinycnn", num_classes=np.int64(3)).num_classes == 3  # NumPy's ints are ints
    with pytest.raises(ValueError, match="Interpretable filters need at least one image"):
        zoo.create_model("icnn_tinycnn", num_classes=3)(torch.rand(0, 3, 64, 64))
    detector = zoo.create_model("aog_rcnn_tinycnn", num_classes=3)
    with pytest.raises(ValueError, match="empty list of images"):
        detector([])
    with pytest.raises(ValueError, match="1 images and 0 targets"):
        detector.train()([torch.rand(3, 64, 64)], [])


def test_unknown_names_suggest_close_ones() -> None:
    from zoo.renn.model import get_rule

    with pytest.raises(ValueError, match="Did you mean: l2x_vector"):
        zoo.create_model("l2x_vectr")
    with pytest.raises(ValueError, match="Did you mean: icnn_tinycnn"):  # case ignored
        zoo.create_model("ICNN_TinyCNN")
    with pytest.raises(ValueError, match="Did you mean: mobilenet_v2"):
        zoo.create_model("baseline_timm", backbone="torchvision:MobileNet_V2")
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'zzqqx'. torchvision.models.list_models"):
        zoo.create_model("baseline_timm", backbone="torchvision:zzqqx")  # no unrelated names offered
    with pytest.raises(ValueError, match="Did you mean: frequent_premature"):
        get_rule("frequent_prematur")


class UnreadableItems(torch.utils.data.Dataset):
    """Every item an unreadable image, as `datamodules.image_folder.read_rgb` says it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise DatasetLayoutError("Cannot read image 'train/b/3.png': image file is truncated. Replace or remove the "
                                 "file.")


def test_a_data_error_raised_in_a_loader_worker_is_said_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """With num_workers > 0 torch builds the error again from the worker's whole traceback, which the one-line
    configuration error printed in full: the line is the error's own message."""
    from zoo.cli.errors import command_line

    loader = torch.utils.data.DataLoader(UnreadableItems(), num_workers=1)
    with pytest.raises(SystemExit) as exit_info:
        command_line(lambda args: next(iter(loader)))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.splitlines()[0] == (
        "train.py: error: Cannot read image 'train/b/3.png': image file is truncated. Replace or remove the file."), error
    assert "Traceback" not in error.splitlines()[0] and "worker process" not in error, error
