"""ZooSystem under DDP: evaluation metrics that start from states left by something else, and a non-finite training
loss on one rank under nonfinite_loss="skip".

- Under ddp_spawn on the CPU, torch.multiprocessing hands the spawned ranks the System's metric states in memory
  shared with the main process (Lightning unshares parameters and buffers only), so the ranks' updates landed in
  the main process's states and each later `validate` in that process started from them: L2X's
  val/approximator_fidelity read 0.543, then 0.5312, 0.5254, ... for one checkpoint (0.5078 in a fresh process).
  Every stage's metrics are now reset as its epoch starts; the test fills the states with garbage (as shared memory
  filled them) and holds `validate` / `test` to a fresh System's values, and the old state tensors untouched.
- nonfinite_loss="skip" returned None on the rank whose loss was NaN: Lightning refuses None under DDP and the other
  rank died in the gradient all-reduce (gloo "Connection closed by peer"), and the warning, rank zero's only, never
  said a NaN on rank 1. Two gloo processes (`tests.helpers.gloo_ranks`) drive the System's training step through
  torch's DistributedDataParallel with a stub trainer: every rank skips, the optimiser changes nothing, and each
  side says which rank saw it.
"""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules import PartsWorldDataModule
from tests.helpers import gloo_ranks
from zoo.baselines.system import ClassifierSystem

WORLD = 2
DEADLINE_S = 20.0  # both ranks together; a rank that leaves the step alone hangs the other until killed


# ------------------------------------------------------------------------------- metrics reset at epoch start
def evaluated(system: ClassifierSystem, dm: PartsWorldDataModule, stage: str) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    run = trainer.validate if stage == "val" else trainer.test
    return {k: round(v, 6) for k, v in run(system, datamodule=dm, verbose=False)[0].items() if "acc" in k}


def test_evaluation_ignores_metric_states_left_from_elsewhere() -> None:
    """val/acc and test/acc of a System whose metric states hold garbage (update_count 0, as memory shared with
    spawned ranks left them) are a fresh System's; the garbage tensors are not written into."""
    dm = PartsWorldDataModule(num_train=8, num_val=32, num_test=32, batch_size=16)
    torch.manual_seed(0)
    fresh = ClassifierSystem("baseline_tinycnn", num_classes=6)
    dirty = ClassifierSystem("baseline_tinycnn", num_classes=6)
    dirty.load_state_dict(fresh.state_dict())
    left: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, metric in dirty.metrics.items():
        for name in metric._defaults:
            state = getattr(metric, name)
            if torch.is_tensor(state):
                garbage = state + 37  # counts of samples no epoch of this run saw
                setattr(metric, name, garbage)
                left.append((garbage, garbage.clone()))
    assert left
    for stage in ("val", "test"):
        assert evaluated(dirty, dm, stage) == evaluated(fresh, dm, stage)
    assert all(torch.equal(now, then) for now, then in left)  # the states' old tensors: no update landed there


# ---------------------------------------------------------------------------- nonfinite_loss="skip" under DDP
class NaNOnRankOne(nn.Module):
    """Cross-entropy plus a term that is NaN on rank 1 while `nan` is set, 0 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.nan = True

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bad = float("nan") if self.nan and torch.distributed.get_rank() == 1 else 0.0
        return {"loss_task": F.cross_entropy(out["logits"], batch["label"]), "loss_bad": torch.tensor(bad)}


class TrainingStep(nn.Module):
    """What Lightning's DDP wrapper calls: the System's training step (DDP all-reduces its loss's gradients)."""

    def __init__(self, system: ClassifierSystem) -> None:
        super().__init__()
        self.system = system

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.system.training_step(batch, 0)


def skip_on_one_rank(shard: list[int]) -> dict[str, Any]:
    """One step whose loss is NaN on rank 1, then one finite step, through DDP: what each rank returns, whether the
    optimiser changed parameters or BatchNorm statistics, and the warnings."""
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    loss = NaNOnRankOne()
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, nonfinite_loss="skip", loss=loss)
    system._trainer = types.SimpleNamespace(world_size=WORLD, global_rank=rank, global_step=5, current_epoch=1)
    system.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    ddp = nn.parallel.DistributedDataParallel(TrainingStep(system))
    optimizer = torch.optim.SGD(system.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(4, 3, 64, 64, generator=generator), "label": torch.tensor(shard)}
    state = {k: v.clone() for k, v in system.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = ddp(batch)
        skipped.backward()
        system.on_before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        unchanged = not optimizer.state and all(torch.equal(v, state[k]) for k, v in system.state_dict().items())
        loss.nan = False
        finite = ddp(batch)
        finite.backward()
        system.on_before_optimizer_step(optimizer)
        stepped = all(p.grad is not None for p in system.parameters())
        optimizer.step()
    return {"skipped": None if skipped is None else float(skipped), "unchanged": unchanged,
            "finite": float(finite), "stepped": stepped,
            "moved": not all(torch.equal(v, state[k]) for k, v in system.state_dict().items()),
            "warnings": [str(w.message) for w in caught if "Non-finite" in str(w.message)]}


def test_a_nan_on_one_rank_skips_the_batch_on_every_rank(tmp_path: Path) -> None:
    ranks = gloo_ranks(tmp_path, skip_on_one_rank, [[0, 1, 2, 3], [4, 5, 0, 1]], deadline_s=DEADLINE_S)
    for rank, result in enumerate(ranks):
        assert result["skipped"] == 0.0, rank  # a finite zero on both ranks, so DDP's all-reduce ran
        assert result["unchanged"], rank  # no parameter, momentum or BatchNorm statistic moved
        assert result["finite"] > 0 and result["stepped"] and result["moved"], rank  # the next batch trains
    assert len(ranks[1]["warnings"]) == 1 and "on rank 1 at global step 5, epoch 1" in ranks[1]["warnings"][0]
    assert "loss_bad=nan" in ranks[1]["warnings"][0]
    assert ranks[0]["warnings"] == ["Non-finite training loss on rank(s) [1] at global step 5, epoch 1, batch 0; "
                                    "batch skipped on every rank (nonfinite_loss='skip')."]


def ddp_step_parts(loss: nn.Module, shard: list[int], **kwargs: Any) -> tuple[ClassifierSystem, nn.Module,
                                                                           torch.optim.Optimizer, dict[str, Any]]:
    """On a gloo rank: a tiny CNN System with `loss` behind a stub trainer, its DDP-wrapped training step, an SGD
    optimiser and a batch of the rank's `shard` labels (the same images on every rank)."""
    torch.manual_seed(0)
    system = ClassifierSystem("baseline_tinycnn", num_classes=6, loss=loss, **kwargs)
    system._trainer = types.SimpleNamespace(world_size=WORLD, global_rank=torch.distributed.get_rank(),
                                            global_step=5, current_epoch=1)
    system.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    ddp = nn.parallel.DistributedDataParallel(TrainingStep(system))
    batch = {"image": torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
             "label": torch.tensor(shard)}
    return system, ddp, torch.optim.SGD(system.parameters(), lr=0.1), batch


def skip_inside_a_window(shard: list[int]) -> dict[str, Any]:
    """An accumulation window of a finite batch, then one whose loss is NaN on rank 1, through DDP: whether the
    optimiser steps on the finite batch's gradients (as one process does: the skipped batch adds nothing)."""
    loss = NaNOnRankOne()
    system, ddp, optimizer, batch = ddp_step_parts(loss, shard, nonfinite_loss="skip")
    before = [p.detach().clone() for p in system.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss.nan = False
        ddp(batch).backward()  # the window's first batch: kept
        kept = [p.grad.clone() for p in system.parameters()]
        loss.nan = True
        ddp(batch).backward()  # its last: skipped on every rank
        system.on_before_optimizer_step(optimizer)
        grads = [p.grad for p in system.parameters()]
        optimizer.step()
    return {"kept_gradients": all(g is not None and torch.equal(g, k) for g, k in zip(grads, kept)),
            "moved": not all(torch.equal(p, b) for p, b in zip(system.parameters(), before))}


def test_a_skipped_last_batch_keeps_its_windows_other_batches(tmp_path: Path) -> None:
    """accumulate_grad_batches > 1 under DDP: a NaN on one rank in a window's last batch dropped the gradients of
    the whole window on every rank (the parameters did not move), where one process steps on the batches it kept."""
    ranks = gloo_ranks(tmp_path, skip_inside_a_window, [[0, 1, 2, 3], [4, 5, 0, 1]], deadline_s=DEADLINE_S)
    assert all(result == {"kept_gradients": True, "moved": True} for result in ranks), ranks


class NaNGradientOnRankOne(NaNOnRankOne):
    """NaNOnRankOne's NaN with a gradient: the logits times NaN, on rank 1 while `nan` is set."""

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = super().forward(out, batch)
        return {**terms, "loss_bad": out["logits"].sum() * terms["loss_bad"]}


def raise_on_one_rank(shard: list[int]) -> str | None:
    """Two steps under nonfinite_loss="raise" whose first loss is NaN on rank 1, through DDP: each rank's error."""
    system, ddp, optimizer, batch = ddp_step_parts(NaNGradientOnRankOne(), shard)
    for _ in range(2):  # the NaN on rank 1 reaches rank 0's weights through the gradient all-reduce
        ddp(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        system.loss.nan = False
    try:
        system.check_finite_losses()
    except FloatingPointError as error:
        return str(error)
    return None


def test_a_nan_under_ddp_is_named_with_its_rank(tmp_path: Path) -> None:
    """Under DDP, rank 0's error (what Lightning shows) named its own first NaN, a step after rank 1's, spread by
    the gradient all-reduce, as if it were the first: each rank's error names its rank and says so."""
    ranks = gloo_ranks(tmp_path, raise_on_one_rank, [[0, 1, 2, 3], [4, 5, 0, 1]], deadline_s=DEADLINE_S)
    for rank, message in enumerate(ranks):
        assert message is not None and f"Non-finite training loss on rank {rank} at" in message, (rank, message)
        assert "the first may be another rank's" in message
    assert "loss_bad=nan" in ranks[1] and "loss_task=nan" in ranks[0]  # rank 0's first: the NaN weights spread
