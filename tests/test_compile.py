"""`compile` (ZooSystem init arg, `--model.init_args.compile=true`): every family's training step gives the eager
step's loss compiled. Graph capture is checked for every family with the "aot_eager" backend (dynamo + AOT
autograd, no code generation: seconds, and the same random streams as eager); inductor, the default backend of
`compile=True`, compiles the plain classifier (its own random streams would differ from eager in models that draw
noise: L2X's Gumbel, dropout). torchvision's detectors compile their backbone only (their RPN and RoI sampling read
data-dependent shapes), with a warning."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import zoo
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


# Families whose compiled model splits into several graphs, and why. AOT autograd cannot trace a sequence LSTM in
# torch 2.14 (dynamo's `allow_rnn` crashes it): `zoo.layers.LSTM`'s forward is `torch.compiler.disable`d, so the
# textual model's teacher-forced LSTMs run eagerly between graphs (its decoding steps are compiled: see below).
GRAPH_BREAKS = {"textual": "torch.compiler.disable"}


@pytest.mark.parametrize("family", COMPILABLE)
def test_compiled_step_gives_the_eager_loss(family: str) -> None:
    """The same losses, dynamo captured the step (`compile` wraps the model's `__call__`: a System that called other
    methods of its model, as CBM's `encode` / `decode` did, compiled nothing and ran eagerly without a word), and
    the model compiles to one graph: a graph break would cut CUDA graphs and fusions short (and may hide a host
    read)."""
    torch._dynamo.reset()
    eager = losses(family, False)
    torch._dynamo.utils.counters.clear()
    compiled = losses(family, "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, dict(torch._dynamo.utils.counters["frames"])
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    if family in GRAPH_BREAKS:
        assert any(GRAPH_BREAKS[family] in reason for reason in breaks), breaks
    else:
        assert not breaks, breaks


def test_the_compiled_textual_sampler_is_one_graph() -> None:
    """REINFORCE's sampler (every decoding step's two `torch.lstm_cell`s, max_len words) is traced into one graph,
    which `compile=cudagraphs` / `reduce-overhead` can replay as one CUDA graph: dynamo refuses to wrap any `nn.LSTM`
    (and broke the graph at every word where the decoder read its weights), and `zoo.layers.LSTM` is none."""
    from zoo.engine import system as engine

    cells_per_graph = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        cells_per_graph.append(sum(node.target is torch.lstm_cell for node in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    system, batch = build("textual", batch_size=4)
    engine.compile_model(system.model, counting)  # a backend callable, as torch.compile takes it
    system.train()
    system.training_step(batch, 0)
    generator = system.model.generator
    assert max(cells_per_graph) == 2 * generator.max_len, cells_per_graph
    assert isinstance(generator.word_lstm, torch.nn.RNNBase) and not isinstance(generator.word_lstm, torch.nn.LSTM)


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
    eager = losses("aog_rcnn", False)
    torch._dynamo.utils.counters.clear()
    compiled = losses("aog_rcnn", "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the backbone was captured, not run eagerly


def test_a_compiled_selector_takes_batches_of_another_size() -> None:
    """The Concrete sample drew torch.rand of the batch size, which dynamo could not trace once the size became
    symbolic: a compiled L2X step failed on an epoch's last, smaller batch."""
    torch.manual_seed(0)
    model = zoo.create_model("l2x_vector", num_classes=2, num_features=10, k=3).train()
    compiled = torch.compile(model, backend="aot_eager")
    for batch in (8, 5, 7):
        compiled(torch.randn(batch, 10))["logits"].sum().backward()
