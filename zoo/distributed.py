"""Tiny torch.distributed helpers for online statistics kept inside models (no-ops in a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
