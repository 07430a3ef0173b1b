"""compare and ablate reports say what they measured: the throughput columns time the runs' own batches only,
every table says which weights it scored, and a rerun stopped early leaves no report describing runs it moved to
stale/ (and its message for compare gives advice compare takes)."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

from tests.conftest import REPO
from train import main

SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
TINY = [*SMALL_WORLD, "--data.init_args.batch_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1"]
BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
HERE = "tests.test_compare_report_truth"


class FakeClock:
    """A clock for `zoo.cli.compare.time`: every reading one second later (a batch, read at its start and end hooks,
    takes one second); `pause` moves it on without a reading (work outside the batches)."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        cls.now += 1.0
        return cls.now

    @classmethod
    def pause(cls, seconds: float) -> None:
        cls.now += seconds


class PauseAtEpochEnds(pl.Callback):
    """Work outside the batches, as a picture callback or a push does: 100 (fake) seconds at every training and
    validation epoch's end."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        FakeClock.pause(100.0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        FakeClock.pause(100.0)


class FailAtFirstBatch(pl.Callback):
    """A run that stops in its first training step (a rerun killed early), after compare / ablate moved the earlier
    run aside."""

    def on_train_batch_start(self, *args, **kwargs) -> None:
        raise RuntimeError("stopped in the first training step")


def write_spec(folder: Path, name: str, runs: dict, args: list[str] = TINY) -> str:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"compare": {"name": name, "args": args, "runs": runs}}))
    return f"{name}.yaml"


def test_throughput_times_only_the_runs_own_batches(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work outside the batches (L2X's helper models, pictures, pushes, validation epochs) was timed as the run's:
    the same run read 685 and 3618 training samples/s as its helper cache was empty or full. A run pausing 100 s at
    every epoch's end now gets the samples/s of the same run without the pauses (each batch 1 fake second: 8 samples
    per second), and the report says what is timed."""
    import importlib

    monkeypatch.setattr(importlib.import_module("zoo.cli.compare"), "time", FakeClock)
    runs = {"plain": {"config": BASELINE},
            "pausing": {"config": BASELINE, "args": [f"--trainer.callbacks+={HERE}.PauseAtEpochEnds"]}}
    rows = {row["run"]: row for row in main(["compare", "--config", write_spec(in_tmp_dir, "speed", runs),
                                             "--no_explain"])}
    for column in ("train_samples_per_s", "infer_samples_per_s"):
        assert rows["plain"][column] == rows["pausing"][column] == 8.0, rows
    report = (in_tmp_dir / "checkpoints" / "speed" / "report.md").read_text()
    assert "over those batches' summed time" in report and "helper models" in report


def test_compare_and_ablate_say_which_weights_they_scored(in_tmp_dir: Path) -> None:
    """Both scored the weights fit left (the last epoch's) while each run folder keeps a best-*.ckpt by its monitor,
    and said neither: compare's rows name them (the last epoch and step; a `checkpoint:` run's file), ablate's
    result.json too, and a line under each table says the scores are not of best-*.ckpt."""
    spec = write_spec(in_tmp_dir, "weights", {"trained": {"config": BASELINE}})
    (row,) = main(["compare", "--config", spec, "--no_explain"])
    folder = in_tmp_dir / "checkpoints" / "weights"
    assert row["weights"] == "last (epoch 0, step 2)"
    with open(folder / "models.csv") as f:
        assert next(csv.DictReader(f))["weights"] == "last (epoch 0, step 2)"
    assert "scored with its last weights, as its fit left them" in (folder / "report.md").read_text()
    last = folder / "trained" / "checkpoints" / "last.ckpt"
    spec = write_spec(in_tmp_dir, "evaluated", {"kept": {"config": BASELINE, "checkpoint": str(last)}})
    (row,) = main(["compare", "--config", spec, "--no_explain"])
    assert row["weights"] == f"{last} (epoch 0, global_step 2)" and row["train_samples_per_s"] == ""

    main(["ablate", "--config", BASELINE, "--name", "grid", "--grid", "seed_everything=[0]", *TINY])
    folder = in_tmp_dir / "checkpoints" / "grid"
    assert "scored with its last weights, as its fit left them (last (epoch 0, step 2): 1 point)" in (
        folder / "ablation.md").read_text()
    assert json.loads((folder / "seed_everything=0" / "result.json").read_text())["weights"] == (
        "last (epoch 0, step 2)")


def test_a_compare_rerun_stopped_early_leaves_no_report_of_moved_runs(in_tmp_dir: Path) -> None:
    """A rerun moved each run to stale/ as it reached it but rewrote report.md only at its end: stopped in between,
    the report described a run no longer in the folder. The earlier report now goes to stale/ before any run
    trains."""
    spec = write_spec(in_tmp_dir, "again", {"only": {"config": BASELINE}})
    main(["compare", "--config", spec, "--no_explain"])
    folder = in_tmp_dir / "checkpoints" / "again"
    with pytest.raises(RuntimeError, match="stopped in the first training step"):
        main(["compare", "--config", spec, "--no_explain", f"--trainer.callbacks+={HERE}.FailAtFirstBatch"])
    assert len(list((folder / "stale").glob("only-*"))) == 1  # the run the report described
    assert not any((folder / name).exists() for name in ("report.md", "report.csv", "models.csv"))
    (reports,) = (folder / "stale").glob("report-*")
    assert {p.name for p in reports.iterdir()} == {"report.md", "report.csv", "models.csv"}


def test_an_ablate_rerun_stopped_early_leaves_no_entry_of_a_moved_point(in_tmp_dir: Path) -> None:
    """A point whose settings changed went to stale/ but kept its HPARAMS entry, and ablation.md kept its numbers,
    until the rerun ended: stopped in between, both described a run no longer in the grid. Now the entry goes with
    the point and the earlier table to stale/; a point not yet reached keeps its entry."""
    args = ["ablate", "--config", BASELINE, "--name", "grid", "--grid", "seed_everything=[0,1]", *TINY]
    main(args)
    folder = in_tmp_dir / "checkpoints" / "grid"
    with pytest.raises(RuntimeError, match="stopped in the first training step"):
        main([*args, f"--trainer.callbacks+={HERE}.FailAtFirstBatch"])  # other settings: point 0 runs again
    assert list((folder / "stale").glob("seed_everything=0-*/result.json"))
    assert sorted(p.name for p in (folder / "hparams").iterdir()) == ["seed_everything=1"]
    assert not (folder / "ablation.md").exists() and not (folder / "ablation.csv").exists()
    (reports,) = (folder / "stale").glob("ablation-*")
    assert sorted(p.name for p in reports.iterdir()) == ["ablation.csv", "ablation.md"]


def test_the_stale_message_of_compare_gives_the_specs_checkpoint(in_tmp_dir: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A compare run again said "to continue a run instead, give --ckpt_path last", an option compare refuses: it
    now names the moved run's last.ckpt as a spec run's `checkpoint:`; fit's message keeps --ckpt_path last."""
    from pytorch_lightning.loggers import TensorBoardLogger

    from zoo.cli.runs import move_earlier_run

    def earlier_run(name: str) -> types.SimpleNamespace:
        checkpoints = in_tmp_dir / "checkpoints" / name / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "last.ckpt").write_bytes(b"weights")
        return types.SimpleNamespace(is_global_zero=True, loggers=[TensorBoardLogger("checkpoints", name, version="")])

    (stale,) = move_earlier_run(earlier_run("cmp/run"), "compare", False)
    said = capsys.readouterr().out
    assert f"list it in a compare spec with `checkpoint: {stale / 'checkpoints' / 'last.ckpt'}`" in said, said
    assert "give --ckpt_path last" not in said, said
    move_earlier_run(earlier_run("fitted"), "fit", False)
    assert "to continue a run instead, give --ckpt_path last." in capsys.readouterr().out


def test_cuda_batches_are_timed_by_events_read_once_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a batch's time is a pair of timing events: recorded at its start and end hooks, read when the loop
    ends with one wait for the last event, never a host-device sync per batch. Stand-in events (no GPU needed):
    each recorded 10 ms after the one before."""
    import importlib

    import torch

    class Event:
        made: list[Event] = []
        waits = 0

        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.at = 0.0
            Event.made.append(self)

        def record(self, stream: object = None) -> None:
            self.at = 10.0 * len(Event.made)  # ms

        def synchronize(self) -> None:
            Event.waits += 1

        def elapsed_time(self, end: Event) -> float:
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    counter = importlib.import_module("zoo.cli.compare").SampleCounter("train")
    trainer = types.SimpleNamespace(world_size=1, current_epoch=0, global_step=0, callback_metrics={},
                                    sanity_checking=False)
    system = types.SimpleNamespace(device=torch.device("cuda", 0), batch_size=lambda batch: 4)
    for index in range(3):
        counter.on_train_batch_start(trainer, system, None, index)
        trainer.global_step += 1
        counter.on_train_batch_end(trainer, system, None, None, index)
    assert Event.waits == 0 and len(Event.made) == 6  # no wait while training
    counter.on_train_end(trainer, system)
    assert Event.waits == 1 and counter.seconds(trainer) == pytest.approx(0.03)
    assert counter.samples_per_s(trainer) == pytest.approx(12 / 0.03)
    assert counter.last_weights(trainer) == "last (epoch 0, step 3)"


def test_a_smoke_compare_keeps_the_report_and_says_its_runs_stay(in_tmp_dir: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A fast_dev_run compare (no run folders: no run moves) moved the real report to stale/ saying it "describes
    the earlier runs", which were still in place; it now says that they stay and whose report replaces it."""
    spec = write_spec(in_tmp_dir, "smoke", {"only": {"config": BASELINE}})
    main(["compare", "--config", spec, "--no_explain"])
    capsys.readouterr()
    main(["compare", "--config", spec, "--no_explain", "--trainer.fast_dev_run=true"])
    said = capsys.readouterr().out
    folder = in_tmp_dir / "checkpoints" / "smoke"
    assert "have no run folder (fast_dev_run, logger=false): the earlier runs stay in place" in said
    assert (folder / "only" / "checkpoints" / "last.ckpt").is_file() and not list((folder / "stale").glob("only-*"))
    assert len(list((folder / "stale").glob("report-*"))) == 1
