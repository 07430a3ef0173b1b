"""Tiny torch.distributed helpers for online statistics kept inside models (no-ops in a single process), a gather
for metric states that some ranks hold none of, and `rank_local`: work one rank does alone under a process group."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors


_rank_local_depth = 0  # how many `rank_local` blocks this process is inside


def is_distributed() -> bool:
    """Whether a process group exists and this process is not inside a `rank_local` block."""
    return dist.is_available() and dist.is_initialized() and _rank_local_depth == 0


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """Inside it this process works as if it were alone, though a process group exists: for work one rank does
    while the others wait elsewhere (`compare`'s explanation report on global rank zero, the other ranks at a
    barrier). Every torchmetrics Metric computes over this process's states only, whether it was built inside the
    block or before it, and `is_distributed` (so `all_reduce_`, `global_log_mean_exp`) says False. A Metric's
    compute() otherwise gathers its states from every rank whenever a group exists (under `ddp` the group outlives
    `fit`), and that gather met the other ranks' barrier: gloo "Connection closed by peer", or a hang.

    `Metric.sync` (through which compute(), forward() and sync_context() gather, whatever `distributed_available_fn`
    a metric captured when built) is swapped for one that never syncs while the block runs and restored after it,
    so the metrics of the Systems (DDP validation) sync as before outside it."""
    global _rank_local_depth
    syncing = Metric.sync  # the class's own: a block inside another restores the outer block's

    @functools.wraps(syncing)
    def local_sync(self: Metric, dist_sync_fn: Callable | None = None, process_group: Any | None = None,
                   should_sync: bool = True, distributed_available: Callable | None = None) -> None:
        # whatever the caller asks: should_sync=False leaves the states local (and unsync then restores nothing)
        syncing(self, dist_sync_fn, process_group, should_sync=False, distributed_available=distributed_available)

    Metric.sync = local_sync  # type: ignore[method-assign]
    _rank_local_depth += 1
    try:
        yield
    finally:
        _rank_local_depth -= 1
        Metric.sync = syncing  # type: ignore[method-assign]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") across processes; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def global_log_mean_exp(local_lme: torch.Tensor, local_count: int) -> torch.Tensor:
    """log mean exp over all processes' samples, from each process's log-mean-exp over `local_count` samples."""
    if not is_distributed():
        return local_lme
    peak = all_reduce_(local_lme.clone(), "max")
    weighted = all_reduce_(local_count * (local_lme - peak).exp(), "sum")
    total = all_reduce_(torch.tensor(float(local_count), device=local_lme.device), "sum")
    return peak + (weighted / total).log()


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8,
           torch.int16, torch.int32, torch.int64)
_MAX_DIMS = 8


def gather_allowing_empty_ranks(result: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
    """torchmetrics' `gather_all_tensors` for "cat" states of which some ranks hold nothing: torchmetrics stands a
    1-D float `tensor([])` in for a rank's empty list, which meets (n, F, K) or bool tensors of the other ranks in a
    mismatched collective (gloo: "Received data size doesn't match expected size"). Ranks first share their dtype
    and shape; a rank without data then gathers an empty (0, *rest) tensor of the dtype and trailing shape of the
    first rank that has data. Pass it as the Metric's `dist_sync_fn`."""
    group = group if group is not None else dist.group.WORLD
    if result.numel() and (result.ndim > _MAX_DIMS or result.dtype not in _DTYPES):
        raise ValueError(f"Cannot describe a {result.dtype} state of {result.ndim} dims to the other ranks.")
    meta = torch.zeros(3 + _MAX_DIMS, dtype=torch.long)  # has data, dtype, ndim, shape
    if result.numel():
        meta[:3] = torch.tensor([1, _DTYPES.index(result.dtype), result.ndim])
        meta[3:3 + result.ndim] = torch.tensor(result.shape)
    meta = meta.to(result.device)
    metas = [torch.zeros_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(metas, meta, group=group)
    holders = [m.tolist() for m in metas if m[0] == 1]
    if result.numel() == 0 and holders:
        _, dtype, ndim, *shape = holders[0]
        result = torch.zeros((0, *shape[1:ndim]), dtype=_DTYPES[dtype], device=result.device)
    return gather_all_tensors(result, group)


class CatStateMetric(Metric):
    """A Metric of "cat" states that syncs when some ranks hold none (an unrepeated evaluation sampler can leave a
    rank without samples): `gather_allowing_empty_ranks` for every sync, `compute`'s and also an explicit `sync` /
    `sync_context` that names no gather function (torchmetrics would then use plain `gather_all_tensors`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"dist_sync_fn": gather_allowing_empty_ranks, **kwargs})

    def sync(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None, should_sync: bool = True,
             distributed_available: Callable | None = None) -> None:
        super().sync(dist_sync_fn or self.dist_sync_fn, process_group, should_sync, distributed_available)


def updated_on_any_rank(metrics: list[Metric], device: torch.device | str) -> list[bool]:
    """Whether each metric was updated on some rank (one all-reduce of the update counts under a process group):
    what decides whether to gather a metric's states must be the same on every rank, or a rank that ran no batch
    skips the gather the others enter and they wait for it forever."""
    updates = torch.tensor([metric.update_count for metric in metrics], device=device)  # (M,)
    return [bool(count) for count in all_reduce_(updates, "max").tolist()]


def end_spawned_process_group(trainer: Any) -> None:
    """In a process Lightning spawned for one `fit` / `validate` / `test` / `predict` (`ddp_spawn`,
    `ddp_notebook`), meet the other ranks and destroy the process group before the process exits. Lightning
    destroys only NCCL groups at exit; a gloo group left to interpreter shutdown let a rank abort now and then
    ("terminate called without an active exception", SIGABRT) after its work was done, failing the whole run. Other
    launchers keep their group: the next `fit` / `test` of the same script uses it."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if is_distributed() and isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        dist.barrier()  # no rank leaves while another is still in a collective
        dist.destroy_process_group()

