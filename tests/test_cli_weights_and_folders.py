"""validate / test / predict never evaluate untrained weights by accident; a checkpoint of another model is refused
with a hint that fits the command (and the caller: Python or the command line); a run folder at or below a file is
refused before anything is written. Every refusal here comes before any training: no run is fitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from tests.conftest import REPO
from tests.test_checkpoint_config import refused
from train import main
from zoo.weights import CheckpointError

ICNN = str(REPO / "configs/icnn/parts_world.yaml")
BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
TINY_WORLD = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
              "--data.init_args.batch_size=8", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"]


def earlier_run(folder: Path) -> dict[Path, bytes]:
    """A run folder as a fit and a predict left it (the files' contents stand in: the refusals read none of them):
    its checkpoints, and its earlier predictions.csv and picture, which a refused predict must keep."""
    files = {folder / "checkpoints" / "last.ckpt": b"last", folder / "checkpoints" / "best-epoch0-step1.ckpt": b"best",
             folder / "predictions" / "predictions.csv": b"index,pred\n0,1\n",
             folder / "predictions" / "00000.png": b"picture"}
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused_naming_the_runs_checkpoints(
        command: str, in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """validate / test / predict without --ckpt_path ran the model's random weights, exit 0, and wrote untrained
    metrics (<run>/test) or 500 predictions (after removing the run's earlier predictions.csv and pictures)."""
    run = in_tmp_dir / "checkpoints" / "run"
    files = earlier_run(run)
    error = refused(capsys, [command, "--config", ICNN, *TINY_WORLD, "--trainer.logger.init_args.name=run"])
    assert f"{command}: no --ckpt_path is given" in error and "untrained" in error, error
    assert "checkpoints/run/checkpoints/last.ckpt" in error and "run/checkpoints/best-epoch0-step1.ckpt" in error, error
    assert "--ckpt_path last" in error and "pretrained_path" in error, error
    assert all(path.read_bytes() == content for path, content in files.items())  # nothing removed
    assert not (run / "test").exists() and not (run / "validate").exists()


def test_ckpt_path_last_that_finds_none_is_refused_outside_fit(in_tmp_dir: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """`--ckpt_path last` where the run has no last.ckpt (a mistyped run name) evaluated untrained weights with
    Lightning's warning only ("Set ModelCheckpoint(save_last=True)", which the zoo's runs do); the runs that do
    hold checkpoints are named."""
    earlier_run(in_tmp_dir / "checkpoints" / "run")
    for command in ("predict", "validate"):
        error = refused(capsys, [command, "--config", ICNN, *TINY_WORLD, "--trainer.logger.init_args.name=rnu",
                                 "--ckpt_path=last"])
        assert f"{command}: `last` finds no last.ckpt" in error and "untrained" in error, error
        assert "runs beside it that hold some: run " in error and "save_last" not in error, error
    assert not (in_tmp_dir / "checkpoints" / "rnu" / "predictions").exists()


@pytest.mark.filterwarnings("ignore:Backbone 'tinycnn' starts from pretrained weights")
def test_a_model_with_starting_weights_of_its_own_is_evaluated_as_built(in_tmp_dir: Path) -> None:
    """Evaluating a pretrained model as built (its model_kwargs.pretrained_path) needs no checkpoint: kept."""
    torch.manual_seed(0)
    weights = in_tmp_dir / "start.pth"
    torch.save(zoo.create_model("baseline_tinycnn", num_classes=6).backbone.body.state_dict(), weights)
    cli = main(["validate", "--config", BASELINE, *TINY_WORLD, "--trainer.limit_val_batches=1",
                f"--model.init_args.model_kwargs.pretrained_path={weights}"])
    assert "val/acc" in cli.trainer.callback_metrics


@pytest.mark.filterwarnings("ignore:Backbone 'tinycnn' starts from pretrained weights")
def test_a_run_trained_from_starting_weights_is_evaluated_from_its_checkpoints(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A run fine-tuned from a pretrained_path: its config's validate / predict without --ckpt_path scored the
    file's backbone with a random head and replaced the run's predictions, exit 0. Refused while the run holds
    checkpoints; `fast_dev_run` (which resolves no `last`) is named as the reason, not a missing last.ckpt."""
    weights = in_tmp_dir / "start.pth"
    torch.save(zoo.create_model("baseline_tinycnn", num_classes=6).backbone.body.state_dict(), weights)
    files = earlier_run(in_tmp_dir / "checkpoints" / "tuned")
    starts = [f"--model.init_args.model_kwargs.pretrained_path={weights}", "--trainer.logger.init_args.name=tuned"]
    for command in ("validate", "predict"):
        error = refused(capsys, [command, "--config", BASELINE, *TINY_WORLD, *starts])
        assert f"{command}: no --ckpt_path is given" in error and "tuned/checkpoints/last.ckpt" in error, error
    error = refused(capsys, ["validate", "--config", BASELINE, *TINY_WORLD, *starts, "--ckpt_path=last",
                             "--trainer.fast_dev_run=true"])
    assert "fast_dev_run resolves no `--ckpt_path last`" in error and "finds no last.ckpt" not in error, error
    assert all(path.read_bytes() == content for path, content in files.items())  # nothing removed


def fake_checkpoint(path: Path, class_path: str, model_name: str, num_classes: int = 6) -> Path:
    """A System checkpoint's header (what the checks read before anything is built), without weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"_class_path": class_path, "model_name": model_name, "num_classes": num_classes},
                "state_dict": {}}, path)
    return path


def test_a_checkpoint_of_another_model_is_refused_with_a_hint_for_the_command(in_tmp_dir: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """predict of a baseline checkpoint with an ICNN config said "... or start this one without --ckpt_path", which
    for predict / validate / test is refused now (it would evaluate random weights): they are told the checkpoint's
    own run config. fit keeps its resume-or-start-afresh hint."""
    run = in_tmp_dir / "checkpoints" / "plain"
    ckpt = fake_checkpoint(run / "checkpoints" / "last.ckpt", "zoo.baselines.system.ClassifierSystem",
                           "baseline_tinycnn")
    (run / "config.yaml").write_text("# the run's config\n")
    for command in ("predict", "test"):
        error = refused(capsys, [command, "--config", ICNN, *TINY_WORLD, f"--ckpt_path={ckpt}"])
        assert "holds baseline_tinycnn" in error and "without --ckpt_path" not in error, error
        assert f"--config {run / 'config.yaml'}" in error, error
    error = refused(capsys, ["fit", "--config", ICNN, *TINY_WORLD, f"--ckpt_path={ckpt}"])
    assert "without --ckpt_path" in error, error


def test_load_checkpoint_of_another_class_count_gives_a_python_hint(tmp_path: Path) -> None:
    """zoo.load_checkpoint(path, num_classes=3) told a Python caller to give --model.init_args.model_kwargs.
    pretrained_path=, a command-line option; the command line keeps it."""
    ckpt = fake_checkpoint(tmp_path / "run.ckpt", "zoo.baselines.system.ClassifierSystem", "baseline_tinycnn")
    with pytest.raises(CheckpointError, match="holds baseline_tinycnn with 6 classes") as error:
        zoo.load_checkpoint(ckpt, num_classes=3)
    assert "--model.init_args" not in str(error.value), error.value
    assert "zoo.create_model('baseline_tinycnn', num_classes=3, pretrained_path=" in str(error.value), error.value


@pytest.mark.parametrize("setting, given, blocking", [
    ("--trainer.logger.init_args.save_dir", "afile", "afile"),
    ("--trainer.logger.init_args.save_dir", "afile/deeper", "afile"),
    ("--trainer.logger.init_args.name", "afile", "checkpoints/afile"),
])
def test_a_run_folder_at_or_below_a_file_is_refused_naming_the_setting(
        setting: str, given: str, blocking: str, in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A logger save_dir (or name) that is a file raised NotADirectoryError from TensorBoardLogger's makedirs, with a
    traceback, once the fit had started; refused now when the Trainer is built, the file left as it was."""
    (in_tmp_dir / blocking).parent.mkdir(parents=True, exist_ok=True)
    (in_tmp_dir / blocking).write_text("mine")
    error = refused(capsys, ["fit", "--config", ICNN, *TINY_WORLD, f"{setting}={given}"])
    assert f"{setting}" in error and f"{blocking!r} is a file, not a folder" in error, error
    assert (in_tmp_dir / blocking).read_text() == "mine"
