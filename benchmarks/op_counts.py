"""aten ops and host-device synchronisations per training step, per family, counted by `torch.profiler` on the CPU.

    python -m benchmarks.op_counts [--families baselines icnn ...] [--batch_size 16]

On a GPU these small models are bound by how many kernels a step launches and by every point where the host waits
for the device; the CPU profile counts the same ops without needing a GPU. `aten ops` counts every aten event,
nested calls included (a CPU convolution's dispatch chain is a dozen); `kernels` counts the leaf ops less views,
metadata and bare allocations (`is_kernel`), closer to what a GPU launches. A training step is the System's own
work: `training_step` (forward, loss dict, sum, non-finite policy, logging calls) + backward + optimiser step, on
one batch of the family's config (built through the CLI as `train.py fit` would), after two warm-up steps. Not
Lightning's loop around it. `syncs` counts `aten::_local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)` and
`if t:` run) and the ops whose output shape is read from the data (`aten::nonzero`, the `unique` family,
`aten::masked_select`), but not those that are no host-device synchronisation on a GPU either (`NOT_SYNCS`):
inside the optimiser's step (its step counters live on the host),
inside `aten::_assert_async` (a device-side assertion, asynchronous on CUDA: torch.multinomial's) and inside
`zoo/checks.py` (input checks that run only on CPU tensors). `torchvision` counts those inside torchvision's
detection code (AOG R-CNN's RPN, box matching and sampling: data-dependent shapes by design).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import torch

# `.item()` and friends, and ops whose output shape is read from the data (a GPU must finish them before the host
# can allocate what follows): nonzero, unique, masked_select.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::masked_select")
NOT_SYNCS = ("Optimizer.step#", "aten::_assert_async", "zoo/checks.py(")
# aten ops that launch no kernel on a GPU: views, metadata and bare allocations.
NO_KERNEL = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "as_strided_", "expand", "expand_as", "t",
    "transpose",
    "permute", "unsqueeze", "squeeze", "select", "slice", "narrow", "alias", "detach", "lift_fresh", "unbind",
    "split", "split_with_sizes", "chunk", "unfold", "diagonal", "view_as_real", "view_as", "flatten", "contiguous",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "result_type", "size",
    "stride", "is_nonzero", "set_", "to", "type_as", "numpy_T", "_has_compatible_shallow_copy_type"))

# family -> (config, CLI overrides): one small batch of each family's synthetic world.
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "baselines": ("configs/baselines/parts_world.yaml", []),
    "icnn": ("configs/icnn/parts_world.yaml", ["--model.init_args.model_kwargs.category_assignment=argmax"]),
    "icnn_balanced": ("configs/icnn/parts_world.yaml", []),
    "l2x": ("configs/l2x/xor.yaml", []),
    "renn": ("configs/renn/rule_series.yaml", []),
    "rule_loss": ("configs/renn/parts_world_distillation.yaml", []),
    "aog_rcnn": ("configs/aog_rcnn/parts_world_scenes.yaml", []),
    "textual": ("configs/textual/explanation.yaml", ["--model.init_args.init_checkpoint=null"]),
    "cbm": ("configs/cbm/parts_world.yaml", []),  # joint CBM
    "cbm_cem": ("configs/cbm/cem.yaml", []),  # concept embeddings with RandInt
    "protopnet": ("configs/protopnet/parts_world.yaml", []),
}


def build(family: str, batch_size: int = 16, extra: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The family's System from its config (as `train.py fit` builds it) and one training batch."""
    from zoo.cli.lightning import ZooCLI

    config, overrides = FAMILIES[family]
    size = batch_size if family != "aog_rcnn" else min(batch_size, 4)
    args = ["--config", config, *overrides, f"--data.init_args.batch_size={size}",
            f"--data.init_args.num_train={4 * size}", f"--data.init_args.num_val={size}", *(extra or [])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = ZooCLI(args=args, run=False)
    data = cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return cli.model, batch


def training_step(system: Any, batch: dict[str, Any]) -> Callable[[], None]:
    """One optimiser step as Lightning's automatic optimisation runs it, without the Trainer."""
    system.train()
    system.on_train_epoch_start()
    optimizer = system.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step() -> None:
        loss = system.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        optimizer.step()

    return step


def profile_step(step: Callable[[], None], warmup: int = 2) -> torch.profiler.profile:
    """The profile (with Python call sites) of one call of `step` after `warmup` untimed calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(warmup):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
            step()
    return prof


def callers(event: Any) -> list[str]:
    """Names of the events enclosing `event`, innermost first (Python frames read "path(line): function")."""
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def has_call_sites(prof: torch.profiler.profile) -> bool:
    """Whether the profile ties aten ops to the Python code that called them. Without that, `sync_sites` cannot
    tell ours from the optimiser's or torchvision's: seen on one GPU machine (torch 2.11, CUDA present), where
    every op's call site read "?"."""
    return any(any(".py(" in name for name in callers(event)) for event in prof.events()
               if event.name.startswith("aten::"))


def sync_sites(prof: torch.profiler.profile) -> dict[str, list[str]]:
    """Synchronising ops by kind: "ours" and "torchvision", each as its innermost Python call site."""
    sites: dict[str, list[str]] = {"ours": [], "torchvision": []}
    for event in prof.events():
        if event.name not in SYNC_OPS:
            continue
        enclosing = callers(event)
        if any(name.startswith(NOT_SYNCS) or NOT_SYNCS[-1] in name for name in enclosing):
            continue
        frames = [name for name in enclosing if ".py(" in name]
        kind = "torchvision" if any("torchvision/" in name for name in frames) else "ours"
        sites[kind].append(f"{event.name} in {frames[0] if frames else '?'}")
    return sites


def is_kernel(event: Any) -> bool:
    """An aten (or torchvision) op that is no view, metadata or bare allocation and calls no other such op: what a
    GPU launches."""
    return (event.name.startswith(("aten::", "torchvision::")) and event.name not in NO_KERNEL
            and not any(is_kernel(child) or _calls_kernels(child) for child in event.cpu_children))


def _calls_kernels(event: Any) -> bool:
    return any(is_kernel(child) or _calls_kernels(child) for child in event.cpu_children)


def count(prof: torch.profiler.profile) -> dict[str, int]:
    """aten ops (every event named aten::*, nested calls included), kernels (`is_kernel`: the leaf ops, no views) and
    synchronising ops in a profile."""
    sites = sync_sites(prof)
    events = prof.events()
    return {"aten_ops": sum(event.name.startswith("aten::") for event in events),
            "kernels": sum(map(is_kernel, events)),
            "syncs": len(sites["ours"]), "torchvision_syncs": len(sites["torchvision"])}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for family in args.families:
        system, batch = build(family, args.batch_size)
        rows.append({"family": family, **count(profile_step(training_step(system, batch)))})
    print(f"{'family':<16}{'aten ops':>10}{'kernels':>9}{'syncs':>8}{'torchvision syncs':>20}")
    for row in rows:
        print(f"{row['family']:<16}{row['aten_ops']:>10}{row['kernels']:>9}{row['syncs']:>8}"
              f"{row['torchvision_syncs']:>20}")
    return rows


if __name__ == "__main__":
    main()
