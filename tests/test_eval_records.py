"""A run's per-epoch record (its pictures <name>/epoch<e>.png / .md and its TensorBoard curves) is the fit's alone:
`validate` / `test` of its checkpoint, and compare's validation after fit, write their pictures under their stage's
name and log to TensorBoard apart (<run>/validate, <run>/test)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO
from zoo.engine.callbacks import FixedBatchCallback
from zoo.figures import new_figure


def digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def steps(folder: Path, kind: str, tag: str) -> list[int]:
    """The steps of TensorBoard `tag` (of `kind`: "scalars", "images") in the event files directly in `folder`."""
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    read = events.Scalars if kind == "scalars" else events.Images
    return [event.step for event in read(tag)] if tag in events.Tags()[kind] else []


def test_validate_and_test_of_a_checkpoint_leave_the_fits_pictures_and_curves(in_tmp_dir: Path) -> None:
    """Two epochs of ICNN, then `validate` and `test` of last.ckpt with the run's config.yaml (its folder): validate
    overwrote filters/epoch0.png / .md with the final weights' pictures and put val/acc and filters/maps points at
    step 0 of the fit's curves ([3, 7, 0]). Now its pictures are filters/validate.png / .md and its events are in
    <run>/validate; the fit's files and curves are as fit left them."""
    from train import main

    main(["fit", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--trainer.max_epochs=2",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
          "--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16",
          "--data.init_args.image_size=32", "--trainer.callbacks.init_args.num_images=4",
          "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    filters = run / "filters"
    fit_files = {path.name: digest(path) for path in filters.iterdir()}
    assert set(fit_files) == {"epoch0.png", "epoch0.md", "epoch1.png", "epoch1.md"}
    fit_curves = steps(run, "scalars", "val/acc"), steps(run, "images", "filters/maps")
    assert fit_curves == ([1, 3], [1, 3])  # an epoch's pictures at its val/* points (were one step right)
    for command in ("validate", "test"):
        main([command, "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert {path.name: digest(path) for path in filters.iterdir() if path.stem.startswith("epoch")} == fit_files
    assert (filters / "validate.png").is_file() and "filter" in (filters / "validate.md").read_text()
    assert (steps(run, "scalars", "val/acc"), steps(run, "images", "filters/maps")) == fit_curves
    assert steps(run / "validate", "scalars", "val/acc") == [0] and steps(run / "validate", "images", "filters/maps")
    assert steps(run / "test", "scalars", "test/acc") == [0]
    assert not (run / "validate" / "filters").exists() and (run / "checkpoints" / "last.ckpt").is_file()


class Recorder(FixedBatchCallback):
    """A picture callback that publishes a blank figure, as every family's does."""

    num_items = 2

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: None) -> None:
        figure, _ = new_figure(1, 1)
        self.publish(trainer, "record", figure, f"{trainer.state.fn.value}\n", "figure")


def test_a_validation_after_fit_writes_no_picture_for_an_epoch_that_never_ran(tmp_path: Path) -> None:
    """compare validates each run after its fit with the same trainer: at current_epoch = max_epochs, which never
    ran (record/epoch1.png after a one-epoch fit). Its picture is record/validate.png now."""
    from datamodules import PartsWorldDataModule
    from zoo.baselines.system import ClassifierSystem

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_classes=4, num_train=32, num_val=8, num_test=8, batch_size=8, image_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                         logger=pl.loggers.TensorBoardLogger(tmp_path, name="run", version=""),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Recorder()])
    system = ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes, image_size=32)
    trainer.fit(system, datamodule=data)
    trainer.validate(system, datamodule=data, verbose=False)
    folder = tmp_path / "run" / "record"
    assert sorted(path.name for path in folder.iterdir()) == ["epoch0.md", "epoch0.png", "validate.md",
                                                              "validate.png"]
    assert (folder / "epoch0.md").read_text() == "fit\n" and (folder / "validate.md").read_text() == "validate\n"


def test_pictures_reach_a_tensorboard_listed_after_another_logger(tmp_path: Path) -> None:
    """`logger: [CSVLogger, TensorBoardLogger]`: the pictures and tables went to `trainer.logger`, the first one
    only, so TensorBoard had the scalars and no picture, without a word. Every TensorBoard logger gets them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from datamodules import PartsWorldDataModule
    from zoo.baselines.system import ClassifierSystem

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_classes=4, num_train=16, num_val=8, num_test=8, batch_size=8, image_size=32)
    loggers = [pl.loggers.CSVLogger(tmp_path, name="csv", version=""),
               pl.loggers.TensorBoardLogger(tmp_path, name="run", version="")]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                         logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Recorder()])
    trainer.fit(ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes, image_size=32), datamodule=data)
    loggers[1].experiment.flush()
    tags = EventAccumulator(str(tmp_path / "run")).Reload().Tags()
    assert "record/figure" in tags["images"] and "record/table/text_summary" in tags["tensors"]


def test_no_picture_callback_names_its_files_by_the_epoch_alone() -> None:
    """The families whose callbacks write their own files (L2X selections, textual explanations, AOG parse trees)
    named them `epoch{trainer.current_epoch}` and still overwrote the fit's epoch-0 files at validate: every file
    name of a record comes from `record_name`."""
    file_named_by_epoch = re.compile(r"epoch\{trainer\.current_epoch\}\.\w+")  # f"epoch{...}.png", ".md"
    named_by_epoch = [path.relative_to(REPO) for path in (REPO / "zoo").rglob("*.py")
                      if file_named_by_epoch.search(path.read_text())]
    assert not named_by_epoch, named_by_epoch


def test_no_picture_callback_logs_at_the_optimizer_step() -> None:
    """Pictures and texts logged at `trainer.global_step` (optimizer steps, raised before Lightning logs an epoch's
    val/* scalars at its count of batches that stepped) sat one step right of those scalars in TensorBoard (the
    first test: [2, 4] beside [1, 3]): every log_figure / log_image / log_text call passes `logged_step(trainer)`
    (compare's explanation figure: at step 0 of the run's curves, not at the validation it explains)."""
    inner = r"\((?:[^()]|\([^()]*\))*\)"  # a call's parentheses, two levels deep
    logged_at = re.compile(rf"log_(?:figure|image|text)\((?:[^()]|{inner})*\)", re.S)
    at_optimizer_step = [(path.relative_to(REPO), call) for path in (REPO / "zoo").rglob("*.py")
                         for call in logged_at.findall(path.read_text()) if "global_step" in call]
    assert not at_optimizer_step, at_optimizer_step
    calls = [call for path in (REPO / "zoo").rglob("*.py") for call in logged_at.findall(path.read_text())
             if "trainer" in call]
    assert len(calls) >= 10 and all(re.search(r"logged_step\((?:cli\.)?trainer[,)]", call) for call in calls), calls
    first_logger_only = [call for call in calls if not re.search(r"log_\w+\((?:cli\.)?trainer\.loggers,", call)]
    assert not first_logger_only, first_logger_only  # (`trainer.logger`: the first logger only)
