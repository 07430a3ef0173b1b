"""ablate under `ddp`: the launcher re-runs the whole command on every rank, and every rank did each point's file
bookkeeping (moving a stale point aside, settings, result.json, HPARAMS entries, the table) with no coordination:
two ranks moving one point to stale/ failed ("Directory not empty") or deleted the run the other had just moved.
Only global rank zero touches files now; every rank meets at the strategy's barrier around each point."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_ablate_journey import BASELINE, FAST
from train import main


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """{path relative to `folder`: (size, mtime in ns)} of every file below it."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_only_global_rank_zero_touches_an_ablations_files(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank other than zero, as the trainer says, is played: it leaves a point whose settings changed in place
    (rank zero moves it to stale/), makes no folder for a new point and writes no settings, result, HPARAMS entry
    or table, and waits at the barrier before and after each point as rank zero does."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import SingleDeviceStrategy

    barriers: list[str | None] = []
    monkeypatch.setattr(SingleDeviceStrategy, "barrier", lambda self, name=None: barriers.append(name)
                        if str(name).startswith("ablate") else None)  # ablate's, not Lightning's own
    args = ["ablate", "--config", BASELINE, "--grid", "seed_everything=[0]", *FAST]
    main([*args, "--name", "ranks"])  # rank zero: the point's folder, its result and the table
    ablation = in_tmp_dir / "checkpoints" / "ranks"
    written = files_under(ablation)
    point = "seed_everything=0"
    assert {f"{point}/settings.sha256", f"{point}/result.json", "ablation.md", "ablation.csv"} <= set(written)
    assert any(path.startswith(f"hparams/{point}/") for path in written)
    assert barriers == ["ablate_point_ready", "ablate_point_written"]

    barriers.clear()
    with monkeypatch.context() as rank_one:
        rank_one.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
        changed = main([*args, "--name", "ranks", "--data.init_args.num_train=48"])  # rank zero would move it
        assert files_under(ablation) == written and not (ablation / "stale").exists()
        assert barriers == ["ablate_point_ready"]  # the finished point, as rank zero left it: no fit, no result
        barriers.clear()
        (row,) = main([*args, "--name", "fresh"])  # a new point: trained, nothing written
    assert not (in_tmp_dir / "checkpoints" / "fresh").exists()
    assert barriers == ["ablate_point_ready", "ablate_point_written"]
    assert changed[0]["seeds"] == row["seeds"] == 1 and "acc_mean" in row
