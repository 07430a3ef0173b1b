"""`System.load_from_checkpoint` on checkpoints written with a config's loss (README: a supported way to load).

The loss is not a hyperparameter, so `load_from_checkpoint` rebuilds a System with its default loss. A loss's
constants from the config (ReNN's `pos_weight`, the semantic loss's `assignments`) are non-persistent buffers, so
checkpoints do not hold them; checkpoints written before that do ("loss.pos_weight"), and `ZooSystem.on_load_checkpoint`
drops the loss tensors the current loss does not hold. Loss state the loss does hold is restored; any other unexpected
key is still refused by the strict load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn

from losses.baselines import ClassificationLoss
from tests.conftest import REPO
from zoo.cli.lightning import ZooCLI
from zoo.engine.system import ZooSystem

SMALL = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
         "--trainer.logger=false"]
EXACTLY_ONE_ROWS = "--model.init_args.loss.init_args.constraint=" + str(torch.eye(6, dtype=torch.long).tolist())


def written_checkpoint(cli: ZooCLI, path: Path) -> tuple[ZooSystem, Path]:
    """The CLI's System (its config's loss), weights moved off their initialisation, saved by its Trainer."""
    system = cli.model
    with torch.no_grad():
        for parameter in system.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    cli.trainer.strategy.connect(system)
    cli.trainer.save_checkpoint(path, weights_only=True)
    return system, path


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Equal state dicts (NaN equal to NaN: ICNN's unseen statistics are NaN)."""
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(
        torch.equal(first[k], second[k]) or (first[k].is_floating_point()
                                             and torch.allclose(first[k], second[k], rtol=0, atol=0, equal_nan=True))
        for k in first)


def eval_outputs(system: ZooSystem, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    system.eval()
    with torch.no_grad():
        return {k: v for k, v in system.forward_batch(batch, "val").items() if torch.is_tensor(v)}


def assert_same_outputs(cli: ZooCLI, saved: ZooSystem, loaded: ZooSystem) -> None:
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.val_dataloader()))
    expected, got = eval_outputs(saved, batch), eval_outputs(loaded, batch)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def old_layout(path: Path, extra: dict[str, torch.Tensor]) -> Path:
    """The checkpoint as the code before the non-persistent buffers wrote it: the loss's constants in its state."""
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"].update(extra)
    old = path.with_name(f"old_{path.name}")
    torch.save(checkpoint, old)
    return old


# (config, extra args, the loss constants a checkpoint held before they became non-persistent buffers)
RENN_LOSS_CASES = {
    "rule_series": ("renn/rule_series.yaml", [], {"loss.pos_weight": torch.tensor(10.0)}),
    # the semantic-loss config with its constraint given as assignments (the loss then holds them as a buffer)
    "semantic": ("renn/parts_world_semantic.yaml", [EXACTLY_ONE_ROWS], {"loss.assignments": torch.eye(6)}),
}


@pytest.mark.parametrize("old", [False, True], ids=["current", "old_layout"])
@pytest.mark.parametrize("case", list(RENN_LOSS_CASES))
def test_renn_checkpoints_load_with_load_from_checkpoint(in_tmp_dir: Path, case: str, old: bool) -> None:
    config, extra, constants = RENN_LOSS_CASES[case]
    cli = ZooCLI(args=["--config", str(REPO / "configs" / config), *extra, *SMALL], run=False)
    buffers = {f"loss.{name}": buffer for name, buffer in cli.model.loss.named_buffers()}
    assert all(buffers[key].shape == value.shape for key, value in constants.items())  # held, as a buffer
    saved, path = written_checkpoint(cli, in_tmp_dir / f"{case}.ckpt")
    if old:
        path = old_layout(path, constants)
    loaded = type(saved).load_from_checkpoint(path)
    assert same_state(saved, loaded)
    assert_same_outputs(cli, saved, loaded)


@pytest.mark.parametrize("config", ["baselines/parts_world.yaml", "cbm/parts_world.yaml", "icnn/parts_world.yaml",
                                    "l2x/xor.yaml", "protopnet/parts_world.yaml", "renn/parts_world_distillation.yaml",
                                    "textual/explanation_label.yaml", "aog_rcnn/parts_world_scenes.yaml"])
def test_every_family_loads_a_checkpoint_written_with_its_configs_loss(in_tmp_dir: Path, config: str) -> None:
    cli = ZooCLI(args=["--config", str(REPO / "configs" / config), "--trainer.logger=false"], run=False)
    saved, path = written_checkpoint(cli, in_tmp_dir / "family.ckpt")
    assert same_state(saved, type(saved).load_from_checkpoint(path))


class RunningLoss(ClassificationLoss):
    """A loss with state of its own (as the textual REINFORCE baseline): a resume must restore it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.tensor(0.0))


def test_loss_state_the_loss_holds_is_restored_and_other_unexpected_keys_are_refused(in_tmp_dir: Path) -> None:
    system = ZooSystem(model_name="baseline_tinycnn", num_classes=3, image_size=32, loss=RunningLoss())
    system.loss.running.fill_(0.7)
    checkpoint = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
                  "pytorch-lightning_version": pl.__version__}
    checkpoint["state_dict"]["loss.pos_weight"] = torch.tensor(10.0)  # an old constant: dropped
    torch.save(checkpoint, in_tmp_dir / "state.ckpt")
    images = torch.randn(4, 3, 32, 32)
    loader = torch.utils.data.DataLoader([{"image": image, "label": 0} for image in images], batch_size=4)
    resumed = ZooSystem(model_name="baseline_tinycnn", num_classes=3, image_size=32, loss=RunningLoss())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(resumed, loader, ckpt_path=in_tmp_dir / "state.ckpt", verbose=False)  # Lightning's restore
    assert resumed.loss.running.item() == pytest.approx(0.7)
    assert torch.equal(eval_outputs(resumed, {"image": images})["logits"],
                       eval_outputs(system, {"image": images})["logits"])

    checkpoint["state_dict"]["model.bogus"] = torch.zeros(1)
    torch.save(checkpoint, in_tmp_dir / "bogus.ckpt")
    with pytest.raises(RuntimeError, match="model.bogus"):
        ZooSystem.load_from_checkpoint(in_tmp_dir / "bogus.ckpt", loss=RunningLoss())
