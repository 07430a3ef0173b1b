"""Input, label and batch checks shared by every model and System: one clear error per kind of bad input.

Checks that would read device values (NaN scans, label ranges) run only on CPU tensors, where they cost no
host-device synchronisation; on an accelerator a bad value surfaces as the non-finite-loss error instead.
"""

from __future__ import annotations

import difflib
import inspect
import operator
from typing import Any

import torch
import torch.nn as nn

_KINDS = {"float": torch.Tensor.is_floating_point, "long": lambda t: t.dtype == torch.long}


def check_input(owner: str, x: Any, shape: tuple[int | str | None, ...], what: str = "tensors",
                kind: str = "float", like: nn.Module | None = None, ids_below: int | None = None) -> None:
    """Raise naming `owner` when `x` is not a tensor of `shape` and dtype `kind` ("float" or "long").

    `shape` lists each dimension: an int must match, a str (e.g. "B", "H") or None accepts any size; the message
    spells the expected shape with those names: "SeriesCNN expects series of shape (B, 1, T); got ...". `like`:
    float inputs must also have the dtype of this module's parameters (float64 into a float32 model fails deep in a
    convolution otherwise), unless autocast casts them (any float dtype but float64). `ids_below`: integer ids
    (token ids, class ids) must lie in [0, ids_below), checked on CPU tensors only (no device read)."""
    dtype_ok = isinstance(x, torch.Tensor) and _KINDS[kind](x)
    ok = (dtype_ok and x.ndim == len(shape)
          and all(not isinstance(want, int) or got == want for got, want in zip(x.shape, shape)))
    if not ok:
        expected = ", ".join(str(d) if d is not None else "_" for d in shape)
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        # the dtype named only when it is what is wrong (a right dtype "expected" read as the mistake)
        raise ValueError(f"{owner} expects {what} of shape ({expected}); got {got}"
                         f"{'' if dtype_ok else f' (dtype {kind} expected)'}.")
    span = None if ids_below is None else ids_out_of_range(x, 0, ids_below - 1)
    if span is not None:
        raise ValueError(f"{owner} expects {what} in [0, {ids_below}); got ids from {span[0]} to {span[1]}.")
    if like is not None and kind == "float":
        dtype = x.dtype
        for parameter in like.parameters():  # the first float parameter's (a loop: the compiler traces it)
            if parameter.is_floating_point():
                dtype = parameter.dtype
                break
        # autocast casts any float input but float64 (torch leaves float64 alone) to its own dtype
        if x.dtype != dtype and (x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"{owner} expects {what} of dtype {dtype} (its parameters'); got {x.dtype}. Convert the "
                             f"inputs (x.to({dtype})) or the model (model.to({x.dtype})), or run under autocast.")


def check_class_ids(labels: torch.Tensor, num_classes: int, data_classes: int | None = None) -> None:
    """Labels must lie in [0, num_classes), the model's classes: a clear error instead of an index error inside the
    loss (CPU only). `data_classes`: the data's count, named when a model_kwargs num_classes overrode it."""
    span = ids_out_of_range(labels, 0, num_classes - 1)
    if span is not None:
        why = (f"the model has {num_classes} classes (model_kwargs num_classes={num_classes} overrides the data's "
               f"{data_classes})" if data_classes is not None and data_classes != num_classes
               else "num_classes does not match the data")
        raise ValueError(f"The batch's labels span [{span[0]}, {span[1]}], outside [0, {num_classes}): {why}.")


def check_binary_concepts(concepts: torch.Tensor, name: str = "concepts", index: torch.Tensor | None = None) -> None:
    """Raise unless every concept label is 0 or 1 (CPU tensors only, not inside a compiled graph; on an accelerator
    the System defers the check, `ZooSystem.defer_check`). Soft or uncertain labels (0.5, 0.75, ...) would be read as
    present by the concept metrics and interventions (`concepts.bool()`) while the BCE trains towards the soft
    value, so they are refused instead of silently misread."""
    if concepts.device.type != "cpu" or torch.compiler.is_compiling():
        return
    binary = (concepts == 0) | (concepts == 1)  # (B, K)
    if binary.all():
        return
    bad = (~binary).nonzero()[0].tolist()  # the first (sample, concept) that is neither 0 nor 1
    sample = f"sample {bad[0]}" + (f" (dataset index {int(index[bad[0]])})" if index is not None else "")
    raise ValueError(f"{name} must hold hard concept labels, 0 or 1; {sample}, concept {bad[1]} is "
                     f"{concepts[tuple(bad)].item()!r}. Binarise soft or uncertain labels in the data (CUB: "
                     "`read_cub_attributes` votes them per class) before training a concept bottleneck.")


def ids_out_of_range(ids: torch.Tensor, low: int | None, high: int) -> tuple[int, int] | None:
    """(min, max) of integer `ids` when some lie outside [low, high] (`low` None: no lower bound), else None; for
    the caller's own message. CPU tensors only (None on an accelerator: no device read), and not inside a compiled
    graph (a host read would split it)."""
    if ids.device.type != "cpu" or not ids.numel() or torch.compiler.is_compiling():
        return None
    smallest, largest = int(ids.min()), int(ids.max())
    return (smallest, largest) if (low is not None and smallest < low) or largest > high else None


def batch_field(batch: Any, key: str) -> Any:
    """`batch[key]` with an error that lists what the batch does hold; float fields must be finite (CPU)."""
    if not isinstance(batch, dict):
        raise TypeError(f"Batches must be dicts of tensors; got {type(batch).__name__}.")
    if key not in batch:
        raise KeyError(f"The batch has no {key!r}; it holds {sorted(batch)}. Set input_key/target_key to match.")
    value = batch[key]
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == "cpu":
        check_finite(value, key, batch.get("index"))
    return value


def check_on_host(ok: torch.Tensor, message: str) -> None:
    """ValueError(message) unless `ok`, a bool tensor on the CPU, holds (a host read: no device waits for it)."""
    if not bool(ok):
        raise ValueError(message)


def check_finite(value: torch.Tensor, name: str, index: torch.Tensor | None = None) -> None:
    """Raise naming the samples (dataset indices where known) whose `value` holds NaN or inf (CPU only)."""
    if value.device.type != "cpu" or torch.isfinite(value).all():
        return
    bad = (~torch.isfinite(value.flatten(1) if value.ndim > 1 else value[:, None])).any(1).nonzero().flatten()
    where = (f"dataset indices {index[bad].tolist()[:8]}" if isinstance(index, torch.Tensor)
             else f"batch positions {bad.tolist()[:8]}")
    raise ValueError(f"The batch's {name!r} holds NaN or inf values ({where}); fix or filter those samples.")


def close_names(name: str, names: list[str] | tuple[str, ...], n: int = 5, cutoff: float = 0.4) -> list[str]:
    """The registered `names` closest to a mistyped `name`, ignoring case ("ICNN_TinyCNN" finds "icnn_tinycnn")."""
    by_lower: dict[str, str] = {}
    for known in names:
        by_lower.setdefault(known.lower(), known)
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=cutoff)]


def check_new_head(owner: nn.Module, num_classes: Any, global_pool: str | None = None, pool_type: str = "") -> None:
    """`reset_classifier(num_classes, global_pool=None)` takes a class count >= 1: the zoo's models are classifiers
    whose explanations read their head, so timm's `reset_classifier(0)` (drop the head) is refused (pointing to
    `forward_features` where the model has one). timm's `global_pool` may be None or the pool the head has,
    `pool_type` ("avg", "max", "catavgmax", ...; "" where the head pools nothing): the pooling is part of what the
    explanations read, so another one is refused by name. Called before the model changes anything: a refused
    reset leaves the model as it was."""
    name = type(owner).__name__
    if not positive_int(num_classes):
        features = ("; use forward_features for features alone" if callable(getattr(owner, "forward_features", None))
                    else "")
        raise ValueError(f"{name}.reset_classifier needs num_classes >= 1; got {num_classes!r} (the zoo keeps a head "
                         f"to explain{features}).")
    if global_pool is not None and global_pool != pool_type:
        raise ValueError(f"{name}.reset_classifier(global_pool={global_pool!r}): its head pools with "
                         f"{pool_type!r}" + (" (no global pool)" if not pool_type else "") + f" and keeps it; pass "
                         f"global_pool=None or {pool_type!r}.")


def positive_int(value: Any) -> bool:
    """An integer >= 1 of any integer type (Python, NumPy), not a bool or a float."""
    try:
        return not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        return False


def keyword_arguments(obj: Any) -> list[str]:
    """The keyword arguments a class (its own and, where it takes **kwargs, its parents') or a function accepts: the
    candidates of a did-you-mean for a mistyped argument."""
    names: list[str] = []
    for klass in inspect.getmro(obj) if inspect.isclass(obj) else [obj]:
        init = klass.__init__ if inspect.isclass(klass) else klass
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))
