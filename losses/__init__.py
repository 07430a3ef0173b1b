"""Loss modules, one file per family: ``forward(out, batch) -> {"loss_<term>": tensor}``, summed and logged by
the engine. `losses.baselines.ClassificationLoss` is the task term every classifier shares.

`check_weight` (and `check_fraction` for shares in [0, 1]) is the one check of every loss's weights (lambdas,
coefficients), called in each loss's `__init__`: a bad value is refused when the System is built, before
`train.py fit` moves an earlier run to stale/."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def check_weight(owner: str, name: str, value: Any, term: str, *, sign: int = 1, zero_off: bool = True) -> Any:
    """`value` unchanged if it is a finite real number of the sign `sign` (+1: >= 0; -1: <= 0; 0 is valid either
    way: the opaque twins and ablations turn a term off with it); else a ValueError naming `owner` (the loss class),
    the argument and the value, and what it would do.

    A negative weight silently trains the opposite objective (it maximises `term`), and a NaN or infinite one stops
    training at its first step, after an earlier run was moved aside: both are refused here, at construction.

    Args:
        owner: the loss class's name; name: the argument (e.g. "weight", "rule_weights[1]").
        term: what the weight multiplies, for the message (e.g. "the concept BCE").
        sign: -1 for a coefficient whose paper value is negative (ProtoPNet's separation, -0.08: it pushes `term`
            up); a positive one would then be the opposite objective.
        zero_off: 0 turns the term off (the message says so); False for a weight inside a term (a BCE's weight of
            positives, a rule's share of a penalty).
    """
    where, off = f"{owner} {name}={value!r}", ", or 0 to turn the term off" if zero_off else ""
    number = value.item() if isinstance(value, torch.Tensor) and value.ndim == 0 else value  # a 0-d tensor: its value
    if not _finite_real(number):
        bound = "<= 0" if sign < 0 else ">= 0"
        raise ValueError(f"{where}: {name} weighs {term} and must be a finite real number {bound}; a NaN or infinite "
                         f"weight makes the loss non-finite at the first step. Give a finite number {bound}{off}.")
    if sign * number < 0:
        if sign < 0:
            raise ValueError(f"{where}: {name} weighs {term} and must be <= 0 (the paper's value is negative: it "
                             f"pushes {term} up); a positive value pulls it down, the opposite objective. Give a "
                             f"value <= 0{off}.")
        raise ValueError(f"{where}: {name} weighs {term} and must be >= 0; a negative weight maximises {term}, "
                         f"training the opposite objective. Give a value >= 0{off}.")
    return value


def check_weights(owner: str, name: str, values: Any, term: str, **kwargs: Any) -> Any:
    """`values` unchanged if each entry passes `check_weight`: one number, or one per item (a list, a tensor or an
    array: CBM's weight per concept, often computed from the data's class balance), an entry named `name[k]` in
    the message. None passes. Only for a loss that applies one weight per item (a single-number weight takes
    `check_weight`, which refuses a list)."""
    if values is None or isinstance(values, numbers.Real) or (isinstance(values, torch.Tensor) and values.ndim == 0):
        return values if values is None else check_weight(owner, name, values, term, **kwargs)
    for k, value in enumerate(torch.as_tensor(values, dtype=torch.float64).flatten().tolist()):
        check_weight(owner, f"{name}[{k}]", value, term, **kwargs)
    return values


def check_fraction(owner: str, name: str, value: Any, meaning: str) -> Any:
    """`value` unchanged if it is a real number in [0, 1] (a mixing share, a moving average's momentum, a label
    smoothing); else a ValueError naming `owner`, the argument, the value and `meaning` (what it is, and what a
    value outside [0, 1] would do)."""
    if not _finite_real(value) or not 0 <= value <= 1:
        raise ValueError(f"{owner} {name}={value!r}: {name} is {meaning}, and must be a number in [0, 1].")
    return value


def _finite_real(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
