"""The benchmark scripts run end to end on tiny settings."""

from __future__ import annotations


def test_family_speed_benchmark_prints_every_family() -> None:
    from benchmarks.family_speed import main

    rows = main(["--rounds", "1", "--steps", "1"])
    assert {r["family"] for r in rows} == {"icnn", "l2x", "renn", "l2x explanation"}
    steps = [r for r in rows if r["family"] != "l2x explanation"]
    references = [r for r in steps if r["train_vs_ref"] == 1.0 and r["infer_vs_ref"] == 1.0]
    assert len(references) >= 3 and all(r["train_ms"] > 0 and r["infer_samples_per_s"] > 0 for r in steps)
    explained = {r["method"]: r for r in rows if r["family"] == "l2x explanation"}
    assert set(explained) == {"l2x", "integrated_gradients", "kernel_shap", "lime"}
    assert explained["l2x"]["l2x_speedup"] == 1.0 and explained["kernel_shap"]["l2x_speedup"] > 1
