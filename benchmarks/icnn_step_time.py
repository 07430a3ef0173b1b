"""Train-step time of the Interpretable CNN vs its twins (lambda = 0: with the part masks, and with ordinary
layers, the paper's baseline) and the plain CNN, measured in one run.

    python -m benchmarks.icnn_step_time [--backbones tinycnn resnet18] [--rounds 7] [--steps 10]
        [--category-assignment argmax|balanced] [--device cpu|cuda]

A step is forward + loss + backward + optimiser step (+ the ICNN's online statistics). Models are timed in
interleaved rounds (A, B, C, A, B, C, ...) by `benchmarks.timing` so drift hits all equally; the table gives the
median step time per model and the ratios of medians. CPU figures are noisy: read the ratios, not the absolute
times.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import zoo
from benchmarks.devices import add_device_argument
from benchmarks.timing import interleaved_medians, ratios
from losses.baselines import ClassificationLoss
from losses.icnn import FilterPartLoss
from zoo.icnn.model import CATEGORY_ASSIGNMENTS


def make_step(model_name: str, loss: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
              **kwargs) -> Callable[[], None]:
    """One optimiser step of a fresh `model_name` (seed 0) on `batch`, on `device`."""
    torch.manual_seed(0)
    model = zoo.create_model(model_name, num_classes=6, **kwargs).to(device)
    loss.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        out = model(batch["image"])
        total = sum(loss(out, batch).values())
        if hasattr(model, "update_statistics"):
            model.update_statistics(out, batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["tinycnn", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tau-scale", type=float, default=16.0)
    parser.add_argument("--category-assignment", choices=CATEGORY_ASSIGNMENTS, default="argmax",
                        help="balanced: the parts-world configs' assignment, solved on the host before each forward")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    batch = {"image": torch.rand(args.batch_size, 3, args.image_size, args.image_size).to(device),
             "label": torch.randint(0, 6, (args.batch_size,)).to(device)}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, {args.rounds} rounds x {args.steps} steps, "
          f"category assignment {args.category_assignment}")
    print("| backbone | icnn ms | masked twin ms | ordinary twin ms | plain ms | icnn/masked twin | icnn/ordinary twin "
          "| icnn/plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for backbone in args.backbones:
        icnn_kw = {"image_size": args.image_size, "tau_scale": args.tau_scale,
                   "category_assignment": args.category_assignment}
        steps = {
            "icnn": make_step(f"icnn_{backbone}", FilterPartLoss(weight=1.0), batch, device, **icnn_kw),
            "twin": make_step(f"icnn_{backbone}", FilterPartLoss(weight=0.0), batch, device, **icnn_kw),
            "ordinary": make_step(f"icnn_{backbone}", FilterPartLoss(weight=0.0), batch, device, masks=False,
                                  **icnn_kw),
            "plain": make_step(f"baseline_{backbone}", ClassificationLoss(), batch, device),
        }
        median = interleaved_medians(steps, device, args.rounds, calls=args.steps, warmup=3)
        ms = " | ".join(f"{1e3 * median[name]:.1f}" for name in ("icnn", "twin", "ordinary", "plain"))
        icnn_over = " | ".join(f"{ratios(median, name)['icnn']:.3f}" for name in ("twin", "ordinary", "plain"))
        print(f"| {backbone} | {ms} | {icnn_over} |")
        rows.append({"backbone": backbone, **{f"{name}_ms": 1e3 * m for name, m in median.items()}})
    return rows


if __name__ == "__main__":
    main()
