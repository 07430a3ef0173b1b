"""`compile` (ZooSystem init arg, `--model.init_args.compile=true`): every family's training step gives the eager
step's loss compiled. Graph capture is checked for every family with the "aot_eager" backend (dynamo + AOT
autograd, no code generation: seconds, and the same random streams as eager); inductor, the default backend of
`compile=True`, compiles the plain classifier (its own random streams would differ from eager in models that draw
noise: L2X's Gumbel, dropout). torchvision's detectors compile their backbone only (their RPN and RoI sampling read
data-dependent shapes), with a warning."""

from __future__ import annotations

import pytest
import torch

from benchmarks.op_counts import FAMILIES, build

COMPILABLE = [family for family in FAMILIES if family != "aog_rcnn"]


def losses(family: str, compile: bool | str, steps: int = 2) -> list[torch.Tensor]:
    """The losses of `steps` training steps (forward, loss, backward, optimiser step) from the seed-0 model."""
    torch.manual_seed(0)
    system, batch = build(family, batch_size=4, extra=[f"--model.init_args.compile={compile}"])
    system.train()
    system.on_train_epoch_start()
    optimizer = system.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    torch.manual_seed(1)
    values = []
    for _ in range(steps):
        loss = system.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.detach())
    return values


# Families whose compiled model splits into several graphs, and why. Dynamo does not trace nn.LSTM modules (its
# `allow_rnn` crashes AOT autograd on a sequence LSTM in torch 2.14): the textual LSTMs run eagerly between graphs.
GRAPH_BREAKS = {"textual": "Attempted to wrap RNN, GRU, or LSTM"}


@pytest.mark.parametrize("family", COMPILABLE)
def test_compiled_step_gives_the_eager_loss(family: str) -> None:
    """The same losses, and the model compiles to one graph: a graph break would cut CUDA graphs and fusions short
    (and may hide a host read)."""
    torch._dynamo.reset()
    eager = losses(family, False)
    torch._dynamo.utils.counters.clear()
    compiled = losses(family, "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    if family in GRAPH_BREAKS:
        assert any(GRAPH_BREAKS[family] in reason for reason in breaks), breaks
    else:
        assert not breaks, breaks


def test_inductor_compiles_the_default_way() -> None:
    torch._dynamo.reset()
    eager, compiled = losses("baselines", False), losses("baselines", True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_compile_takes_a_backend_or_an_inductor_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile="reduce-overhead"` (CUDA graphs on a GPU) and the other inductor modes reach torch.compile as its
    `mode`; any other string is a backend."""
    from zoo.engine.system import COMPILE_MODES, compile_model

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: calls.append(options))
    for how in ("reduce-overhead", "max-autotune", "aot_eager", "cudagraphs", "inductor"):
        compile_model(torch.nn.Linear(2, 2), how)
    assert calls == [{"mode": "reduce-overhead"}, {"mode": "max-autotune"}, {"backend": "aot_eager"},
                     {"backend": "cudagraphs"}, {"backend": "inductor"}]
    assert set(COMPILE_MODES) <= set(torch._inductor.list_mode_options()) | {"default"}


def test_a_detector_compiles_its_backbone_with_a_warning() -> None:
    """torchvision's RPN and RoI sampling read data-dependent shapes: a detector compiles its backbone only, and
    its compiled step gives the eager loss."""
    from zoo.aog_rcnn.system import AOGRCNNSystem

    with pytest.warns(UserWarning, match="torchvision detector.*backbone is compiled"):
        system = AOGRCNNSystem(compile=True)
    assert system.model._compiled_call_impl is None and system.model.backbone._compiled_call_impl is not None
    torch._dynamo.reset()
    eager, compiled = losses("aog_rcnn", False), losses("aog_rcnn", "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
