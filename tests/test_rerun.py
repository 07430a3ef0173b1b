"""A run folder holds one run: a fit (or compare) again with the same name moves the earlier run to stale/ first, so
its checkpoints, curves and pictures are not mixed with the new run's; `--ckpt_path best` outside fit is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import REPO
from zoo.cli import main

DIGITS = str(REPO / "configs/baselines/digits.yaml")
TINY = ["--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--progress_bar.refresh_rate=0", "--trainer.enable_model_summary=false"]


def fit(name: str, *extra: str) -> None:
    main(["fit", "--config", DIGITS, *TINY, f"--trainer.logger.init_args.name={name}", *extra])


def events(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


def test_a_second_fit_of_the_same_name_moves_the_first_run_to_stale(in_tmp_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The second fit wrote into the first's folder: best-epoch0-step2.ckpt beside best-epoch0-step2-v1.ckpt, two
    event files on one curve, and `--ckpt_path last` could resume the first run. Now the first run is in
    stale/<run>-<time>/, whole and loadable, the folder holds the second run's files only, and the helper-model
    cache (auxiliary/, keyed by content) stays where the next run reads it. The earlier run's helper curves
    (auxiliary/<name>/) go with it: a helper trained again (the data changed) logged a second curve from step 0 into
    the same folder."""
    fit("run")
    run = in_tmp_dir / "checkpoints" / "run"
    first_last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    (run / "auxiliary").mkdir()
    (run / "auxiliary" / "black_box-abc.ckpt").write_bytes(b"cache")
    (run / "auxiliary" / "black_box").mkdir()  # the helper's TensorBoard folder, as zoo.engine.auxiliary logs it
    (run / "auxiliary" / "black_box" / "events.out.tfevents.1.host").write_bytes(b"curve")
    capsys.readouterr()
    fit("run", "--data.init_args.batch_size=32")  # another config: its own run
    said = capsys.readouterr().out
    stale = list((in_tmp_dir / "checkpoints" / "stale").iterdir())
    assert len(stale) == 1 and stale[0].name.startswith("run-"), said
    assert f"moved to {stale[0].relative_to(in_tmp_dir)}" in said, said
    assert "--ckpt_path last" in said
    old = stale[0]
    moved = torch.load(old / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]  # the first run's, whole
    assert moved.keys() == first_last["state_dict"].keys()
    assert all(torch.equal(moved[key], value) for key, value in first_last["state_dict"].items())
    assert len(events(old)) == 1 and (old / "config.yaml").is_file()
    assert [p.name for p in (old / "auxiliary").iterdir()] == ["black_box"]  # its curve, not the cache
    assert (old / "auxiliary" / "black_box" / "events.out.tfevents.1.host").read_bytes() == b"curve"
    assert "batch_size: 64" in (old / "config.yaml").read_text()
    assert len(events(run)) == 1 and len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    assert "batch_size: 32" in (run / "config.yaml").read_text()
    assert [p.name for p in (run / "auxiliary").iterdir()] == ["black_box-abc.ckpt"]
    assert (run / "auxiliary" / "black_box-abc.ckpt").read_bytes() == b"cache"


def test_a_resumed_fit_moves_nothing(in_tmp_dir: Path) -> None:
    fit("run")
    fit("run", "--trainer.max_epochs=2", "--ckpt_path=last")
    run = in_tmp_dir / "checkpoints" / "run"
    assert not (in_tmp_dir / "checkpoints" / "stale").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # went on from epoch 0


def test_validate_best_outside_fit_is_refused_naming_the_files(in_tmp_dir: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Lightning's `best` is the best checkpoint of a fit in the same process: validate failed with a traceback and
    "ModelCheckpoint is not configured to save the best model", though it is."""
    from train import command_line

    fit("run")
    run = in_tmp_dir / "checkpoints" / "run"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command_line(["validate", "--config", str(run / "config.yaml"), "--ckpt_path=best"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback (most recent" not in error, error
    assert str(best.relative_to(in_tmp_dir)) in error and "not configured to save" not in error, error


def compare_tiny(folder: Path) -> Path:
    """A one-run compare spec of the digits config, named cmp; compared once (no explanations). Its report folder."""
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({"compare": {"name": "cmp", "runs": {"tiny": {"config": DIGITS}}}}))
    main(["compare", "--config", str(spec), "--no_explain", *TINY])
    return folder / "checkpoints" / "cmp"


def test_compare_again_moves_its_runs_earlier_folders(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """compare with the same name wrote into its runs' folders again (two runs' checkpoints and curves)."""
    report = compare_tiny(in_tmp_dir)
    capsys.readouterr()
    main(["compare", "--config", str(in_tmp_dir / "spec.yaml"), "--no_explain", *TINY])
    said = capsys.readouterr().out
    stale = list((report / "stale").glob("tiny-*"))  # beside it, the earlier report (stale/report-<time>/)
    assert len(stale) == 1, said
    assert f"moved to {stale[0].relative_to(in_tmp_dir)}" in said, said
    assert len(events(report / "tiny")) == len(events(stale[0])) > 0  # one compare's (its fit's, its validation's)
    assert len(list((report / "tiny" / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (report / "report.md").is_file() and not (report / "stale" / "report.md").exists()


def test_compare_without_explanations_removes_an_earlier_compares(in_tmp_dir: Path) -> None:
    """With --no_explain (or runs without explanation rows) the earlier compare's explanations.csv / .png were left
    beside the new report, read as its own."""
    report = compare_tiny(in_tmp_dir)
    for name in ("explanations.csv", "explanations.png"):  # as an earlier compare with explanations left them
        (report / name).write_text("earlier")
    main(["compare", "--config", str(in_tmp_dir / "spec.yaml"), "--no_explain", *TINY])
    assert (report / "report.md").is_file()
    assert not (report / "explanations.csv").exists() and not (report / "explanations.png").exists()


def test_ablate_does_not_reuse_a_point_fitted_over(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A fit into an ablate point's folder made its next ablate say "finished with the same settings, reused" of a
    folder whose last.ckpt was another run's. The fit moves the point aside; ablate runs the point again."""
    from zoo.cli.ablate import point_name

    grid = ["--grid", "seed_everything=[0]"]
    main(["ablate", "--config", DIGITS, "--name", "abl", *grid, *TINY])
    fit(f"abl/{point_name({'seed_everything': 0})}", "--data.init_args.batch_size=32")
    capsys.readouterr()
    main(["ablate", "--config", DIGITS, "--name", "abl", *grid, *TINY])
    said = capsys.readouterr().out
    assert "reused" not in said and "settings changed since its last run" in said, said


def _run(folder: Path) -> Path:
    """A finished run's files in `folder`: last.ckpt, an event file, a picture."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (folder / "events.out.tfevents.1.host").write_bytes(b"events")
    (folder / "filters").mkdir()
    (folder / "filters" / "epoch0.png").write_bytes(b"png")
    return folder


def _trainer(*loggers: Any) -> Any:
    return SimpleNamespace(is_global_zero=True, loggers=list(loggers))


def test_only_the_runs_own_files_move_never_other_runs_or_the_working_folder(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """The whole logger folder was renamed: a run named `grp` took the run `grp/r1` (and grp/stale/) with it, an
    empty name moved every run under checkpoints/, save_dir "." crashed (rename of the working folder: a
    traceback), and an absolute path to the working folder moved the user's own files. Every logger of a list is
    cleared, not only the first."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from zoo.cli.runs import move_earlier_run

    group = _run(in_tmp_dir / "checkpoints" / "grp")
    _run(group / "r1")
    (group / "auxiliary").mkdir()
    csv_run = _run(in_tmp_dir / "csvlogs" / "grp")
    moved = move_earlier_run(_trainer(TensorBoardLogger("checkpoints", "grp", version=""),
                                      CSVLogger("csvlogs", "grp", version="")), "fit", False)
    assert len(moved) == 2 and all((stale / "checkpoints" / "last.ckpt").is_file() for stale in moved)
    assert sorted(p.name for p in group.iterdir()) == ["auxiliary", "r1"]  # another run, and the helper cache
    assert (group / "r1" / "checkpoints" / "last.ckpt").is_file() and not any(csv_run.iterdir())

    (in_tmp_dir / "my.yaml").write_text("mine")
    (in_tmp_dir / "events.out.tfevents.2.host").write_bytes(b"events")  # a run whose folder is the working folder
    capsys.readouterr()
    for save_dir in (".", str(in_tmp_dir)):  # the run folder is the working folder: left in place, said
        assert move_earlier_run(_trainer(TensorBoardLogger(save_dir, "", version="")), "fit", False) == []
        assert "holds the working folder" in capsys.readouterr().out
    assert (in_tmp_dir / "my.yaml").is_file() and (in_tmp_dir / "checkpoints" / "grp" / "r1").is_dir()


def test_helper_curves_leave_runs_named_below_auxiliary(tmp_path: Path) -> None:
    """A run named <run>/auxiliary (or <run>/auxiliary/<sub>) is another run, not a helper's curve: a rerun of <run>
    moved its checkpoints to stale/ with the earlier run's helper curves, and `--ckpt_path last` found none."""
    from zoo.cli.runs import helper_curves

    run = tmp_path / "run"
    (run / "auxiliary" / "black_box").mkdir(parents=True)
    (run / "auxiliary" / "black_box" / "events.out.tfevents.1.host").write_bytes(b"curve")
    (run / "auxiliary" / "sub" / "checkpoints").mkdir(parents=True)
    (run / "auxiliary" / "sub" / "checkpoints" / "last.ckpt").write_bytes(b"a run named run/auxiliary/sub")
    assert helper_curves(run) == [run / "auxiliary" / "black_box"]
    (run / "auxiliary" / "checkpoints").mkdir()
    (run / "auxiliary" / "checkpoints" / "last.ckpt").write_bytes(b"a run named run/auxiliary")
    assert helper_curves(run) == []
