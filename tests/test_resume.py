"""Nothing is lost when a run dies: SIGKILL mid-epoch, resume from last.ckpt, same final state as a run that never
died; checkpoints load for inference, export to safetensors, and mismatches are named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import zoo
from tests.conftest import REPO
from zoo import CheckpointError

CONFIG = str(REPO / "configs/baselines/parts_world.yaml")
SMALL = ["--data.init_args.num_train=96", "--data.init_args.num_val=32", "--data.init_args.batch_size=16",
         "--trainer.max_epochs=3", "--trainer.deterministic=true", "--progress_bar.refresh_rate=0"]


def fit(cwd: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", CONFIG, *SMALL,
                           f"--trainer.logger.init_args.name={name}", *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def final_state(cwd: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(cwd / "checkpoints" / name / "checkpoints" / "last.ckpt", weights_only=True)


def test_a_run_killed_mid_epoch_resumes_to_the_same_final_state(tmp_path: Path) -> None:
    assert fit(tmp_path, "whole").returncode == 0
    killer = tmp_path / "kill.yaml"  # 6 steps per epoch: dies in the middle of the second epoch
    killer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.helpers.KillAtStep", "init_args": {"step": 9}}]}}))
    killed = fit(tmp_path, "killed", "--config", str(killer))
    assert killed.returncode == -signal.SIGKILL
    assert final_state(tmp_path, "killed")["global_step"] == 6  # last.ckpt is the end of epoch 0
    resumed = fit(tmp_path, "killed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole, again = final_state(tmp_path, "whole"), final_state(tmp_path, "killed")
    assert again["global_step"] == whole["global_step"] == 18
    assert whole["state_dict"].keys() == again["state_dict"].keys()
    assert all(torch.equal(whole["state_dict"][k], again["state_dict"][k]) for k in whole["state_dict"])


def test_load_checkpoint_export_and_named_mismatches(tmp_path: Path) -> None:
    from train import main

    os.chdir(tmp_path)
    main(["fit", "--config", CONFIG, "--trainer.max_epochs=1", "--trainer.logger.init_args.name=src",
          "--data.init_args.num_train=64", "--data.init_args.num_val=32"])
    checkpoint = tmp_path / "checkpoints" / "src" / "checkpoints" / "last.ckpt"
    model = zoo.load_checkpoint(checkpoint, model_name="baseline_tinycnn", num_classes=6)
    images = torch.rand(2, 3, 64, 64)
    exported = zoo.load_exported(zoo.export_checkpoint(checkpoint, tmp_path / "export"))
    with torch.no_grad():
        assert torch.equal(model(images)["logits"], exported(images)["logits"])
    with pytest.raises(CheckpointError, match="holds baseline_tinycnn with 6 classes .*builds baseline_tinycnn with "
                                              "4 classes"):
        zoo.load_checkpoint(checkpoint, num_classes=4)
    with pytest.raises(CheckpointError, match="this run builds icnn_tinycnn"):
        zoo.load_checkpoint(checkpoint, model_name="icnn_tinycnn")
    with pytest.raises(CheckpointError, match="holds baseline_tinycnn with 6 classes"):  # fit --ckpt_path refuses too
        main(["fit", "--config", CONFIG, "--trainer.max_epochs=2", "--data.init_args.num_classes=4",
              "--data.init_args.num_train=64", "--data.init_args.num_val=32", f"--ckpt_path={checkpoint}"])
    (tmp_path / "pickled.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Could not read checkpoint"):
        zoo.load_checkpoint(tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="needs config.json and model.safetensors"):
        zoo.load_exported(tmp_path)

