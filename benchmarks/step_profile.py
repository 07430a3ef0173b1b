"""Where a training step's time goes, row by row of the GPU issue's table: one step of each row's model and of its
reference under `torch.profiler`, after warm-up steps.

    python -m benchmarks.step_profile --device cuda [--rows aog3 textual ...] [--scale 1.0] [--bf16] [--top 8]

For each side of a row it prints the step's wall time (median of three steps outside the profiler, the device
synchronised), the kernels the step ran and their summed device time, and its costliest kernels. On a GPU the kernels
are the CUDA kernels the profiler saw; on a CPU they are the aten ops that `benchmarks.op_counts.is_kernel` counts,
timed by their own CPU time. A wall time far above the device time means launches bound the step: fusing them (CUDA
graphs, `compile`, a Triton kernel) pays. A wall time close to it means the device is busy, and the costliest kernels
show where.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.devices import add_device_argument, device_name
from benchmarks.family_speed import HEADS, REALISTIC, Step, head_steps, row_steps, scaled
from benchmarks.op_counts import is_kernel
from benchmarks.timing import median_time, synchronise


def row_sides(key: str, device: torch.device, scale: float, bf16: bool) -> dict[str, Step]:
    """{"model": step, "reference": step} of a REALISTIC row (RoI-head rows: one forward + backward of the heads)."""
    row = REALISTIC[key]
    if row.model in HEADS:
        steps = head_steps(device, scaled(512, scale, 16), keys=[row.model])
        names = HEADS[row.model].name, HEADS[row.reference].name
    else:
        steps, names = row_steps(key, device, scale, bf16), (row.model, row.reference)
    return {"model": steps[names[0]], "reference": steps[names[1]]}


def kernel_times(prof: Any, device: torch.device) -> dict[str, list[float]]:
    """{kernel name: [microseconds of each launch]} of a profile: CUDA kernels and copies on a GPU, leaf ops on a
    CPU."""
    times: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name].append(event.time_range.elapsed_us())
        elif device.type == "cpu" and is_kernel(event):
            times[event.name].append(event.cpu_time_total)
    return dict(times)


def profile_step(step: Step, device: torch.device, bf16: bool, warmup: int = 2) -> dict[str, Any]:
    """Wall ms of one step (median of three, outside the profiler) and its kernels: count, device ms, by name."""
    def autocast_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            step()

    _, seconds = median_time(autocast_step, device, repeats=3, warmup=warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        autocast_step()
        synchronise(device)
    kernels = kernel_times(prof, device)
    return {"wall_ms": 1e3 * seconds, "kernels": sum(map(len, kernels.values())),
            "device_ms": 1e-3 * sum(map(sum, kernels.values())), "by_kernel": kernels}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--rows", nargs="+", choices=list(REALISTIC), default=list(REALISTIC))
    parser.add_argument("--scale", type=float, default=1.0, help="batch and image sizes times this")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--top", type=int, default=8, help="the costliest kernels listed per step")
    args = parser.parse_args(argv)
    device = args.device
    name = device_name(device)
    print(f"torch {torch.__version__}, {name}, scale {args.scale}, {'bf16 autocast' if args.bf16 else 'fp32'}; one "
          f"profiled train step per side ({'CUDA kernels' if device.type == 'cuda' else 'leaf ops'})", flush=True)
    rows = []
    for key in args.rows:
        for side, step in row_sides(key, device, args.scale, args.bf16).items():
            result = profile_step(step, device, args.bf16)
            rows.append({"row": key, "side": side, **result})
            print(f"\n{key} / {side}: wall {result['wall_ms']:.2f} ms, {result['kernels']} kernels, device "
                  f"{result['device_ms']:.2f} ms\n| kernel | launches | device us |\n| --- | --- | --- |")
            costliest = sorted(result["by_kernel"].items(), key=lambda item: -sum(item[1]))[:args.top]
            for kernel, times in costliest:
                print(f"| {kernel[:90]} | {len(times)} | {sum(times):.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
