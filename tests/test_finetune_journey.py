"""The "fine-tune a pretrained backbone" journey end to end, without training: `compare`'s twins are the family's
model on the same backbone and weights as the command line leaves it, the paper's CUB configs and the detectors
normalise images as their ImageNet weights expect (and unnormalised pixels into a pretrained backbone are warned
about), the textual encoder starts from a weight file, and `--trainer.enable_progress_bar=false` works."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from tests.conftest import REPO
from zoo.cli.lightning import ZooCLI

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL_WORLD = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
               "--trainer.logger=false"]


def compare_runs(config: Path, extra: list[str], names: tuple[str, ...] | None = None) -> dict[str, ZooCLI]:
    """The runs `train.py compare --config <config> <extra>` builds (models and data, nothing trained), by name."""
    from zoo.cli.compare import _fit_args, read_compare_spec

    spec = read_compare_spec(config)
    return {name: ZooCLI(args=_fit_args(name, run, config, list(spec.get("args", [])), extra), run=False)
            for name, run in spec["runs"].items() if names is None or name in names}


def parsed_model(args: list[str]) -> Any:
    """The model section (class_path, init_args) that ZooCLI parses from `args`; nothing is built."""
    class ParsedOnly(ZooCLI):
        def instantiate_classes(self) -> None:
            pass

    return ParsedOnly(args=args, run=False).config.model


def twin_args(config: Path, twin: str, extra: list[str]) -> list[str]:
    from zoo.cli.compare import _fit_args, read_compare_spec

    return _fit_args(twin, read_compare_spec(config)["runs"][twin], config, [], extra)


def tiny_weights(path: Path, seed: int = 3) -> Path:
    """A tiny-CNN backbone state dict (what a pretrained_path of the tiny CNN holds)."""
    torch.manual_seed(seed)
    torch.save(zoo.create_model("baseline_tinycnn", num_classes=2).backbone.body.state_dict(), path)
    return path


def body_state(system: Any) -> dict[str, torch.Tensor]:
    return system.model.backbone.body.state_dict()


# --------------------------------------------------------------------------------------- 1. compare's twins
def test_plain_cnn_twin_is_the_same_pretrained_backbone_as_the_command_line_leaves_the_icnn(
        image_folder_root: Path, in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`compare --config configs/icnn/image_folder.yaml --model.init_args.model_name icnn_timm --model.init_args.
    model_kwargs '{backbone: ..., pretrained_path: ...}'` made plain_cnn another ICNN (the command line came after
    the twin's model name), and a command-line loss weight undid the twins' lambda 0."""
    weights = tiny_weights(in_tmp_dir / "tiny.pth")
    extra = [f"--data.init_args.root={image_folder_root}", "--trainer.logger=false",
             "--model.init_args.model_name", "icnn_timm",
             "--model.init_args.model_kwargs", f"{{backbone: tinycnn, pretrained_path: {weights}, drop_rate: 0.25}}",
             "--model.init_args.loss.init_args.weight=0.5"]
    runs = compare_runs(REPO / "configs/icnn/image_folder.yaml", extra)
    icnn, plain = runs["icnn"].model, runs["plain_cnn"].model
    assert icnn.hparams.model_name == "icnn_timm" and icnn.loss.weight == 0.5
    assert plain.hparams.model_name == "baseline_timm" and type(plain.model).__name__ == "OpaqueClassifier"
    assert plain.hparams.model_kwargs == {"backbone": "tinycnn", "pretrained_path": str(weights), "drop_rate": 0.25,
                                          "top_conv": True}  # scored at ICNN's layer (VGG: conv5_3, not pool5)
    assert plain.model.backbone.load_report.path == str(weights) and plain.model.head.drop.p == 0.25
    assert body_state(plain).keys() == body_state(icnn).keys()
    assert all(torch.equal(body_state(plain)[k], body_state(icnn)[k]) for k in body_state(icnn))  # same weights
    assert plain.part_maps_key == "features"
    assert all(runs[twin].model.loss.weight == 0 for twin in ("ordinary_twin", "masked_twin", "plain_cnn"))
    assert not runs["ordinary_twin"].model.model.top_filters.masks
    assert "twin 'plain_cnn' (baseline_timm) does not take model_kwargs tau_scale, category_assignment" in \
        capsys.readouterr().out


def test_plain_cnn_twin_of_the_mobilenet_config_is_mobilenet_from_the_same_imagenet_file(in_tmp_dir: Path) -> None:
    """configs/icnn/fashion_mnist_mobilenet.yaml (icnn_timm, backbone and pretrained_path in model_kwargs): its
    plain_cnn was a baseline_timm on resnet18 from scratch."""
    from tests.helpers import write_release_data

    write_release_data(in_tmp_dir)
    runs = compare_runs(REPO / "configs/icnn/fashion_mnist_mobilenet.yaml", ["--trainer.logger=false"],
                        names=("icnn", "plain_cnn"))
    icnn, plain = runs["icnn"].model, runs["plain_cnn"].model
    assert plain.hparams.model_name == "baseline_timm"
    assert plain.model.backbone.name == icnn.model.backbone.name == "torchvision:mobilenet_v2"
    assert plain.model.backbone.load_report.path == icnn.model.backbone.load_report.path == \
        "data/mobilenet_v2/mobilenet_v2-b0353104.pth"
    assert runs["plain_cnn"].datamodule.mean == pytest.approx(IMAGENET_MEAN)


def test_detector_and_black_box_twins_follow_the_command_line(in_tmp_dir: Path) -> None:
    """AOG-RCNN's `{backbone}` and L2X's `{black_box}` were filled from the config file: with the model (or black
    box) changed on the command line the twins were another model than the family's."""
    aog = REPO / "configs/aog_rcnn/parts_world_scenes.yaml"
    for twin, expected in (("average_vote", "vote_rcnn_resnet18"), ("two_mlp_head", "faster_rcnn_resnet18")):
        args = twin_args(aog, twin, ["--model.init_args.model_name=aog_rcnn_resnet18",
                                     "--model.init_args.model_kwargs.pretrained_path=r.pth"])
        model = parsed_model(args)
        assert model.init_args.model_name == expected and model.init_args.model_kwargs == {"pretrained_path": "r.pth"}
    l2x = REPO / "configs/l2x/xor.yaml"
    args = twin_args(l2x, "black_box", ["--model.init_args.black_box=baseline_smallcnn",
                                        "--model.init_args.black_box_kwargs={widths: [4, 8]}"])
    model = parsed_model(args)
    assert model.class_path == "zoo.baselines.system.ClassifierSystem"
    assert model.init_args.model_name == "baseline_smallcnn" and model.init_args.model_kwargs == {"widths": [4, 8]}


# ------------------------------------------------------------------------------------------ 2. normalisation
def test_the_cub_configs_normalise_with_the_backbones_pretrained_mean(cub_root: Path, in_tmp_dir: Path) -> None:
    for config in ("configs/icnn/cub200.yaml", "configs/baselines/cub200.yaml"):
        run = ZooCLI(args=["--config", str(REPO / config), f"--data.init_args.root={cub_root}",
                           "--data.init_args.image_size=64", "--trainer.logger=false"], run=False)
        assert run.datamodule.mean == pytest.approx(IMAGENET_MEAN), config
        assert run.datamodule.std == pytest.approx(IMAGENET_STD), config


def test_a_pretrained_backbone_fed_unnormalised_images_is_warned_about(image_folder_root: Path, voc_root: Path,
                                                                         in_tmp_dir: Path) -> None:
    weights = tiny_weights(in_tmp_dir / "tiny.pth")
    base = ["--config", str(REPO / "configs/baselines/image_folder.yaml"), f"--data.init_args.root={image_folder_root}",
            "--model.init_args.model_name=baseline_tinycnn", "--trainer.logger=false"]
    pretrained = f"--model.init_args.model_kwargs.pretrained_path={weights}"
    with pytest.warns(UserWarning, match=r"starts from pretrained weights .*tiny.pth.* not normalised"):
        ZooCLI(args=[*base, pretrained], run=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not normalised.*")
        ZooCLI(args=[*base, pretrained, "--data.init_args.mean=[0.5]", "--data.init_args.std=[0.25]"], run=False)
        ZooCLI(args=base, run=False)  # from scratch: nothing to say
        voc = ZooCLI(args=["--config", str(REPO / "configs/aog_rcnn/voc.yaml"), f"--data.init_args.root={voc_root}",
                           "--model.init_args.model_name=aog_rcnn_tinycnn", "--data.init_args.image_size=64",
                           "--data.init_args.train_split=train", pretrained, "--trainer.logger=false"],
                    run=False)  # the detector normalises itself
    assert voc.model.model.backbone.body.load_report is not None


def test_a_detector_from_pretrained_weights_normalises_with_the_backbones_pretrained_mean(tmp_path: Path) -> None:
    import timm

    from datamodules._base import pretrained_normalization
    from zoo.aog_rcnn.model import AOGRCNN

    name = "mobilenetv3_small_050"
    torch.save(timm.create_model(name).state_dict(), tmp_path / "w.pth")
    for in_chans in (3, 1):
        fine_tuned = AOGRCNN(num_classes=2, backbone=name, in_chans=in_chans, pretrained_path=str(tmp_path / "w.pth"))
        mean, std = pretrained_normalization(name)
        if in_chans == 1:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
        assert fine_tuned.transform.image_mean == pytest.approx(mean)
        assert fine_tuned.transform.image_std == pytest.approx(std)
    scratch = AOGRCNN(num_classes=2, backbone=name)  # the recorded runs' values stay
    assert scratch.transform.image_mean == [0.5] * 3 and scratch.transform.image_std == [0.25] * 3
    tiny = zoo.create_model("aog_rcnn_tinycnn", num_classes=2, pretrained_path=str(tiny_weights(tmp_path / "t.pth")))
    assert tiny.transform.image_mean == [0.5] * 3  # the tiny CNN has no pretrained mean/std


# ---------------------------------------------------------------------------------------- 3. textual encoder
def test_the_textual_encoder_starts_from_a_weight_file_and_takes_mean_pretrained(tmp_path: Path,
                                                                                 in_tmp_dir: Path) -> None:
    import timm

    from zoo.textual.system import TextualSystem

    name = "mobilenetv3_small_050"
    torch.save(timm.create_model(name).state_dict(), tmp_path / "w.pth")
    kwargs = {"backbone": name, "pretrained_path": str(tmp_path / "w.pth")}
    run = ZooCLI(args=["--config", str(REPO / "configs/textual/description.yaml"), *SMALL_WORLD,
                       "--model.init_args.encoder=baseline_timm", "--model.init_args.encoder_kwargs", str(kwargs),
                       "--data.init_args.mean=pretrained"], run=False)
    encoder = run.model.model.image_encoder
    assert encoder.backbone.name == name and encoder.backbone.load_report.path == str(tmp_path / "w.pth")
    assert run.datamodule.mean == pytest.approx(IMAGENET_MEAN)
    assert run.model.hparams.model_kwargs["encoder_kwargs"] == kwargs
    # A checkpoint saved before encoder_kwargs existed (its hyperparameters lack it) still loads, as it was built.
    old = TextualSystem(variant="description", num_classes=6, image_size=64)
    hparams = dict(old.hparams)
    hparams.pop("encoder_kwargs")
    hparams["model_kwargs"] = {k: v for k, v in hparams["model_kwargs"].items() if k != "encoder_kwargs"}
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0"},
               tmp_path / "old.ckpt")
    loaded = TextualSystem.load_from_checkpoint(tmp_path / "old.ckpt")
    assert "encoder_kwargs" not in loaded.hparams.model_kwargs
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in loaded.state_dict().items())


# ------------------------------------------------------------------------------------------ 4. progress bar
def test_the_progress_bar_can_be_turned_off(in_tmp_dir: Path) -> None:
    from pytorch_lightning.callbacks import RichProgressBar

    config = str(REPO / "configs/baselines/parts_world.yaml")
    off = ZooCLI(args=["--config", config, *SMALL_WORLD, "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None
    assert not any(isinstance(c, RichProgressBar) for c in off.trainer.callbacks)
    on = ZooCLI(args=["--config", config, *SMALL_WORLD], run=False)
    assert isinstance(on.trainer.progress_bar_callback, RichProgressBar)


def test_a_zoo_runs_weights_are_fed_the_normalisation_they_were_trained_with(image_folder_root: Path,
                                                                             in_tmp_dir: Path) -> None:
    """A backbone started from a zoo run's checkpoint or export (the README's "start from pretrained weights"
    path) with `mean: pretrained` was fed ImageNet's normalisation, silently, though the run's own data were
    normalised otherwise (its checkpoint and export say how); one trained on [0, 1] pixels and fed them was warned
    about as if it were ImageNet's. Said with the values the run had; nothing when they agree."""
    from zoo.checkpoints import trained_normalization

    state = torch.load(tiny_weights(in_tmp_dir / "tiny.pth"), weights_only=True)
    own = in_tmp_dir / "own.ckpt"
    zoo_run = {"model_name": "baseline_tinycnn"}  # the hyperparameters of a zoo System's checkpoint
    torch.save({"state_dict": state, "hyper_parameters": zoo_run, "datamodule_hyper_parameters": {
        "mean": [0.5] * 3, "std": [0.25] * 3}}, own)
    raw = in_tmp_dir / "raw.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": zoo_run, "datamodule_hyper_parameters": {
        "mean": None, "std": None}}, raw)
    other = in_tmp_dir / "other.ckpt"  # another library's Lightning checkpoint: its data settings mean nothing here
    torch.save({"state_dict": state, "hyper_parameters": {}, "datamodule_hyper_parameters": {
        "mean": "imagenet", "std": None}}, other)
    export = in_tmp_dir / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({**zoo_run, "pretrained_cfg": {"mean": [0.5] * 3,
                                                                                "std": [0.25] * 3}}))
    (export / "model.safetensors").write_bytes(b"")
    hub = in_tmp_dir / "hub"  # a timm / Hugging Face folder: config.json of its own, no zoo model_name
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": {"mean": [0.5] * 3,
                                                                                              "std": [0.25] * 3}}))
    (hub / "model.safetensors").write_bytes(b"")
    assert trained_normalization(own) == ([0.5] * 3, [0.25] * 3) == trained_normalization(export / "model.safetensors")
    assert trained_normalization(export) == trained_normalization(own)  # the export's folder, as pretrained_path
    assert trained_normalization(raw) == ([0.0], [1.0]) and trained_normalization(in_tmp_dir / "tiny.pth") is None
    assert trained_normalization(other) is None and trained_normalization(hub / "model.safetensors") is None

    base = ["--config", str(REPO / "configs/baselines/image_folder.yaml"), f"--data.init_args.root={image_folder_root}",
            "--model.init_args.model_name=baseline_tinycnn", "--trainer.logger=false"]
    with pytest.warns(UserWarning, match=r"own.ckpt', a zoo run trained on images normalised with mean \[0.5, 0.5, "
                                         r"0.5\], std \[0.25, 0.25, 0.25\]; this data's are mean \[0.4\], "
                                         r"std \[0.2\]. Give --data.init_args.mean \[0.5, 0.5, 0.5\]"):
        ZooCLI(args=[*base, f"--model.init_args.model_kwargs.pretrained_path={own}", "--data.init_args.mean=[0.4]",
                     "--data.init_args.std=[0.2]"], run=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(are not normalised|a zoo run trained)")
        ZooCLI(args=[*base, f"--model.init_args.model_kwargs.pretrained_path={own}", "--data.init_args.mean=[0.5]",
                     "--data.init_args.std=[0.25]"], run=False)  # as it was trained
        ZooCLI(args=[*base, f"--model.init_args.model_kwargs.pretrained_path={raw}"], run=False)  # [0, 1] pixels
