"""What TensorBoard shows of a run: HPARAMS entries (one per fit, compare run or ablate point, with the loss and
optimiser settings as columns and the checkpoint monitor's value as hp_metric, kept over a resume) and loss curves
that compare like with like (a staged run's val/loss sums every term in every stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml

from tests.conftest import REPO
from train import main

ICNN = str(REPO / "configs/icnn/parts_world.yaml")
WEIGHT = "model.init_args.loss.init_args.weight"
TINY = ["--data.init_args.num_train=32", "--data.init_args.num_val=16", "--data.init_args.num_test=16",
        "--data.init_args.batch_size=16", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.callbacks=[]"]


def hparams_entries(root: Path) -> dict[str, dict[str, Any]]:
    """{run folder (relative to `root`): {"columns", "metrics", "session": {hparam: value}, "scalars": {tag: [(step,
    value), ...]}}} for every folder under `root` whose event files hold an HPARAMS session, read as TensorBoard
    reads them (EventAccumulator: the last summary of each tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    entries = {}
    for folder in sorted({path.parent for path in root.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        try:
            content = events.PluginTagToContent("hparams")
        except KeyError:  # no HPARAMS summary in this folder
            continue
        if "_hparams_/session_start_info" not in content:
            continue
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        session = {key: value.string_value if value.HasField("string_value") else
                   value.bool_value if value.HasField("bool_value") else value.number_value
                   for key, value in start.session_start_info.hparams.items()}
        entries[folder.relative_to(root).as_posix()] = {
            "columns": [info.name for info in experiment.hparam_infos],
            "metrics": [info.name.tag for info in experiment.metric_infos], "session": session,
            "scalars": {tag: [(event.step, event.value) for event in events.Scalars(tag)]
                        for tag in events.Tags()["scalars"]}}
    return entries


def test_ablate_lists_each_point_once_with_the_grid_column_and_its_metrics(in_tmp_dir: Path) -> None:
    """Each point's fit wrote Lightning's own HPARAMS entry (every System hparam as a column, hp_metric -1) beside
    ablate's: TensorBoard took its columns from a point run's, without the grid key or the point metrics, and
    listed every point twice."""
    main(["ablate", "--config", ICNN, "--name", "abl", "--grid", f"{WEIGHT}=[0,1]", *TINY])
    entries = hparams_entries(in_tmp_dir / "checkpoints" / "abl")
    assert sorted(entries) == ["hparams/weight=0", "hparams/weight=1"]
    for point, entry in entries.items():
        assert entry["columns"] == [WEIGHT]
        assert sorted(entry["metrics"]) == ["hparam/acc", "hparam/location_instability", "hparam/part_iou"]
        assert entry["session"] == {WEIGHT: float(point[-1])}


def test_fit_hparams_show_loss_and_optimiser_and_hp_metric_is_the_monitor_over_a_resume(in_tmp_dir: Path) -> None:
    """HPARAMS left out the loss and optimiser (a fit with another loss weight and learning rate had the same
    hparams.yaml and columns as the default run), showed LightningCLI's `_instantiator`, and hp_metric stayed -1,
    written again at step 0 by every resume; the checkpoint's hyper_parameters stay as they were."""
    args = ["--config", ICNN, *TINY, f"--{WEIGHT}=0.25", "--model.init_args.optimizer.init_args.lr=0.0042",
            "--trainer.logger.init_args.name=run"]
    main(["fit", *args])
    run = in_tmp_dir / "checkpoints" / "run"
    entry = hparams_entries(run)["."]
    assert entry["session"]["loss"] == "losses.icnn.FilterPartLoss" and entry["session"]["loss/weight"] == 0.25
    assert entry["session"]["optimizer"] == "torch.optim.Adam"
    assert entry["session"]["optimizer/lr"] == pytest.approx(0.0042)
    assert entry["session"]["scheduler"] == "None"  # Lightning writes None as its text
    assert not [column for column in entry["columns"] if column.startswith("_")]  # no `_instantiator`
    assert entry["metrics"] == ["hp_metric"]
    val_acc = entry["scalars"]["val/acc"][-1]  # (step, value)
    assert entry["scalars"]["hp_metric"][-1] == pytest.approx(val_acc)  # the monitor's, at its step: not -1
    saved = yaml.safe_load((run / "hparams.yaml").read_text())
    assert saved["loss/weight"] == 0.25 and saved["optimizer/lr"] == pytest.approx(0.0042)
    held = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert not {"loss", "optimizer", "scheduler", "loss/weight"} & set(held) and "_instantiator" in held

    main(["fit", *args, "--ckpt_path=last"])  # resumed with nothing left to train: no placeholder -1 at step 0
    hp_metric = hparams_entries(run)["."]["scalars"]["hp_metric"]
    assert hp_metric[-1][1] == pytest.approx(val_acc[1]) and -1 not in [value for _, value in hp_metric]

    # a new fit of those weights (no --ckpt_path) is another run: it does not carry their run's hp_metric
    from pytorch_lightning.loggers import TensorBoardLogger
    from zoo.icnn.system import ICNNSystem

    loaded = ICNNSystem.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         logger=TensorBoardLogger(str(in_tmp_dir), name="new"), enable_progress_bar=False,
                         callbacks=[pl.callbacks.ModelCheckpoint(monitor="val/acc", save_last=True)])
    trainer.fit(loaded, datamodule=main(["fit", *args, "--trainer.fast_dev_run=true"]).datamodule)
    new = hparams_entries(in_tmp_dir / "new")["version_0"]  # no value of its own yet (no validation): none shown
    assert "hp_metric" not in new["scalars"] and new["metrics"] == ["hp_metric"]


class TwoTerms(torch.nn.Module):
    """Cross-entropy and a second term with a value of its own, as named loss terms."""

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        task = torch.nn.functional.cross_entropy(out["logits"], batch["label"])
        return {"loss_task": task, "loss_extra": out["logits"].pow(2).mean() + 1.0}


def test_a_staged_runs_val_loss_sums_every_term_in_every_stage(tmp_path: Path) -> None:
    """val/loss sums every term the loss returns, whatever the stage (train/loss sums the stage's): a scheduler or
    early stop on val/loss compares like with like across stages. A stage's own sum there (kept for one commit) fell
    from ReNN's local stage to its global one, so ReduceLROnPlateau cut the lr tenfold and EarlyStopping ended the
    run two epochs early, silently; and validating a staged checkpoint on data without the local stage's patterns
    raised KeyError. Each term is logged under its own name too."""
    from datamodules import PartsWorldDataModule
    from zoo.engine import ZooSystem

    data = PartsWorldDataModule(num_classes=4, num_train=16, num_val=16, num_test=8, batch_size=8, image_size=32)
    stages = [{"name": "task", "epochs": 1, "losses": ["loss_task"]}]

    def system() -> ZooSystem:
        return ZooSystem("baseline_tinycnn", num_classes=4, image_size=32, loss=TwoTerms(), stages=stages)

    def trainer(**settings: Any) -> pl.Trainer:
        return pl.Trainer(**({"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "enable_model_summary": False,
                              "num_sanity_val_steps": 0, "default_root_dir": tmp_path, "limit_train_batches": 1,
                              "limit_val_batches": 1} | settings))

    pl.seed_everything(0)
    fitted = system()
    fitting = trainer(max_epochs=1)
    fitting.fit(fitted, datamodule=data)
    logged = fitting.callback_metrics
    assert logged["train/loss"] == pytest.approx(logged["train/loss_task"].item())  # the stage's objective
    assert logged["val/loss"] == pytest.approx((logged["val/loss_task"] + logged["val/loss_extra"]).item(), rel=1e-5)
    assert logged["val/loss_extra"] > 1  # logged under its own name
    validated = trainer().validate(fitted, datamodule=data, verbose=False)[0]
    assert validated["val/loss"] == pytest.approx(validated["val/loss_task"] + validated["val/loss_extra"], rel=1e-5)
