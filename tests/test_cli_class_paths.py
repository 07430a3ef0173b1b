"""A mistyped class_path (data, model, loss, optimiser, scheduler) gets a did-you-mean naming the setting, the path
given and the path meant; a mistyped optimiser argument under another library's name (`learning_rate`) gets torch's.
Each fails at parse time: no data is built, nothing trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from train import command_line

CONFIG = str(REPO / "configs/icnn/parts_world.yaml")
GUARD = "--trainer.fast_dev_run=true"  # were a case to parse (jsonargparse resolves a right bare name), one batch


@pytest.mark.parametrize(("option", "hint"), [
    ("--data.class_path=datamodules.PartsWorldDatamodule",
     "data.class_path 'datamodules.PartsWorldDatamodule' names no class: "
     "did you mean 'datamodules.PartsWorldDataModule'?"),
    ("--model.class_path=zoo.icnn.system.ICNNSytem",
     "model.class_path 'zoo.icnn.system.ICNNSytem' names no class: did you mean 'zoo.icnn.system.ICNNSystem'?"),
    ("--model.init_args.loss.class_path=losses.icnn.FilterPartLos",
     "model.init_args.loss.class_path 'losses.icnn.FilterPartLos' names no class: "
     "did you mean 'losses.icnn.FilterPartLoss'?"),
    ("--model.class_path=zoo.icn.system.ICNNSystem",  # a package that is not there: its parent's submodules
     "model.class_path 'zoo.icn.system.ICNNSystem' names no class: did you mean 'zoo.icnn.system.ICNNSystem'?"),
    ("--data.class_path=datamodules.parts_wrld.PartsWorldDataModule",  # reported as "has no attribute 'parts_wrld'"
     "did you mean 'datamodules.parts_world.PartsWorldDataModule'?"),
    ("--model.class_path=zoo.icnn.ICNNSystem",  # a class in another module: found among the zoo's classes
     "did you mean 'zoo.icnn.system.ICNNSystem'?"),
    ("--data.class_path=PartsWorldDatamodule",  # a bare class name: its full path
     "data.class_path 'PartsWorldDatamodule' names no class: did you mean 'datamodules.PartsWorldDataModule'?"),
    ("--model.init_args.loss.class_path=FilterPartLos",  # (a bare name that is right is taken by jsonargparse)
     "model.init_args.loss.class_path 'FilterPartLos' names no class: did you mean 'losses.icnn.FilterPartLoss'?"),
    ("--model.init_args.optimizer.class_path=Adamw",
     "model.init_args.optimizer.class_path 'Adamw' names no class: did you mean 'torch.optim.AdamW'?"),
    ("--model.init_args.optimizer.class_path=torch.optim.Adamw",  # the same name up to case, not the closer Adam
     "did you mean 'torch.optim.AdamW'?"),
    ("--model.init_args.scheduler.class_path=torch.optim.lr_scheduler.StepLr",
     "model.init_args.scheduler.class_path 'torch.optim.lr_scheduler.StepLr' names no class: "
     "did you mean 'torch.optim.lr_scheduler.StepLR'?"),
    ("--model.init_args.optimizer.init_args.learning_rate=0.1", "did you mean 'lr'?"),  # too far for difflib
    ("--model.init_args.optimizer.init_args.wd=0.1", "did you mean 'weight_decay'?"),
])
def test_a_mistyped_class_path_gets_the_path_meant(option: str, hint: str, in_tmp_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        command_line(["fit", "--config", CONFIG, GUARD, option])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and hint in error and "Traceback" not in error, error


def test_a_class_path_with_no_close_class_says_what_a_class_path_is(in_tmp_dir: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        command_line(["fit", "--config", CONFIG, GUARD, "--data.class_path=Xyzzy"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "data.class_path 'Xyzzy' names no class: no close name" in error, error
    assert "as 'datamodules.PartsWorldDataModule'" in error and "did you mean" not in error, error


def test_a_word_for_a_number_is_not_taken_for_a_class_path(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Adam's `lr: float | Tensor` union: jsonargparse also tries 'abc' as a class, and the hint said the lr's
    "class_path 'abc' names no class"; it is a number's option."""
    for given in ("abc", "0.0.1"):  # (the second: "Unexpected import path format")
        with pytest.raises(SystemExit) as exit_info:
            command_line(["fit", "--config", CONFIG, GUARD, f"--model.init_args.optimizer.init_args.lr={given}"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"optimizer.init_args.lr expects a number (float); got '{given}'" in error
        assert "names no class" not in error, error


def test_yaml_that_does_not_parse_is_named_among_several_configs(in_tmp_dir: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """jsonargparse says where in "<unicode string>" the YAML breaks, not which --config file it is."""
    (in_tmp_dir / "broken.yaml").write_text("trainer: {max_epochs: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        command_line(["fit", "--config", CONFIG, "--config", "broken.yaml", GUARD])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "the YAML that does not parse is 'broken.yaml', line 2" in error, error
