"""Backbone sizes, local pretrained weights, and clear errors for files that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo
from zoo import Backbone, CheckpointError


@pytest.mark.parametrize("name, channels, reduction", [("tinycnn", 128, 8), ("resnet18", 512, 32), ("vgg11", 512, 32)])
def test_channels_and_reductions_match_the_maps(name: str, channels: int, reduction: int) -> None:
    backbone = Backbone(name)
    top = backbone(torch.rand(2, 3, 64, 64))[-1]
    assert backbone.num_features == channels and backbone.reductions[-1] == reduction
    assert top.shape == (2, channels, 64 // reduction, 64 // reduction)


def test_tinycnn_out_indices_match_the_maps() -> None:
    backbone = Backbone("tinycnn", out_indices=(1, 3))
    maps = backbone(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == backbone.channels == [64, 128]
    assert [64 // m.shape[-1] for m in maps] == backbone.reductions == [4, 8]


def test_full_timm_state_dict_loads_into_features_backbone(tmp_path: Path) -> None:
    """A whole-classifier timm checkpoint (with fc.* and VGG's dotted names) fills the features_only body."""
    for name in ("resnet18", "vgg11"):
        torch.manual_seed(1)
        full = timm.create_model(name, num_classes=7)
        path = tmp_path / f"{name}.pth"
        torch.save(full.state_dict(), path)
        model = zoo.create_model(f"baseline_{name}", num_classes=3, pretrained_path=str(path))
        first_conv = next(p for n, p in model.backbone.body.named_parameters() if n.endswith("weight"))
        source = next(p for n, p in full.named_parameters() if n.endswith("weight"))
        assert torch.equal(first_conv, source)


def test_safetensors_and_lightning_checkpoint_prefixes(tmp_path: Path) -> None:
    torch.manual_seed(2)
    trained = zoo.create_model("baseline_tinycnn", num_classes=3)
    weights = {k: v.clone() for k, v in trained.backbone.body.state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"model.backbone.body.{k}": v for k, v in weights.items()}, "epoch": 3},
               tmp_path / "run.ckpt")
    for path in ("w.safetensors", "run.ckpt"):
        loaded = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(tmp_path / path))
        assert all(torch.equal(loaded.backbone.body.state_dict()[k], v) for k, v in weights.items())


def test_weights_of_another_network_name_the_missing_keys(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'vgg11': \d+ missing keys \['features_0"):
        zoo.create_model("baseline_vgg11", pretrained_path=str(tmp_path / "resnet18.pth"))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    weights = Backbone("tinycnn").body.state_dict()
    weights["stages.0.0.0.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save(weights, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"stages.0.0.0.weight: file \(32, 1, 3, 3\) vs model \(32, 3, 3, 3\)"):
        Backbone("tinycnn", pretrained_path=tmp_path / "w.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"Could not read weights from .*broken.pth"):
        zoo.create_model("baseline_tinycnn", pretrained_path=str(path))


def test_pickled_module_is_refused_and_missing_file_named(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole pickled module, not a state dict
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Backbone("tinycnn", pretrained_path=tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        Backbone("tinycnn", pretrained_path=tmp_path / "nope.pth")


def test_cells_to_pixels_lives_next_to_the_geometry_and_maps_any_leading_shape() -> None:
    """`cells_to_pixels` is `zoo.backbones`' (the part metric, the figures and the explainers share it; Captum's
    module re-exports it): (N, F, h, w) maps go through at once, each cell at its receptive-field centre, exactly as
    each (B, h, w) slice would; without a geometry, or where the even spread is exact (2 x 2 max-pools on a
    multiple of the stride), it is `F.interpolate` to the bit."""
    import torch.nn.functional as F

    from zoo.backbones import MapGeometry, cells_to_pixels
    from zoo.explain import captum

    assert captum.cells_to_pixels is cells_to_pixels
    maps = torch.rand(3, 5, 4, 4)
    resnet = MapGeometry((16.0, 16.0), (0.5, 0.5))  # padded strided convolutions: cell i at i x 16 + 0.5
    up = cells_to_pixels(maps, (64, 64), resnet)  # (3, 5, 64, 64)
    assert up.shape == (3, 5, 64, 64)
    torch.testing.assert_close(up, torch.stack([cells_to_pixels(maps[:, f], (64, 64), resnet) for f in range(5)], 1))
    hot = torch.zeros(1, 4, 4)
    hot[0, 1, 2] = 1.0  # cell (1, 2): centre (16.5, 32.5)
    tent = [(1 - ((torch.arange(64) + 0.5 - c).abs() / 16)).clamp(min=0) for c in (16.5, 32.5)]
    torch.testing.assert_close(cells_to_pixels(hot, (64, 64), resnet)[0], tent[0][:, None] * tent[1][None])
    even = F.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(cells_to_pixels(maps, (64, 64)), even)
    assert torch.equal(cells_to_pixels(maps, (64, 64), MapGeometry((16.0, 16.0), (8.0, 8.0))), even)
    assert not torch.allclose(up, even)


@pytest.mark.parametrize("name, reductions", [("torchvision:alexnet", [4, 8, 16, 32]),
                                              ("torchvision:squeezenet1_0", [2, 4, 8, 16]),
                                              ("torchvision:mobilenet_v2", [2, 4, 8, 16, 32])])
def test_torchvision_reductions_are_the_strides_of_the_maps(name: str, reductions: list[int]) -> None:
    """A torchvision body's reductions are its strides, read from how its maps grow with the input: AlexNet's and
    SqueezeNet's unpadded layers lose border cells (AlexNet: 15, 7, 3, 1 at 64 px), so 64 // map size gave 4, 9, 21,
    64; one more map cell per `reduction` pixels at any size is what map geometry and the heads assume."""
    backbone = Backbone(name, out_indices=tuple(range(len(reductions))))
    assert backbone.reductions == reductions
    small, large = backbone(torch.rand(1, 3, 96, 96)), backbone(torch.rand(1, 3, 224, 224))
    assert [(b.shape[-1] - a.shape[-1]) * r for a, b, r in zip(small, large, reductions)] == [128] * len(reductions)
