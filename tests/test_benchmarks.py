"""The benchmark scripts run end to end on tiny settings; the shared timing helper and `--device` behave."""

from __future__ import annotations

import argparse
import importlib
from unittest import mock

import pytest
import torch

SCRIPTS = ["aog_rcnn_parse_headroom", "family_speed", "icnn_instability_floor", "icnn_step_time", "l2x_race",
           "renn_data_efficiency", "step_profile", "textual_variants"]


class FakeClock:
    """A clock that only moves when a fake step says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_steps(clock: FakeClock, costs: dict[str, list[float]], log: list[str]) -> dict[str, object]:
    """Steps that log their name and advance the clock by their next cost."""
    remaining = {name: iter(values) for name, values in costs.items()}

    def step_of(name: str):
        def step() -> str:
            log.append(name)
            clock.now += next(remaining[name])
            return name

        return step

    return {name: step_of(name) for name in costs}


def test_interleaved_medians_warm_up_then_alternate_and_take_medians() -> None:
    from benchmarks.timing import interleaved_medians, ratios

    clock, log = FakeClock(), []
    # per call: 2 warm-up calls (slow, must not count), then 3 rounds; b's 50 is an outlier the median ignores
    steps = fake_steps(clock, {"a": [100, 100, 1.0, 3.0, 2.0], "b": [100, 100, 4.0, 4.0, 50.0]}, log)
    medians = interleaved_medians(steps, torch.device("cpu"), rounds=3, warmup=2, clock=clock)
    assert log == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]  # warm-up per variant, then A, B, A, B, ...
    assert medians == {"a": 2.0, "b": 4.0}
    assert ratios(medians, "b") == {"a": 0.5, "b": 1.0}
    with pytest.raises(KeyError, match="'c' was not timed"):
        ratios(medians, "c")


def test_interleaved_medians_time_several_calls_per_round_per_call() -> None:
    from benchmarks.timing import interleaved_medians

    clock, log = FakeClock(), []
    steps = fake_steps(clock, {"a": [1.0, 3.0, 5.0, 5.0], "b": [2.0, 2.0, 8.0, 8.0]}, log)
    medians = interleaved_medians(steps, torch.device("cpu"), rounds=2, calls=2, warmup=0, clock=clock)
    assert log == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert medians == {"a": (2.0 + 5.0) / 2, "b": (2.0 + 8.0) / 2}  # seconds per call, median of two rounds


def test_median_time_returns_the_result_and_the_median_after_warm_up() -> None:
    from benchmarks.timing import median_time

    clock, log = FakeClock(), []
    step = fake_steps(clock, {"a": [9.0, 1.0, 7.0, 2.0]}, log)["a"]
    result, seconds = median_time(step, torch.device("cpu"), repeats=3, warmup=1, clock=clock)
    assert result == "a" and seconds == 2.0 and len(log) == 4


def test_timing_waits_for_cuda_before_each_clock_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.timing import time_call

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))

    def clock() -> float:
        events.append("clock")
        return 0.0

    time_call(lambda: events.append("call"), torch.device("cuda"), calls=2, clock=clock)
    assert events == ["sync", "clock", "call", "call", "sync", "clock"]
    events.clear()
    time_call(lambda: events.append("call"), torch.device("cpu"), clock=clock)
    assert events == ["clock", "call", "clock"]  # nothing to wait for on the CPU


def test_device_argument_refuses_what_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.devices import parse_device, trainer_kwargs, trainer_overrides

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available"):
        parse_device("cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="not a torch device"):
        parse_device("gpu0")
    assert parse_device("cpu") == torch.device("cpu")
    assert trainer_kwargs(torch.device("cuda:1")) == {"accelerator": "cuda", "devices": [1]}
    assert trainer_overrides(torch.device("cpu")) == ["--trainer.accelerator=cpu"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_runs_as_a_module_with_device(name: str, capsys: pytest.CaptureFixture) -> None:
    import benchmarks

    module = importlib.import_module(f"benchmarks.{name}")
    assert f"python -m benchmarks.{name}" in module.__doc__ and f"`{name}`" in benchmarks.__doc__
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--device" in capsys.readouterr().out


def test_family_speed_benchmark_prints_every_family() -> None:
    from benchmarks.family_speed import main

    rows = main(["--rounds", "1", "--steps", "1", "--head_rois", "32"])
    assert {r["family"] for r in rows} == {"icnn", "l2x", "renn", "aog", "textual", "l2x explanation", "aog head"}
    steps = [r for r in rows if r["family"] in ("icnn", "l2x", "renn", "aog", "textual")]
    references = [r for r in steps if r["train_vs_ref"] == 1.0 and r["infer_vs_ref"] == 1.0]
    assert len(references) >= 5 and all(r["train_ms"] > 0 and r["infer_samples_per_s"] > 0 for r in steps)
    heads = {r["head"]: r for r in rows if r["family"] == "aog head"}
    assert heads["average vote 3x3 (R-FCN)"]["vs_vote"] == 1.0 and heads["AOGParsing 7x7, terminal maps"]["ms"] > 0
    explained = {r["method"]: r for r in rows if r["family"] == "l2x explanation"}
    assert set(explained) == {"l2x", "integrated_gradients", "kernel_shap", "lime"}
    assert explained["l2x"]["l2x_speedup"] == 1.0 and explained["kernel_shap"]["l2x_speedup"] > 1


def test_family_speed_realistic_table_runs_shrunk_on_the_cpu() -> None:
    """`--realistic` (the GPU issue's table) at an eighth of its sizes: each row's model against its reference, fp32
    and bf16, ratio and target."""
    from benchmarks.family_speed import REALISTIC, main

    keys = ["icnn_tinycnn", "aog3", "aog7_triton", "renn", "l2x"]  # on the CPU the Triton row runs the waves
    rows = main(["--realistic", "--device", "cpu", "--rounds", "1", "--steps", "1", "--scale", "0.125",
                 "--rows", *keys])
    expected = [(REALISTIC[k].name, p) for k in keys for p in ("fp32", "bf16")]
    assert [(r["row"], r["precision"]) for r in rows] == expected
    assert all(r["model_ms"] > 0 and r["reference_ms"] > 0 and r["ratio"] > 0 and r["target"] >= 1 for r in rows)


def test_family_speed_realistic_compiles_both_sides_of_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--realistic --compile HOW`: the row's model and its reference are both compiled the way
    `--model.init_args.compile=HOW` compiles them (here the aot_eager backend: graph capture without code
    generation, seconds on a CPU), and the row says so; `--precisions` picks the precisions."""
    import benchmarks.family_speed as family_speed
    from zoo import create_model
    from zoo.engine.system import compile_model

    compiled: list[tuple[str, str]] = []

    def spy(model: torch.nn.Module, how: str) -> None:
        compiled.append((type(model).__name__, how))
        compile_model(model, how)

    monkeypatch.setattr(family_speed, "compile_model", spy)
    torch._dynamo.reset()
    rows = family_speed.main(["--realistic", "--device", "cpu", "--rounds", "1", "--steps", "1", "--scale", "0.125",
                              "--rows", "renn", "--precisions", "bf16", "--compile", "aot_eager"])
    assert [(r["precision"], r["compiled"]) for r in rows] == [("bf16", "aot_eager")]
    assert sorted(compiled) == sorted((type(create_model(name)).__name__, "aot_eager")
                                      for name in ("renn_series", "baseline_cnn1d"))
    assert all(r["model_ms"] > 0 and r["reference_ms"] > 0 for r in rows)


def test_family_speed_times_chosen_heads_alone_with_their_vote() -> None:
    from benchmarks.family_speed import HEADS, main

    rows = main(["--families", "--heads", "aog7", "aog3_cells", "--rounds", "1", "--head_rois", "16"])
    assert {r["family"] for r in rows} == {"aog head"}
    names = {r["head"]: r for r in rows}
    assert set(names) == {HEADS[key].name for key in ("vote3", "aog3_cells", "vote7", "aog7")}
    assert names[HEADS["vote7"].name]["vs_vote"] == 1.0 and names[HEADS["aog7"].name]["ms"] > 0


def test_icnn_step_time_times_icnn_and_its_three_references() -> None:
    from benchmarks.icnn_step_time import main

    rows = main(["--rounds", "1", "--steps", "1", "--backbones", "tinycnn"])
    assert [r["backbone"] for r in rows] == ["tinycnn"]
    assert all(rows[0][f"{name}_ms"] > 0 for name in ("icnn", "twin", "ordinary", "plain"))
    import zoo.icnn.model

    solves = []
    solver = zoo.icnn.model.linear_sum_assignment
    with mock.patch.object(zoo.icnn.model, "linear_sum_assignment", lambda cost: solves.append(1) or solver(cost)):
        main(["--rounds", "1", "--steps", "1", "--backbones", "tinycnn", "--category-assignment", "balanced"])
    assert solves  # the balanced ICNN steps solve their assignment


def test_instability_floor_oracles_fire_on_the_true_parts() -> None:
    import torch

    from benchmarks.icnn_instability_floor import main, oracle_maps

    landmarks, labels = torch.tensor([[[10.0, 50.0], [60.0, 3.0]]]), torch.tensor([1])  # one class-1 image, 2 parts
    maps = oracle_maps(landmarks, labels, 2, 8, 64, torch.Generator().manual_seed(0))  # (1, 2 classes x 2 parts, 8, 8)
    assert maps.shape == (1, 4, 8, 8) and maps[0, :2].max() == 0  # class 0's filters are silent on a class-1 image
    assert maps[0, 2].flatten().argmax() == 6 * 8 + 1 and maps[0, 3].flatten().argmax() == 7  # cells (x 1, y 6), (7, 0)
    rows = main(["--map_sizes", "8", "64", "--num_val", "120"])
    assert 0 < rows[1]["part_oracle"] < rows[0]["part_oracle"]  # finer maps pay less quantisation


def test_parse_headroom_scores_every_partition_with_the_metric() -> None:
    import torch

    from benchmarks.aog_rcnn_parse_headroom import main, tree_scores
    from zoo.aog_rcnn.model import AOGParsing, GridGrammar

    two = AOGParsing(GridGrammar(2, 2))
    partitions = two.grammar.partitions()  # 9 parse trees, 8 partitions: the four cells come from two trees
    cover = partitions.float() @ (two.cell_weights * two.area[:, None].float())  # (8, 4): each cell covered once
    assert len(partitions) == 8 and torch.equal(cover, torch.ones_like(cover))
    three = AOGParsing(GridGrammar(3, 3))
    partitions = three.grammar.partitions()
    box, part = torch.tensor([[0.0, 0, 3, 3]]), torch.tensor([[[0.0, 0, 1, 1]]])  # the part is the top-left cell
    scores = tree_scores(box, part, three, partitions)[0]  # (M,)
    grid = int((partitions == three.uniform_leaves()).all(1).nonzero())
    # grid: recall 1, precision 1/9; best: the cell, the rest of its row, the two rows below (recall 1, precision 1/3)
    torch.testing.assert_close(scores[grid], torch.tensor((1 + 1 / 9) / 2))
    torch.testing.assert_close(scores.max(), torch.tensor((1 + 1 / 3) / 2))
    rows = main(["--num_train", "40", "--num_val", "20"])
    assert [r["partition"].split(" (")[0] for r in rows] == ["whole box", "uniform grid", "best fixed tree per class",
                                                             "best tree per object"]
    assert rows[3]["part_iou"] >= max(r["part_iou"] for r in rows[:3])  # the oracle bounds every fixed choice


def test_op_counts_kernels_are_leaf_ops_less_views_and_allocations() -> None:
    """`kernels` counts what a GPU would launch: an add and a zeros' fill count, views and `empty` do not, and a
    convolution counts once however deep the CPU's dispatch chain below it."""
    from benchmarks.op_counts import count

    x = torch.rand(2, 1, 16)
    kernel = torch.ones(1, 1, 3)

    def profiled(fn) -> dict[str, int]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return count(prof)

    views = profiled(lambda: x.view(2, 16).t().unsqueeze(0).expand(3, 16, 2))
    assert views["kernels"] == 0 and views["aten_ops"] >= 4
    assert profiled(lambda: (x + 1, torch.zeros(4), torch.empty(3)))["kernels"] == 2
    conv = profiled(lambda: torch.nn.functional.conv1d(x, kernel, padding=1))
    assert conv["kernels"] == 1 and conv["aten_ops"] > 3  # conv1d -> convolution -> _convolution -> ...


def test_step_profile_counts_and_times_the_kernels_of_both_sides_of_a_row() -> None:
    """Shrunk on the CPU: each side's step has a wall time, kernels and their time; the AOG head runs more kernels
    than the vote, and every kernel counted is a leaf op."""
    from benchmarks.step_profile import main

    rows = {(r["row"], r["side"]): r for r in main(["--device", "cpu", "--scale", "0.0625", "--rows", "aog3", "renn",
                                                      "--top", "3"])}
    assert set(rows) == {(key, side) for key in ("aog3", "renn") for side in ("model", "reference")}
    for row in rows.values():
        assert row["wall_ms"] > 0 and row["device_ms"] > 0
        assert row["kernels"] == sum(map(len, row["by_kernel"].values())) > 0
        layers = {"aten::view", "aten::empty", "aten::conv1d", "aten::conv2d", "aten::convolution",
                  "aten::_convolution"}
        assert not layers & set(row["by_kernel"])  # views, allocations and dispatch layers are not kernels
    assert rows["aog3", "model"]["kernels"] > rows["aog3", "reference"]["kernels"]


def test_gpu_check_runs_its_stages_on_a_cpu(tmp_path) -> None:
    """`benchmarks/gpu_check.sh`, the one command a session lent a GPU runs, shrunk to the CPU (its documented dry
    run): a stage runs and logs what it measured, the stages left out write nothing and print no errors."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO

    # LIMIT_FACTOR: the stage's 60 s are a GPU's; beside the other test worker the CPU profile ran out of them.
    # PROFILE_ROWS: the rows asserted below (all eight took 95 s of a CI worker); one thread beside the other worker
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "SCALE": "0.125", "STAGES": "profile",
           "LIMIT_FACTOR": "4", "PROFILE_ROWS": "aog7_triton textual l2x", "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "== profile: exit 0" in result.stdout, result.stdout + result.stderr[-2000:]
    log = (tmp_path / "profile.log").read_text()
    assert all(f"{row} / model" in log and f"{row} / reference" in log for row in ("aog7_triton", "textual", "l2x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.txt", "profile.log"]
    assert "No such file" not in result.stderr
