"""The benchmark scripts run end to end on tiny settings."""

from __future__ import annotations


def test_family_speed_benchmark_prints_every_family() -> None:
    from benchmarks.family_speed import main

    rows = main(["--rounds", "1", "--steps", "1"])
    assert {r["family"] for r in rows} == {"icnn", "l2x", "renn"}
    references = [r for r in rows if r["train_vs_ref"] == 1.0 and r["infer_vs_ref"] == 1.0]
    assert len(references) >= 3 and all(r["train_ms"] > 0 and r["infer_samples_per_s"] > 0 for r in rows)
