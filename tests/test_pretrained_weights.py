"""Fine-tuning from a pretrained backbone file: a trained model reloads without the file it started from, a frozen
backbone keeps its BatchNorm statistics, another network's file is refused by name, exports carry the input
normalisation, nested checkpoints unwrap, RGB weights adapt to grey images, and the messages say what to do.

The "ImageNet" files are random timm / torchvision state dicts of the right architecture: nothing downloads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import zoo
from zoo import CheckpointError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def save_state(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm resnet18 classifier's state dict (fc included), as an ImageNet file is laid out."""
    torch.manual_seed(0)
    return save_state(timm.create_model("resnet18"), tmp_path_factory.mktemp("weights") / "resnet18.pth")


def system_checkpoint(model: torch.nn.Module, path: Path, model_name: str, model_kwargs: dict, in_chans: int = 3,
                      image_size: int | None = 32, data: dict | None = None) -> Path:
    """What Lightning writes for a zoo System that trained `model` (the keys `zoo.load_checkpoint` reads)."""
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                  "hyper_parameters": {"_class_path": "zoo.baselines.system.ClassifierSystem", "model_name": model_name,
                                       "num_classes": 2, "in_chans": in_chans, "image_size": image_size,
                                       "data_inputs": {}, "model_kwargs": model_kwargs, "class_names": ["cat", "dog"]}}
    if data is not None:
        checkpoint["datamodule_hparams_name"] = "datamodule_hparams"
        checkpoint["datamodule_hyper_parameters"] = data
    torch.save(checkpoint, path)
    return path


# ------------------------------------------------------------------------ 1. no need for the starting-point file
def test_a_fine_tuned_model_reloads_and_exports_without_the_file_it_started_from(resnet18_file: Path,
                                                                                 tmp_path: Path) -> None:
    start = tmp_path / "resnet18.pth"
    start.write_bytes(resnet18_file.read_bytes())
    trained = zoo.create_model("baseline_resnet18", num_classes=2, pretrained_path=str(start))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)  # "fine-tuned": no longer the file's weights
    ckpt = system_checkpoint(trained, tmp_path / "last.ckpt", "baseline_resnet18", {"pretrained_path": str(start)})
    start.rename(tmp_path / "moved.pth")  # the ImageNet file is gone from where the run found it

    loaded = zoo.load_checkpoint(ckpt)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert not loaded.backbone.load_report.read  # built without reading it
    exported = zoo.export_checkpoint(ckpt, tmp_path / "export")
    again = zoo.load_exported(exported)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(CheckpointError, match="does not exist"):  # a model built to train still needs it
        zoo.create_model("baseline_resnet18", num_classes=2, pretrained_path=str(start))


def test_checkpoint_replaces_weights_builds_without_reading_the_pretrained_file(tmp_path: Path,
                                                                                caplog: pytest.LogCaptureFixture
                                                                                ) -> None:
    """What Systems use when a checkpoint's weights follow (load_from_checkpoint, --ckpt_path, compare's
    `checkpoint:`); AOG-RCNN, whose normalisation depends on pretrained_path, is built the same as in training."""
    from zoo.weights import checkpoint_replaces_weights

    gone = str(tmp_path / "gone.pth")
    with checkpoint_replaces_weights(), caplog.at_level(logging.INFO, logger="zoo.weights"):
        model = zoo.create_model("baseline_tinycnn", num_classes=2, pretrained_path=gone)
        detector = zoo.create_model("aog_rcnn_resnet18", num_classes=2, image_size=64, pretrained_path=gone)
    assert not model.backbone.load_report.read and "not read; a checkpoint's weights replace" in caplog.text
    assert list(detector.transform.image_mean) == pytest.approx(IMAGENET_MEAN)  # as trained from ImageNet weights
    with pytest.raises(CheckpointError, match="does not exist"):  # outside the context: read as always
        zoo.create_model("baseline_tinycnn", num_classes=2, pretrained_path=gone)


# ------------------------------------------------------------------------------------ 2. frozen BatchNorm
def test_a_frozen_backbone_keeps_its_batchnorm_statistics_while_the_model_trains() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("baseline_tinycnn", num_classes=3, freeze_backbone=True).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32))["logits"], torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.training and not model.backbone.training
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in before.items())  # buffers bit-identical
    assert not torch.equal(model.head.fc.weight, head_before)  # the head trained
    model.backbone.requires_grad_(True)  # unfrozen (a stage, unfreeze_epoch): BatchNorm trains again
    assert model.train().backbone.training


def test_model_kwargs_freeze_backbone_keeps_the_statistics_in_a_fit(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.baselines.system import ClassifierSystem

    system = ClassifierSystem("baseline_tinycnn", num_classes=4, image_size=32,
                              model_kwargs={"freeze_backbone": True})
    before = {k: v.clone() for k, v in system.model.backbone.state_dict().items()}
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, default_root_dir=tmp_path).fit(
        system, datamodule=PartsWorldDataModule(num_classes=4, image_size=32, num_train=16, num_val=8, batch_size=8))
    changed = [k for k, v in before.items() if not torch.equal(system.model.backbone.state_dict()[k], v)]
    assert changed == []


# ----------------------------------------------------------------------------------- 3. another network's file
def test_weights_of_a_deeper_sibling_are_refused_naming_it(tmp_path: Path) -> None:
    path = save_state(timm.create_model("resnet34"), tmp_path / "resnet34.pth")
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'resnet18': it holds 96 tensors the "
                                              r"architecture has no place for \['layer1.2.conv1.weight'.*"
                                              r"they look like timm 'resnet34' weights"):
        zoo.create_model("baseline_resnet18", num_classes=5, pretrained_path=str(path))


def test_only_tensors_of_the_whole_architecture_are_skipped(resnet18_file: Path, tmp_path: Path) -> None:
    """The classifier (timm's or torchvision's layout), stages after a truncated backbone and a zoo checkpoint's
    head are skipped; a stray tensor beside the backbone's is not."""
    truncated = zoo.Backbone("resnet18", out_indices=(2,), pretrained_path=resnet18_file)  # up to layer2
    assert "layer4.1.bn2.running_var" in truncated.load_report.skipped and "fc.weight" in truncated.load_report.skipped
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])  # vgg11().features, fast
    tv_layout = {f"features.{k}": v for k, v in features.state_dict().items()}
    tv_layout |= {f"classifier.{i}.{p}": torch.zeros(1) for i in (0, 3, 6) for p in ("weight", "bias")}  # not timm's
    torch.save(tv_layout, tmp_path / "vgg11_torchvision.pth")
    tv = zoo.create_model("baseline_vgg11", num_classes=3, pretrained_path=str(tmp_path / "vgg11_torchvision.pth"))
    assert tv.backbone.load_report.skipped == [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    stray = {**torch.load(resnet18_file, weights_only=True), "layer2.0.extra.weight": torch.zeros(3)}
    torch.save(stray, tmp_path / "stray.pth")
    with pytest.raises(CheckpointError, match=r"1 tensors the architecture has no place for \['layer2.0.extra"):
        zoo.create_model("baseline_resnet18", pretrained_path=str(tmp_path / "stray.pth"))
    tiny = zoo.create_model("baseline_tinycnn", num_classes=3)
    ckpt = system_checkpoint(tiny, tmp_path / "tiny.ckpt", "baseline_tinycnn", {})
    assert zoo.create_model("baseline_tinycnn", pretrained_path=str(ckpt)).backbone.load_report.skipped == [
        "model.head.fc.weight", "model.head.fc.bias"]


# ------------------------------------------------------------------------------------ 4. export normalisation
@pytest.mark.parametrize("data, in_chans, mean, std", [
    ({"mean": "pretrained", "std": None, "image_size": 32}, 3, IMAGENET_MEAN, IMAGENET_STD),
    ({"mean": "pretrained", "std": None, "image_size": 32}, 1, [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]),
    ({"mean": [0.5], "std": [0.25], "image_size": 32}, 3, [0.5] * 3, [0.25] * 3),
    ({"mean": None, "std": None, "image_size": 32}, 3, [0.0] * 3, [1.0] * 3),
])
def test_checkpoints_and_exports_carry_the_training_normalisation(data: dict, in_chans: int, mean: list[float],
                                                                  std: list[float], tmp_path: Path) -> None:
    from timm.data import resolve_data_config

    model = zoo.create_model("baseline_resnet18", num_classes=2, in_chans=in_chans)
    ckpt = system_checkpoint(model, tmp_path / "last.ckpt", "baseline_resnet18", {}, in_chans=in_chans, data=data)
    exported = zoo.export_checkpoint(ckpt, tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["pretrained_cfg"]["mean"] == pytest.approx(mean)
    for loaded in (zoo.load_checkpoint(ckpt), zoo.load_exported(exported)):
        config = resolve_data_config({}, model=loaded)
        assert config["mean"] == pytest.approx(mean) and config["std"] == pytest.approx(std)
        assert config["input_size"] == (in_chans, 32, 32) and config["crop_pct"] == 1.0  # whole images, resized
        assert config["interpolation"] == "bilinear"  # as the datamodules resize (timm's default: bicubic)


# --------------------------------------------------------------------------------------- 5. nested wrappers
def test_a_detector_checkpoint_gives_its_backbone_to_another_detector(tmp_path: Path) -> None:
    torch.manual_seed(3)
    detector = zoo.create_model("aog_rcnn_resnet18", num_classes=3, image_size=64)  # model.backbone.body.body.*
    ckpt = system_checkpoint(detector, tmp_path / "aog.ckpt", "aog_rcnn_resnet18", {})
    again = zoo.create_model("aog_rcnn_resnet18", num_classes=5, image_size=64, pretrained_path=str(ckpt))
    body = detector.backbone.body.body.state_dict()
    assert all(torch.equal(again.backbone.body.body.state_dict()[k], v) for k, v in body.items())
    assert len(again.backbone.body.load_report.loaded) == len(body)
    with pytest.raises(CheckpointError, match=r"30 missing keys \['layer4.0.conv1.weight'.*found under "
                                              r"'model.backbone.body.body.'"):  # the detector's backbone stops early
        zoo.create_model("baseline_resnet18", pretrained_path=str(ckpt))


def test_two_copies_of_the_backbone_are_ambiguous(tmp_path: Path) -> None:
    tiny = zoo.create_model("baseline_tinycnn").state_dict()
    torch.save({**{f"black_box.{k}": v for k, v in tiny.items()}, **{f"evaluator.{k}": v for k, v in tiny.items()}},
               tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"holds backbone 'tinycnn' 2 times, under \['black_box.backbone.body.', "
                                              r"'evaluator.backbone.body.'\]"):
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "two.pth"))


# ------------------------------------------------------------------------------------------ 6. grey images
def test_rgb_weights_adapt_to_grey_images_and_say_so(resnet18_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    from timm.models import adapt_input_conv

    rgb = torch.load(resnet18_file, weights_only=True)["conv1.weight"]  # (64, 3, 7, 7)
    with caplog.at_level(logging.INFO, logger="zoo.weights"):
        grey = zoo.create_model("baseline_resnet18", num_classes=2, in_chans=1, pretrained_path=str(resnet18_file))
    torch.testing.assert_close(grey.backbone.body.conv1.weight, adapt_input_conv(1, rgb))  # (64, 1, 7, 7)
    assert grey.backbone.load_report.adapted == ["conv1.weight: 3 -> 1 input channels (timm adapt_input_conv)"]
    assert "adapted 1 [conv1.weight: 3 -> 1 input channels" in caplog.text
    assert grey(torch.rand(2, 1, 32, 32))["logits"].shape == (2, 2)


# ------------------------------------------------------------------------------------------------ 7. messages
def test_pretrained_true_beside_a_file_and_an_export_folder_as_pretrained_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pretrained=True is not needed .*pretrained_path='w.pth'; drop"):
        zoo.create_model("baseline_tinycnn", pretrained=True, pretrained_path="w.pth")
    torch.manual_seed(4)
    trained = zoo.create_model("baseline_tinycnn", num_classes=2)
    ckpt = system_checkpoint(trained, tmp_path / "last.ckpt", "baseline_tinycnn", {})
    folder = zoo.export_checkpoint(ckpt, tmp_path / "export")
    model = zoo.create_model("baseline_tinycnn", num_classes=7, pretrained_path=str(folder))
    body = trained.backbone.body.state_dict()
    assert all(torch.equal(model.backbone.body.state_dict()[k], v) for k, v in body.items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"is a folder without model.safetensors"):
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "empty"))


def test_predict_and_load_from_checkpoint_need_no_starting_point_file(resnet18_file: Path, image_folder_root: Path,
                                                                       in_tmp_dir: Path) -> None:
    """`train.py predict --ckpt_path FILE` and `System.load_from_checkpoint` build the model without reading its
    pretrained_path: the checkpoint replaces every weight, and the ImageNet file may have moved since."""
    from tests.conftest import REPO
    from train import main
    from zoo.baselines.system import ClassifierSystem

    start = in_tmp_dir / "resnet18.pth"
    start.write_bytes(resnet18_file.read_bytes())
    common = ["--config", str(REPO / "configs/baselines/image_folder.yaml"),
              f"--data.init_args.root={image_folder_root}", "--data.init_args.image_size=32",
              "--data.init_args.mean=pretrained",
              "--model.init_args.model_kwargs", f"{{pretrained_path: {start}}}"]
    main(["fit", *common, "--trainer.max_epochs=1", "--trainer.logger.init_args.name=run", "--trainer.callbacks=null",
          "--progress_bar.refresh_rate=0"])
    ckpt = in_tmp_dir / "checkpoints" / "run" / "checkpoints" / "last.ckpt"
    start.rename(in_tmp_dir / "moved.pth")
    system = ClassifierSystem.load_from_checkpoint(ckpt, weights_only=True)
    assert not system.model.backbone.load_report.read
    main(["predict", *common, f"--ckpt_path={ckpt}", "--trainer.logger.init_args.name=predicted"])
    assert (in_tmp_dir / "checkpoints" / "predicted" / "predictions" / "predictions.csv").is_file()


# ------------------------------------------------------------------------------- 8. files of training scripts
def tiny_backbone_state(seed: int) -> dict[str, torch.Tensor]:
    """A baseline_tinycnn's backbone tensors (BatchNorm included), as a file of that backbone holds them."""
    torch.manual_seed(seed)
    return zoo.create_model("baseline_tinycnn", num_classes=2).backbone.body.state_dict()


def backbone_equals(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(model.backbone.body.state_dict()[k], v) for k, v in state.items())


def test_checkpoints_of_training_scripts_load_with_their_args(tmp_path: Path) -> None:
    """torchvision's reference scripts, DeiT and MAE save {"model", "args", ...}; timm's train.py {"state_dict",
    "args", ...}: `args` is an argparse.Namespace, which timm's load_checkpoint allows under weights_only=True."""
    import argparse

    state = tiny_backbone_state(5)
    args = argparse.Namespace(model="tinycnn", lr=0.1, epochs=90, output_dir=str(tmp_path))
    for key, extra in (("model", {"optimizer": {"state": {}, "param_groups": []}, "epoch": 89}),
                       ("state_dict", {"arch": "tinycnn", "epoch": 89, "metric": 71.5})):
        torch.save({key: state, "args": args, **extra}, tmp_path / f"{key}.pth")
        model = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(tmp_path / f"{key}.pth"))
        assert backbone_equals(model, state) and model.backbone.load_report.key == key


def test_files_that_pickle_other_objects_are_refused_naming_them(tmp_path: Path) -> None:
    import numpy as np

    state = tiny_backbone_state(5)
    torch.save({"state_dict": state, "best_acc": np.float64(0.7)}, tmp_path / "numpy.pth")
    with pytest.raises(CheckpointError, match=r"Could not read weights from .*numpy.pth' \(it pickles numpy\.\S*"
                                              r"scalar.*weights_only=True does not build") as refused:
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "numpy.pth"))
    assert "pickled model" not in str(refused.value) and "pickled modules" not in str(refused.value)
    torch.save(zoo.create_model("baseline_tinycnn"), tmp_path / "whole.pth")  # torch.save(model): really unsafe
    with pytest.raises(CheckpointError, match=r"it pickles torch.nn.modules.*a whole pickled model "
                                              r"\(torch.save\(model\)\); save its state_dict\(\) instead"):
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "whole.pth"))


def test_files_without_batchnorm_step_counters_load_and_say_so(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """torchvision's detection files (FrozenBatchNorm2d) and older or converted ImageNet files hold no
    num_batches_tracked, which torch's strict load_state_dict and timm accept; every other missing key is refused."""
    from zoo.weights import load_module_weights

    state = tiny_backbone_state(6)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    old = {f"backbone.body.{k}": v for k, v in state.items() if k not in counters}  # under a detector's prefix
    torch.save(old, tmp_path / "old.pth")
    with caplog.at_level(logging.INFO, logger="zoo.weights"):
        model = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(tmp_path / "old.pth"))
    report = model.backbone.load_report
    assert backbone_equals(model, {k: v for k, v in state.items() if k not in counters})
    assert report.filled == counters and not set(counters) & set(report.loaded)
    assert all(model.backbone.body.state_dict()[k] == 0 for k in counters)
    assert f"{len(counters)} num_batches_tracked not in the file, kept at the model's [{counters[0]}" in caplog.text
    aux = zoo.create_model("baseline_tinycnn", num_classes=2)  # an auxiliary model's file (L2X black box, ...)
    torch.save({f"model.{k}": v for k, v in aux.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "aux.pth")
    load_module_weights(zoo.create_model("baseline_tinycnn", num_classes=2), tmp_path / "aux.pth", "", "black box")
    del old[f"backbone.body.{counters[0].replace('num_batches_tracked', 'running_var')}"]
    torch.save(old, tmp_path / "no_var.pth")
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'tinycnn': 1 missing keys "
                                              r"\['stages.0.0.1.running_var'\] \(its other"):
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "no_var.pth"))


def test_ema_weights_are_read_before_the_plain_ones_as_timm_reads_them(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import argparse

    plain, ema = tiny_backbone_state(7), tiny_backbone_state(8)
    torch.save({"state_dict": plain, "state_dict_ema": ema, "args": argparse.Namespace(model_ema=True)},
               tmp_path / "timm_train.pth.tar")
    torch.save({"model": plain, "model_ema": ema}, tmp_path / "deit.pth")
    for name, key in (("deit.pth", "model_ema"), ("timm_train.pth.tar", "state_dict_ema")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="zoo.weights"):
            model = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(tmp_path / name))
        assert backbone_equals(model, ema) and model.backbone.load_report.key == key
        assert f"{name}' ('{key}'): loaded 24 backbone tensors" in caplog.text
        assert f"reading '{key}' (timm's load_checkpoint's choice, EMA weights first)" in caplog.text

    # an EMA copy that does not fit (partial, or of another network) does not block a plain copy that does
    partial = {k: v for k, v in ema.items() if k != "stages.1.0.0.weight"}
    torch.save({"state_dict": plain, "state_dict_ema": partial}, tmp_path / "partial_ema.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zoo.weights"):
        model = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(tmp_path / "partial_ema.pth"))
    assert backbone_equals(model, plain) and model.backbone.load_report.key == "state_dict"
    assert "'state_dict_ema' does not fit backbone 'tinycnn'" in caplog.text and "read 'state_dict'" in caplog.text
    torch.save({"state_dict": partial, "state_dict_ema": partial}, tmp_path / "neither.pth")
    with pytest.raises(CheckpointError, match=r"neither.pth' \(under 'state_dict_ema'\) does not fit backbone "
                                              r"'tinycnn': 1 missing keys"):
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "neither.pth"))


def test_mismatch_errors_name_only_what_is_wrong_and_a_file_as_pretrained_points_to_pretrained_path(
        tmp_path: Path) -> None:
    state = tiny_backbone_state(9)
    torch.save({**state, "stages.0.0.0.weight": torch.zeros(32, 1, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'tinycnn': shape mismatches "
                                              r"\['stages.0.0.0.weight: file \(32, 1, 3, 3\)") as shape:
        zoo.create_model("baseline_tinycnn", in_chans=2, pretrained_path=str(tmp_path / "shape.pth"))
    assert "missing keys" not in str(shape.value)
    torch.save({k: v for k, v in state.items() if k != "stages.1.0.0.weight"}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['stages.1.0.0.weight'\]") as missing:
        zoo.create_model("baseline_tinycnn", pretrained_path=str(tmp_path / "missing.pth"))
    assert "shape mismatches" not in str(missing.value)
    for value in ("resnet18.pth", tmp_path / "resnet18.pth"):
        with pytest.raises(ValueError, match=r"pretrained='.*resnet18.pth' names a weight file.*pass the file as "
                                             r"pretrained_path='.*resnet18.pth'\.$"):
            zoo.create_model("baseline_tinycnn", pretrained=value)
    with pytest.raises(ValueError, match=r"pretrained_path='w.pth' is given too: keep one"):
        zoo.create_model("baseline_tinycnn", pretrained="w.pth", pretrained_path="w.pth")


def test_a_checkpoint_that_pickles_objects_is_refused_without_torchs_unsafe_advice(tmp_path: Path) -> None:
    """`zoo.load_checkpoint` / `--ckpt_path` of a .ckpt pickling objects passed on torch's text, which advises
    `weights_only=False` or allow-listing the global: now named as the weight files' reader names it."""
    import numpy as np

    from zoo.weights import read_checkpoint

    torch.save({"state_dict": {}, "hyper_parameters": {}, "best": np.float64(0.7)}, tmp_path / "numpy.ckpt")
    with pytest.raises(CheckpointError, match=r"Could not read checkpoint .*numpy.ckpt': it pickles numpy\.\S*"
                                              r"scalar.*weights_only=True does not build") as refused:
        read_checkpoint(tmp_path / "numpy.ckpt")
    assert "weights_only=False" not in str(refused.value) and "add_safe_globals" not in str(refused.value)
