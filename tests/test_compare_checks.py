"""compare and ablate checks found by the ablate audit: a mistyped spec key or twin name is said before any run
trains, command-line callbacks reach L2X's black-box twin, a changed data folder reruns a finished ablate point, a
run's saved config.yaml is an ablate config, and a batch size that is not a whole number >= 1 is refused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, write_image
from tests.test_compare_ablate import said_once
from train import main

SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
FAST = ["--trainer.fast_dev_run=true", *SMALL_WORLD]
BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
ICNN = str(REPO / "configs/icnn/parts_world.yaml")


def write_spec(folder: Path, compare: dict) -> str:
    (folder / "spec.yaml").write_text(yaml.safe_dump({"compare": compare}))
    return str(folder / "spec.yaml")


@pytest.mark.parametrize("compare, said", [
    ({"arg": ["--seed_everything=5"], "runs": {"a": {"config": BASELINE}}},
     "compare has no key 'arg' (did you mean 'args'"),
    ({"runs": {"a": {"config": BASELINE}, "b": {"config": BASELINE, "arg": ["--trainer.max_epochs=2"]}}},
     "run 'b' has no key 'arg' (did you mean 'args'"),
    ({"runs": {"a": {"config": BASELINE, "checkpont": "x.ckpt"}}},
     "run 'a' has no key 'checkpont' (did you mean 'checkpoint'"),
    ({"args": "--trainer.max_epochs=2", "runs": {"a": {"config": BASELINE}}}, "args must be a list of options"),
    ({"runs": {"b": {"config": ICNN, "twin": "plain_cnn", "args": ["--trainer.max_epochs=2"]}}},
     "run 'b' is the declared twin 'plain_cnn', whose options are its System's; it takes no args"),
])
def test_a_compare_spec_with_a_key_it_does_not_read_is_refused(tmp_path: Path, compare: dict, said: str) -> None:
    """`arg:` (for `args:`) was read as absent: the runs trained without the options and the report did not say."""
    from zoo.cli.compare import read_compare_spec

    with pytest.raises((ValueError, TypeError), match="compare spec") as error:
        read_compare_spec(write_spec(tmp_path, compare))
    assert said in str(error.value), str(error.value)


def test_a_mistyped_key_or_twin_is_said_once_before_any_run_trains(in_tmp_dir: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A mistyped run key: exit 2, no run trained. An unknown `twin:` was a bare "error: 'ordinary_twn'"."""
    spec = write_spec(in_tmp_dir, {"name": "typo", "runs": {
        "a": {"config": BASELINE}, "b": {"config": BASELINE, "arg": ["--model.init_args.optimizer.init_args.lr=1"]}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", *FAST])
    assert "run 'b' has no key 'arg' (did you mean 'args'" in error, error
    assert not (in_tmp_dir / "checkpoints").exists()
    spec = write_spec(in_tmp_dir, {"name": "twin", "runs": {"icnn": {"config": ICNN},
                                                            "ordinary": {"config": ICNN, "twin": "ordinary_twn"}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", *FAST])
    assert "ICNNSystem declares no twin 'ordinary_twn' (did you mean 'ordinary_twin'" in error, error
    assert "its twins: ordinary_twin, masked_twin, plain_cnn" in error
    assert not (in_tmp_dir / "checkpoints").exists()


def test_the_command_lines_callbacks_reach_the_black_box_twin() -> None:
    """L2X's black box declares `--trainer.callbacks=null` (the selector's pictures): applied after the command line,
    it also dropped a command-line EarlyStopping, so the family run stopped early and its twin did not. Now the twin
    drops the config's callbacks only; the spec's and the command line's reach it."""
    from zoo.cli.compare import _fit_args, read_compare_spec
    from zoo.cli.lightning import ParsedCLI

    config = REPO / "configs/l2x/digits.yaml"
    spec = read_compare_spec(config)
    common = [("--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.EarlyStopping, "
               "init_args: {monitor: val/acc}}]")]
    extra = ["--trainer.callbacks+=LearningRateMonitor"]
    callbacks = {name: [entry.class_path.rsplit(".", 1)[-1] for entry in ParsedCLI(
        args=_fit_args(name, run, config, common, extra), run=False).config.trainer.callbacks or []]
        for name, run in spec["runs"].items()}
    assert callbacks["black_box"] == ["EarlyStopping", "LearningRateMonitor"], callbacks
    assert callbacks["l2x"] == ["EarlyStopping", "LearningRateMonitor"], callbacks  # the spec's list replaced it
    only_extra = ParsedCLI(args=_fit_args("black_box", spec["runs"]["black_box"], config, [], extra), run=False)
    assert [entry.class_path.rsplit(".", 1)[-1] for entry in only_extra.config.trainer.callbacks] == \
        ["LearningRateMonitor"]  # the config's SelectionCallback: not the classifier's


def test_a_changed_data_folder_reruns_a_finished_point(in_tmp_dir: Path, image_folder_root: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The settings hash covered the files a config names, not its folders: images rewritten in the data root
    reused the point trained on the old images. A hidden file there (.DS_Store) changes nothing."""
    args = ["ablate", "--config", str(REPO / "configs/baselines/image_folder.yaml"), "--name", "folder",
            "--grid", "seed_everything=[0]", f"--data.init_args.root={image_folder_root}",
            "--model.init_args.model_name=baseline_tinycnn", "--data.init_args.image_size=16",
            "--data.init_args.batch_size=4", "--trainer.fast_dev_run=true"]
    main(args)
    (image_folder_root / "train" / ".DS_Store").write_bytes(b"finder")
    capsys.readouterr()
    main(args)
    assert "point seed_everything=0: finished with the same settings, reused" in capsys.readouterr().out
    image = image_folder_root / "train" / "cat" / "0.png"
    stat = os.stat(image)
    write_image(image, (40, 31), seed=7)  # another image
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    main(args)
    printed = capsys.readouterr().out
    assert "point seed_everything=0: settings changed since its last run; run again" in printed, printed
    assert f"files.{image_folder_root}: \"folder of 10 files" in printed
    assert "reused" not in printed
    assert len(list((in_tmp_dir / "checkpoints" / "folder" / "stale").glob("seed_everything=0-*"))) == 1


def test_folders_the_run_writes_in_are_not_fingerprinted(in_tmp_dir: Path) -> None:
    """The working folder and the folders runs write in change with every run: they are not part of the hash
    (trainer.default_root_dir, checkpoints/ by default, would rerun every point every time)."""
    from zoo.cli.ablate import existing_folders

    (in_tmp_dir / "checkpoints" / "grid" / "point").mkdir(parents=True)
    for folder in ("data", "runs", "weights"):
        (in_tmp_dir / folder).mkdir()
    config = {"a": ".", "b": str(in_tmp_dir), "c": "checkpoints", "d": ["data", "checkpoints/grid/point/x"],
              "trainer": {"default_root_dir": "runs"}, "checkpoint": {"dirpath": "weights"}}
    assert list(existing_folders(config, in_tmp_dir / "checkpoints" / "grid" / "point")) == ["data"]
    assert list(existing_folders(config)) == ["checkpoints", "data"]  # with no run folder known: it may be read


def test_ablate_takes_a_runs_saved_config(in_tmp_dir: Path) -> None:
    """fit's config.yaml holds `ckpt_path: null` and `weights_only: null`, which ablate passed on: "Option
    'ckpt_path' is not accepted". They are left out, as compare leaves them out."""
    saved = yaml.safe_load(Path(BASELINE).read_text()) | {"ckpt_path": None, "weights_only": None}
    (in_tmp_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    rows = main(["ablate", "--config", "config.yaml", "--name", "saved", "--grid", "seed_everything=[0]", *FAST])
    assert len(rows) == 1 and (in_tmp_dir / "checkpoints" / "saved" / "ablation.md").is_file()


@pytest.mark.parametrize("batch_size", [None, 0, -4, True, 2.0, "8"])
def test_a_batch_size_that_is_not_a_whole_number_is_refused(batch_size: object) -> None:
    from datamodules import DigitsDataModule

    with pytest.raises(ValueError, match=f"DigitsDataModule: batch_size must be a whole number >= 1; got "
                                         f"{batch_size!r}"):
        DigitsDataModule(batch_size=batch_size)
    assert DigitsDataModule(batch_size=np.int64(8)).batch_size == 8


def test_an_ablate_grid_with_a_null_batch_size_is_said_before_any_point_trains(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`batch_size: null` passed every check, and the point crashed with a traceback about an image's shape."""
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "batch",
                               "--grid", "data.init_args.batch_size=[8,null]", *FAST])
    assert "batch_size must be a whole number >= 1; got None" in error, error
    assert "ablate point 2/2: batch_size=None" in error
    assert not (in_tmp_dir / "checkpoints").exists()


def built(runs: dict, spec: Path) -> dict:
    """Each run's ZooCLI as compare builds it (its logger named <report>/<run>), nothing trained."""
    from zoo.cli.compare import _fit_args
    from zoo.cli.lightning import ZooCLI

    return {name: ZooCLI(args=_fit_args(name, run, spec, SMALL_WORLD, [f"--trainer.logger.init_args.name=r/{name}"]),
                         run=False) for name, run in runs.items()}


def test_a_run_that_differs_outside_the_model_is_kept_and_a_run_listed_twice_is_said(tmp_path: Path,
                                                                                   capsys) -> None:
    """`clipped: {config: <same>, args: [--trainer.gradient_clip_val=0.1]}` was dropped as "twin 'clipped' is the
    config's own model" (any run with args whose model equalled the first's). Now only a declared twin equal to a run
    in every setting but its logger's name is dropped; a listed run equal to another runs too (a check that runs
    reproduce), and that is said."""
    from zoo.cli.compare import drop_twins_equal_to_the_model

    spec = tmp_path / "spec.yaml"
    runs = {"plain": {"config": BASELINE}, "clipped": {"config": BASELINE, "args": ["--trainer.gradient_clip_val=0.1"]},
            "again": {"config": BASELINE}}
    clis = built(runs, spec)
    kept = {name: runs[name] for name in ("plain", "clipped")}
    assert drop_twins_equal_to_the_model(kept, clis) == kept
    assert "not trained twice" not in capsys.readouterr().out
    assert drop_twins_equal_to_the_model(runs, clis) == runs
    assert "runs 'plain' and 'again' have the same settings (config, args, checkpoint): both run" in \
        capsys.readouterr().out
    twin = {**kept, "again": {"config": BASELINE, "twin": "description"}}  # a declared twin that changes nothing
    assert list(drop_twins_equal_to_the_model(twin, clis)) == ["plain", "clipped"]
    assert "twin 'again' is the same run as 'plain' in every setting" in capsys.readouterr().out
    checkpoints = {"plain": {"config": BASELINE, "checkpoint": "a.ckpt"},
                   "again": {"config": BASELINE, "checkpoint": "b.ckpt"}}
    assert drop_twins_equal_to_the_model(checkpoints, clis) == checkpoints  # other weights: other runs


def test_every_budget_setting_and_early_stopping_are_compared() -> None:
    """max_time, min_epochs and min_steps were not compared: runs with other budgets shared one table."""
    from zoo.cli.compare import check_same_setting
    from zoo.cli.lightning import ParsedCLI

    def config(*args: str):
        return ParsedCLI(args=["--config", BASELINE, *args], run=False).config

    reference = config()
    stop = ("--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.EarlyStopping, "
            "init_args: {monitor: val/acc}}]")
    for option, key in (("--trainer.max_time=00:00:01:00", "trainer.max_time"),
                        ("--trainer.min_epochs=3", "trainer.min_epochs"),
                        ("--trainer.min_steps=9", "trainer.min_steps"), (stop, "trainer.callbacks (EarlyStopping)")):
        with pytest.raises(ValueError, match=rf"compare runs 'a' and 'b' differ in {re.escape(key)}: "):
            check_same_setting({"a": reference, "b": config(option)})
    check_same_setting({"a": reference, "b": config("--trainer.gradient_clip_val=0.1")})  # not a budget


def test_a_checkpoint_runs_other_budget_is_said(tmp_path: Path) -> None:
    """A `checkpoint:` run is evaluated, not trained: its training budget was never compared. Its run folder's
    config.yaml says it (with the checkpoint's epoch and global_step); a checkpoint without one is said unknown."""
    import torch

    from zoo.cli.compare import COMPARE_HELP, checkpoint_budget_notes

    (tmp_path / "src" / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 2, "global_step": 12, "state_dict": {}}, tmp_path / "src" / "checkpoints" / "last.ckpt")
    (tmp_path / "src" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 3}}))
    (tmp_path / "loose.ckpt").write_bytes(b"")
    runs = {"fresh": {"config": BASELINE}, "old": {"config": BASELINE,
                                                   "checkpoint": str(tmp_path / "src" / "checkpoints" / "last.ckpt")}}
    trainers = {"fresh": {"max_epochs": 1}, "old": {"max_epochs": 1}}
    notes = checkpoint_budget_notes(runs, trainers)
    assert len(notes) == 1 and "run 'old' evaluates checkpoint" in notes[0], notes
    assert "(epoch 2, global_step 12), trained with trainer.max_epochs=3" in notes[0], notes
    assert "run 'fresh' trains with trainer.max_epochs=1" in notes[0]
    assert checkpoint_budget_notes(runs, {"fresh": {"max_epochs": 3}, "old": {}}) == []  # the same budget
    loose = checkpoint_budget_notes({**runs, "loose": {"config": BASELINE, "checkpoint": str(tmp_path / "loose.ckpt")}},
                                    trainers | {"loose": {}})
    assert len(loose) == 2 and "run 'loose'" in loose[1] and "budget is not known" in loose[1], loose
    assert "pixels per deletion/insertion step (series: time steps" in COMPARE_HELP


def test_a_checkpoint_inside_a_run_this_compare_trains_is_refused(in_tmp_dir: Path) -> None:
    """`c: {checkpoint: <report>/a/checkpoints/last.ckpt}` beside run `a` of the same compare run again: `a` moved its
    earlier run to stale/ and trained anew, and `c` scored `a`'s new weights, not the file the spec named."""
    from zoo.cli.compare import check_checkpoints_outside_trained_runs

    spec = in_tmp_dir / "spec.yaml"
    inside = {"a": {"config": BASELINE},
              "c": {"config": BASELINE, "checkpoint": "checkpoints/r/a/checkpoints/last.ckpt"}}
    with pytest.raises(ValueError, match=r"compare run 'c' evaluates checkpoints/r/a/checkpoints/last.ckpt, inside the "
                                         r"run folder of run 'a'"):
        check_checkpoints_outside_trained_runs(inside, built(inside, spec))
    elsewhere = {"a": {"config": BASELINE}, "c": {"config": BASELINE, "checkpoint": "kept/last.ckpt"}}
    check_checkpoints_outside_trained_runs(elsewhere, built(elsewhere, spec))


def test_a_compare_named_as_a_fit_run_is_refused_before_any_run_trains(in_tmp_dir: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """configs/aog_rcnn's compare spec had its fit config's name: the compare wrote its report and runs inside the
    fit's run folder, and the next fit moved half of them to stale/. A report folder holding a fit's config.yaml is
    refused; no shipped compare (a spec, or a fit config's twins) shares a name with a shipped fit config or with
    another compare (the renamed specs first took their fit config's twin compare's name)."""
    (in_tmp_dir / "checkpoints" / "taken").mkdir(parents=True)
    (in_tmp_dir / "checkpoints" / "taken" / "config.yaml").write_text("trainer: {}\n")
    spec = write_spec(in_tmp_dir, {"name": "taken", "runs": {"a": {"config": BASELINE}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", *FAST])
    assert "checkpoints/taken is the run folder of a `train.py fit`" in error and "--name <name>" in error, error
    assert sorted(p.name for p in (in_tmp_dir / "checkpoints" / "taken").iterdir()) == ["config.yaml"]
    from zoo.cli.compare import read_compare_spec

    configs = sorted((REPO / "configs").rglob("*.yaml"))
    fit_names = {yaml.safe_load(path.read_text()).get("trainer", {}).get("logger", {}).get("init_args", {}).get("name")
                 for path in configs if "compare" not in yaml.safe_load(path.read_text())} - {None}
    compare_names = []  # specs', and each fit config's twins' (a config without twins has none)
    for path in configs:
        try:
            compare_names.append(read_compare_spec(path)["name"])
        except ValueError as error:
            assert "declares no twins" in str(error), error
    assert not fit_names & set(compare_names), fit_names & set(compare_names)
    repeated = {name for name in compare_names if compare_names.count(name) > 1}
    assert not repeated, repeated  # two compares in one report folder: the second overwrote the first's report
