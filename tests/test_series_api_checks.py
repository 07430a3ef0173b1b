"""Series checkpoints, series files and `zoo.explain` targets checked by name: a series model's channel count (held
in `data_inputs`, not `in_chans`) is compared with the data's / the caller's, instead of torch's "size mismatch" or a
correct call refused; NaN / inf / fractional labels in a series file name their rows; a non-integer explanation
target is refused instead of truncated to another class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from datamodules import DatasetLayoutError, SeriesFileDataModule
from tests.conftest import REPO
from train import command_line, main
from zoo.weights import CheckpointError

ONE_STEP = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
            "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]


def write_series(path: Path, channels: int, num: int = 24, length: int = 32) -> Path:
    generator = np.random.default_rng(0)
    np.savez(path, series=generator.normal(size=(num, channels, length)).astype(np.float32),
             label=np.arange(num) % 2)
    return path


def series_fit_args(path: Path) -> list[str]:
    return ["--config", str(REPO / "configs/baselines/rule_series_cnn.yaml"),
            "--data=datamodules.SeriesFileDataModule", f"--data.init_args.path={path}",
            "--data.init_args.num_classes=2", "--data.init_args.batch_size=8"]


@pytest.fixture
def one_channel_run(in_tmp_dir: Path) -> tuple[Path, Path]:
    """A one-step baseline_cnn1d fit on a 1-channel series file: (its config.yaml, its last.ckpt)."""
    main(["fit", *series_fit_args(write_series(in_tmp_dir / "one.npz", 1)), *ONE_STEP,
          "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    return run / "config.yaml", run / "checkpoints" / "last.ckpt"


def test_series_checkpoint_on_data_of_other_channels_is_refused_by_name(
        one_channel_run: tuple[Path, Path], in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """predict / validate of a 1-channel series checkpoint with 2-channel data raised torch's "size mismatch for
    model.features.0.weight" traceback (the series' channels are in data_inputs, its in_chans None)."""
    config, ckpt = one_channel_run
    two = write_series(in_tmp_dir / "two.npz", 2)
    for subcommand in ("predict", "validate"):
        with pytest.raises(SystemExit) as exit_info:
            command_line([subcommand, "--config", str(config), f"--ckpt_path={ckpt}", f"--data.init_args.path={two}"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in error and "size mismatch" not in error, error
        assert "in_chans=1" in error and "in_chans=2" in error, error
    main(["predict", "--config", str(config), f"--ckpt_path={ckpt}"])  # its own data still predicts


def test_load_checkpoint_checks_a_series_models_channels(one_channel_run: tuple[Path, Path]) -> None:
    """load_checkpoint(in_chans=1) of a 1-channel series checkpoint was refused ("in_chans=None")."""
    _, ckpt = one_channel_run
    model = zoo.load_checkpoint(ckpt, in_chans=1, num_classes=2)
    assert model(torch.rand(3, 1, 32))["logits"].shape == (3, 2)
    with pytest.raises(CheckpointError, match=r"\(in_chans=1\); this run builds .*\(in_chans=2\)"):
        zoo.load_checkpoint(ckpt, in_chans=2)


def test_a_series_system_built_in_python_loads_its_own_checkpoint(tmp_path: Path) -> None:
    """A series System built in Python (in_chans left at its default, the channels in data_inputs) was refused its
    own checkpoint by load_from_checkpoint, trainer.validate(ckpt_path=) and a resumed fit ("this run builds ...
    (in_chans=3)") once the checkpoint side read the channels from data_inputs: both sides are read alike now."""
    import pytorch_lightning as pl

    from datamodules import RuleSeriesDataModule
    from zoo.baselines.system import ClassifierSystem

    data = RuleSeriesDataModule(num_train=32, num_val=16, num_test=16, batch_size=16)
    system = ClassifierSystem("baseline_cnn1d", num_classes=data.num_classes, data_inputs=data.model_inputs,
                              input_key="series")
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_train_batches=1, limit_val_batches=1,
                   default_root_dir=str(tmp_path))
    trainer = pl.Trainer(**options)
    trainer.fit(system, datamodule=data)
    trainer.save_checkpoint(tmp_path / "series.ckpt")
    loaded = ClassifierSystem.load_from_checkpoint(tmp_path / "series.ckpt")
    assert loaded.hparams.data_inputs["in_chans"] == 1
    pl.Trainer(**options).validate(system, datamodule=data, ckpt_path=str(tmp_path / "series.ckpt"), verbose=False)


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.5])
def test_series_file_labels_that_are_no_class_ids_name_their_rows(tmp_path: Path, suffix: str, bad: float) -> None:
    """A NaN label said only "labels must be integers" (no row), an inf one "labels span [-9223372036854775808, 1]"."""
    label = np.array([0.0, 1.0, 0.0, bad, 1.0])
    series = np.zeros((5, 16))
    path = tmp_path / f"s{suffix}"
    if suffix == ".npz":
        np.savez(path, series=series, label=label)
    else:
        np.savetxt(path, np.column_stack([label, series]), delimiter=",")
    what = "NaN or inf" if not np.isfinite(bad) else "non-integer values"
    lines = r"; CSV lines \[4\]" if suffix == ".csv" else ""
    with pytest.raises(DatasetLayoutError, match=rf"label of 1 row\(s\) hold {what}.*: rows \[3\] \(0-based{lines}\)"):
        SeriesFileDataModule(path, num_classes=2)


def test_explain_refuses_targets_that_are_no_class_ids() -> None:
    """target=2.7 explained class 2 silently (`.long()` truncates); a float tensor alike."""
    model = zoo.create_model("baseline_tinycnn", num_classes=3)
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"target must be integer class ids; got \[2\.7\]"):
        zoo.explain(model, images, target=2.7)
    with pytest.raises(ValueError, match=r"target must be integer class ids; got \[0\.5\]"):
        zoo.explain(model, images, target=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="target must be integer class ids; got torch.bool"):
        zoo.explain(model, images, target=True)
    torch.testing.assert_close(zoo.explain(model, images, target=2.0), zoo.explain(model, images, target=2))


def test_renn_on_a_series_file_without_patterns_is_refused_at_setup(in_tmp_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """ReNN's staged config on a file with only `series` and `label` failed inside the first training step with
    KeyError "stage 'local' sums ['loss_local'], which the loss does not return": it is a configuration error at
    setup now, naming the file, the missing annotations and the way out; without the local term it trains."""
    path = write_series(in_tmp_dir / "own.npz", 1, num=16, length=128)
    args = ["fit", "--config", str(REPO / "configs/renn/rule_series.yaml"),
            "--data=datamodules.rule_series.SeriesFileDataModule", f"--data.init_args.path={path}",
            "--data.init_args.num_classes=4", "--data.init_args.batch_size=8", *ONE_STEP]
    with pytest.raises(SystemExit) as exit_info:
        command_line(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error and "KeyError" not in error, error
    assert error.count("has no `patterns` annotations") == 1 and "own.npz" in error, error
    assert "['local', 'joint'] sum 'loss_local'" in error and "--model.init_args.stages=null" in error, error
    main([*args, "--model.init_args.stages=null"])  # the detectors learn through loss_task
