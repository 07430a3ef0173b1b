"""ProtoPNet's part stability does not depend on the number of processes or the batch size: each image's noise is a
function of its data set index (`zoo.protopnet.metrics.image_noise`). Before, every rank reseeded one generator with
0 at the start of validation, so an image's noise depended on its rank and its place in the batches (an untrained
protopnet_tinycnn on 32 validation images: part stability 0.876 on one process, 0.891 on two)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from datamodules import PartsWorldDataModule
from zoo.protopnet.system import ProtoPNetSystem

NUM_CLASSES = 3


def system_and_data(batch_size: int) -> tuple[ProtoPNetSystem, PartsWorldDataModule]:
    pl.seed_everything(0)
    data = PartsWorldDataModule(num_classes=NUM_CLASSES, num_train=8, num_val=32, num_test=8, batch_size=batch_size)
    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES,
                             model_kwargs={"prototypes_per_class": 2, "prototype_channels": 16})
    return system, data


def validate(system: ProtoPNetSystem, data: PartsWorldDataModule, root: Path, **trainer_kwargs: Any
             ) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, **trainer_kwargs)
    return trainer.validate(system, datamodule=data, verbose=False)[0]


def test_image_noise_is_a_function_of_the_index_alone() -> None:
    from zoo.protopnet.metrics import image_noise

    state = torch.get_rng_state()
    together = image_noise(torch.tensor([3, 7, 11]), (3, 4, 4))  # (3, 3, 4, 4)
    alone = image_noise(torch.tensor([7]), (3, 4, 4))
    assert torch.get_rng_state().equal(state)  # the global stream is untouched
    assert together.shape == (3, 3, 4, 4) and torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(image_noise(torch.tensor([7]), (3, 4, 4), seed=1), alone)


def test_two_process_part_stability_equals_one_process(tmp_path: Path) -> None:
    """trainer.validate on the same weights with ddp_spawn on 2 CPU processes (each rank its own 16 images) and on
    one process: every logged value agrees, part stability included."""
    system, data = system_and_data(batch_size=8)
    two = validate(copy.deepcopy(system), copy.deepcopy(data), tmp_path, strategy="ddp_spawn", devices=2)
    one = validate(system, data, tmp_path, devices=1)
    assert set(two) == set(one) and "val/part_stability" in one
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-6), key


def test_keyed_noise_is_standard_gaussian_and_vectorised() -> None:
    """The counter-based draw (one hash per value, Box-Muller; no generator per image): mean 0, std 1, no
    correlation between neighbouring values or images, a different field per seed."""
    from zoo.hashing import keyed_normal

    noise = keyed_normal(torch.arange(64), (3, 32, 32))  # (64, 3, 32, 32): 196,608 values
    assert noise.shape == (64, 3, 32, 32) and torch.isfinite(noise).all()
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    flat = noise.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01  # neighbouring values
    between = torch.corrcoef(noise.flatten(1))[~torch.eye(64, dtype=torch.bool)]  # images: 3,072 values each
    assert between.abs().mean() < 0.02 and between.abs().max() < 0.09  # independent: ~0.0144 and < 5 SE expected
    assert (noise.abs() > 3).float().mean().item() == pytest.approx(0.0027, abs=0.001)  # Gaussian tails
    assert not torch.equal(keyed_normal(torch.arange(2), (8,), seed=1), keyed_normal(torch.arange(2), (8,)))
