"""Counter-based randomness: values that are a function of a seed and a key (a sample's dataset index, a feature's
bit pattern) alone, vectorised on the key's device, the global random stream untouched. An evaluation that draws
from these gives each sample the same draw in any batch, position or number of processes (torch has no per-sample
seeded draw: one generator per sample would be a Python loop).

The integers are int64 tensors holding 32-bit values: torch has no unsigned 32-bit arithmetic on every device."""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF


def mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x * factor mod 2^32 for int64 x in [0, 2^32) and a 32-bit factor, in halves so no int64 product overflows."""
    low = (x & 0xFFFF) * factor
    high = (((x >> 16) * factor) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser (fmix32): a bijection of 32-bit integers (int64 in [0, 2^32)) that spreads every bit."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def keyed_normal(keys: torch.Tensor, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(B, *shape) standard Gaussian values on `keys`' device, row b a function of (`seed`, `keys[b]`) alone:
    two hashed 32-bit uniforms per value (counter = the value's position), Box-Muller. keys: (B,) integers.

    The counter is added to the row's hash before mixing: XOR-ing two hashes of small integers (the key's and the
    counter's) gave 0 wherever the key equalled 2 x counter, so one value of every such row was a 6.8-sigma outlier
    (the `random` reference map's peak pinned at pixel key // 2 in 17 % of maps)."""
    count = math.prod(shape)
    counter = torch.arange(count, device=keys.device)  # (n,)
    row = mix32((keys.long() & MASK32) ^ mix32(torch.tensor(seed & MASK32, device=keys.device)))[:, None]  # (B, 1)
    first, second = mix32((row + 2 * counter) & MASK32), mix32((row + 2 * counter + 1) & MASK32)  # (B, n) each
    u1 = (first.float() + 0.5) / 2**32  # (0, 1]: the log is finite (float32: every device has it)
    u2 = second.float() / 2**32
    normal = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)  # (B, n)
    return normal.reshape(len(keys), *shape)
