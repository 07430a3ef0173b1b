"""Tiny torch.distributed helpers for online statistics kept inside models (no-ops in a single process), and a gather
for metric states that some ranks hold none of."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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

