"""The one way the benchmarks time code: untimed warm-up calls, then interleaved rounds over the variants being
compared (A, B, C, A, B, C, ...) so that drift (turbo, heat, other load) hits every variant alike, medians over
rounds, and ratios of medians taken within the same run. On CUDA, kernels run asynchronously: every timing waits for
the device (`torch.cuda.synchronize`) before starting and before stopping the clock, so it measures the work, not
the launches.

    medians = interleaved_medians({"icnn": step_a, "twin": step_b}, device, rounds=7, calls=10, warmup=3)
    ratios(medians, reference="twin")  # {"icnn": 1.05, "twin": 1.0}

`clock` is injectable (seconds as a float, `time.perf_counter` by default) so the rounds can be tested on a fake
clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")
Clock = Callable[[], float]


def synchronise(device: torch.device) -> None:
    """Wait until `device` has finished its queued work (CUDA only; CPU work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], Result], device: torch.device, calls: int = 1,
              clock: Clock = time.perf_counter) -> tuple[Result, float]:
    """`calls` back-to-back calls of `function`, the device synchronised before and after: (the last call's result,
    seconds per call)."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1; got {calls}.")
    synchronise(device)
    start = clock()
    for _ in range(calls):
        result = function()
    synchronise(device)
    return result, (clock() - start) / calls


def interleaved_medians(steps: Mapping[Key, Callable[[], object]], device: torch.device, rounds: int,
                        calls: int = 1, warmup: int = 1, clock: Clock = time.perf_counter) -> dict[Key, float]:
    """Median seconds per call of every variant in `steps`: `warmup` untimed calls of each (in order), then `rounds`
    rounds, each timing `calls` calls of every variant in turn."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"Need rounds >= 1 and warmup >= 0; got rounds={rounds}, warmup={warmup}.")
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[Key, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(time_call(step, device, calls, clock)[1])
    return {name: statistics.median(values) for name, values in seconds.items()}


def median_time(function: Callable[[], Result], device: torch.device, repeats: int, warmup: int = 0,
                clock: Clock = time.perf_counter) -> tuple[Result, float]:
    """One callable timed alone, for work whose result is needed (an explanation that is scored afterwards):
    `warmup` untimed calls, then (the last call's result, median seconds of `repeats` timed calls)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        function()
    timings = [time_call(function, device, 1, clock) for _ in range(repeats)]
    return timings[-1][0], statistics.median(seconds for _, seconds in timings)


def ratios(medians: Mapping[Key, float], reference: Key) -> dict[Key, float]:
    """Every median over the reference's median (time ratios: above 1 is slower than the reference)."""
    if reference not in medians:
        raise KeyError(f"Reference {reference!r} was not timed; timed: {list(medians)}.")
    return {name: median / medians[reference] for name, median in medians.items()}
