"""aten ops and host-device synchronisations per training step, per family, counted by `torch.profiler` on the CPU.

    python -m benchmarks.op_counts [--families baselines icnn ...] [--batch_size 16]

On a GPU these small models are bound by how many kernels a step launches and by every point where the host waits
for the device; the CPU profile counts the same ops without needing a GPU. A training step is the System's own
work: `training_step` (forward, loss dict, sum, non-finite policy, logging calls) + backward + optimiser step, on
one batch of the family's config (built through the CLI as `train.py fit` would), after two warm-up steps. Not
Lightning's loop around it. `syncs` counts `aten::_local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)` and
`if t:` run) and `aten::nonzero` (an output shape read from the data).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import torch

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")

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


def profile_step(step: Callable[[], None], warmup: int = 2, with_stack: bool = False) -> torch.profiler.profile:
    """The profile of one call of `step` after `warmup` untimed calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(warmup):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=with_stack) as prof:
            step()
    return prof


def count(prof: torch.profiler.profile) -> dict[str, int]:
    """aten ops (every event named aten::*, nested calls included) and synchronising ops in a profile."""
    names = [event.name for event in prof.events()]
    return {"aten_ops": sum(name.startswith("aten::") for name in names),
            "syncs": sum(name in SYNC_OPS for name in names)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{'family':<16}{'aten ops':>10}{'syncs':>8}")
    for family in args.families:
        system, batch = build(family, args.batch_size)
        row = {"family": family, **count(profile_step(training_step(system, batch)))}
        print(f"{family:<16}{row['aten_ops']:>10}{row['syncs']:>8}")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
