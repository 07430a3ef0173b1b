"""Layers shared by several families' models (as timm keeps its own in timm/layers).

`LSTM`: torch's LSTM, safe under CPU bf16 autocast and readable by `torch.compile`. CPU autocast casts an LSTM to
bf16 and hands it to oneDNN, which builds no bf16 LSTM primitive on CPUs without native bf16 (seen on an AVX2-only
AMD EPYC: "could not create a primitive descriptor for the LSTM forward propagation primitive"). Where one tiny
probe shows that, the LSTM runs in float32 with autocast off; everywhere else (GPUs, bf16 CPUs, no autocast) it runs
torch's LSTM forward unchanged.

`cached_constant`: a builder of constant tensors (kernels, masks, index tables) cached per argument, built outside
inference mode.

`in_weights_dtype`: a head that must not run in autocast's bf16 (CBM's concept layer, ProtoPNet's add-on) reads its
input in its weights' dtype, autocast off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

Built = TypeVar("Built")


def cached_constant(build: Callable[..., Built]) -> Callable[..., Built]:
    """Cache `build(*args)` (hashable args: sizes, a device, a dtype), so a hot path builds its constant tensors once,
    not in every step, and build them outside `torch.inference_mode`: a first call under it (Lightning's validation)
    would cache inference tensors that a later training step's backward cannot save."""

    @functools.lru_cache(maxsize=256)
    @functools.wraps(build)
    def cached(*args: Any) -> Built:
        with torch.inference_mode(False):
            return build(*args)

    return cached


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, and every module's own `training` flag as it was after it, also when
    the block raises. `model.train(was_training)` set every submodule to the top's flag: a part kept in eval mode (a
    stage's frozen modules, `ZooSystem.frozen_modules`, e.g. ReNN's detectors in rule_series' `global` stage or a
    sequential CBM's concept model in its task stage, or one the user froze) came back training, and the next step
    updated its BatchNorm running statistics. For a bare model: a System's own `train()` restores its stages'
    frozen modules itself."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training  # the flag alone: `train()` would set the module's children too


@contextmanager
def in_weights_dtype(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """`x` in `module`'s weights' dtype, with autocast off inside the block: float32 under bf16 autocast (the weights
    stay float32), bf16 for a model whose weights are themselves bf16 (`model.bfloat16()`, Lightning's "bf16-true");
    a module without weights reads `x` promoted to float32 at least. For a head whose outputs must keep float32's
    resolution under autocast (concept logits ranked by AUROC, prototype distances that push makes exact)."""
    weight = next(module.parameters(), None)
    dtype = torch.promote_types(x.dtype, torch.float32) if weight is None else weight.dtype
    with torch.autocast(x.device.type, enabled=False):
        yield x.to(dtype)


@functools.cache
def cpu_bf16_lstm_supported() -> bool:
    """Whether this CPU runs an LSTM under bf16 autocast: one probe per process, its answer cached."""
    probe = nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            probe(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


def _float32(state: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if state is None else (state[0].float(), state[1].float())


class LSTM(nn.RNNBase):
    """torch's LSTM: `nn.LSTM`'s parameters, state-dict keys, cuDNN weight layout and forward (`nn.LSTM.forward`), with
    two differences.

    - Under CPU bf16 autocast on a CPU without a bf16 LSTM kernel it runs in float32 and returns float32 outputs and
      states (autocast casts them again for the next op).
    - It is an `nn.RNNBase` in LSTM mode, not an `nn.LSTM`: `torch.compile` refuses to wrap any `nn.LSTM` and breaks
      the graph wherever compiled code so much as reads one's weights, which the textual decoder does at every word
      (`torch.lstm_cell` on them). The sequence forward itself stays out of compiled graphs
      (`torch.compiler.disable`), as before: AOT autograd cannot trace a sequence LSTM in torch 2.14."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @torch.compiler.disable
    def forward(self, input: torch.Tensor | PackedSequence,  # noqa: A002
                hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if (input.data.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not cpu_bf16_lstm_supported()):
            with torch.autocast("cpu", enabled=False):
                return nn.LSTM.forward(self, input.float(), _float32(hx))
        return nn.LSTM.forward(self, input, hx)
