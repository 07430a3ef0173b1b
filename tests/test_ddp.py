"""Two-process CPU DDP: the logged validation accuracy equals accuracy recomputed on all ranks' predictions."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from datamodules import PartsWorldDataModule
from tests.conftest import REPO
from zoo.baselines.system import ClassifierSystem
from zoo.icnn.system import ICNNSystem


def two_process_trainer(tmp_path: Path, *callbacks: pl.Callback, **overrides: Any) -> pl.Trainer:
    """Two spawned CPU processes, one epoch, nothing written but what the callbacks save."""
    settings = dict(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, num_sanity_val_steps=0,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path, callbacks=list(callbacks))
    return pl.Trainer(**(settings | overrides))


class SaveValidationPredictions(pl.Callback):
    """Each rank writes its validation predictions, labels and sample indices for the last epoch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        pred = pl_module(batch["image"])["logits"].argmax(-1)
        self.rows.append(torch.stack([pred, batch["label"], batch["index"]], 1))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(torch.cat(self.rows), self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("num_val", [64, 63])  # 63: one rank has a sample fewer, none is counted twice
def test_two_process_ddp_logged_accuracy_equals_gathered(tmp_path: Path, num_val: int) -> None:
    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=128, num_val=num_val, num_test=16, batch_size=16)
    system = ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes)
    trainer = two_process_trainer(tmp_path, SaveValidationPredictions(tmp_path))
    trainer.fit(system, datamodule=data)
    rows = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert (len(rows[0]), len(rows[1])) == (32, num_val - 32)
    assert set(rows[0][:, 2].tolist()).isdisjoint(rows[1][:, 2].tolist())  # each rank saw its own half
    gathered = torch.cat(rows)
    assert sorted(gathered[:, 2].tolist()) == list(range(num_val))
    recomputed = (gathered[:, 0] == gathered[:, 1]).float().mean()
    assert trainer.callback_metrics["val/acc"].item() == recomputed.item()
    # The loss too is the mean over all samples (63: Lightning's integer sample count once made it 32 and 31 -> 31)
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    one_process = single.validate(system, datamodule=data, verbose=False)[0]
    assert one_process["val/loss"] == pytest.approx(trainer.callback_metrics["val/loss"].item(), rel=1e-5)


class SaveStatistics(pl.Callback):
    """Each rank writes its ICNN online statistics at the end of training."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layer = pl_module.model.added_filters
        torch.save({"z": layer.log_mean_z, "category": layer.filter_category, "act": layer.class_activation},
                   self.folder / f"stats{trainer.global_rank}.pt")


def test_icnn_online_statistics_stay_identical_across_ranks(tmp_path: Path) -> None:
    from losses.icnn import FilterPartLoss

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    system = ICNNSystem("icnn_tinycnn", num_classes=data.num_classes,
                                  loss=FilterPartLoss(weight=1.0), model_kwargs={"tau_scale": 16.0})
    trainer = two_process_trainer(tmp_path, SaveStatistics(tmp_path), limit_val_batches=0)
    trainer.fit(system, datamodule=data)
    ranks = [torch.load(tmp_path / f"stats{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.isfinite(ranks[0]["z"]).all()
    for key in ("z", "category", "act"):  # each rank saw different images, yet the statistics agree
        assert torch.allclose(ranks[0][key].float(), ranks[1][key].float(), atol=1e-6), key


class SaveSelectorState(pl.Callback):
    """Each rank writes its black box weights and the per-sample median ranks of its validation shard."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        medians = pl_module.metrics["val_median_rank"].medians  # this rank's, before the epoch-end sync
        torch.save({"black_box": pl_module.black_box.state_dict(), "medians": torch.cat(medians)},
                   self.folder / f"selector{trainer.global_rank}.pt")


def scalar_steps(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of each TensorBoard scalar `tag` logged in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [(event.step, event.value) for event in EventAccumulator(str(folder)).Reload().Scalars(tag)]


def test_l2x_under_a_ddp_launch_trains_each_helper_once_and_syncs_median_rank(tmp_path: Path) -> None:
    """`train.py fit --trainer.strategy ddp` (Lightning re-runs the command line in a second process, as on a
    cluster): the black box and the EVAL-X evaluator are each trained once by both ranks together, on half the data
    each (the evaluator, trained after the black box's fit had started the process group, was trained by each
    process alone on all of it: 8 steps, not 4); both ranks explain one black box; the logged median rank is that of
    every rank's samples."""
    from zoo.l2x.metrics import MedianRank

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # tests.test_ddp importable
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs/l2x/orange_skin.yaml"),
         "--data.init_args.num_train=256", "--data.init_args.num_val=64", "--data.init_args.num_test=16",
         "--data.init_args.batch_size=32", "--model.init_args.black_box_epochs=1",
         "--model.init_args.evaluator_epochs=1", "--trainer.max_epochs=1", "--trainer.strategy=ddp",
         "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
         "--trainer.callbacks+=tests.test_ddp.SaveSelectorState", f"--trainer.callbacks.folder={tmp_path}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "l2x_orange_skin"
    for helper in ("black_box", "evaluator"):  # 256 samples / (32 per batch x 2 ranks): steps 0..3
        assert [step for step, _ in scalar_steps(folder / "auxiliary" / helper, "train/loss_epoch")] == [3], helper
    ranks = [torch.load(tmp_path / f"selector{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0]["black_box"][k], ranks[1]["black_box"][k]) for k in ranks[0]["black_box"])
    reference = MedianRank()
    reference.medians = [torch.cat([ranks[0]["medians"], ranks[1]["medians"]])]
    assert len(reference.medians[0]) == 64
    ((_, logged),) = scalar_steps(folder, "val/median_rank")
    assert logged == pytest.approx(reference.compute().item(), abs=1e-6)


def test_renn_stages_train_under_ddp(tmp_path: Path) -> None:
    from datamodules import RuleSeriesDataModule
    from losses.renn import ReNNLoss
    from zoo.renn.system import ReNNSystem

    pl.seed_everything(0)
    data = RuleSeriesDataModule(num_train=64, num_val=32, num_test=16, batch_size=16)
    system = ReNNSystem(model_name="renn_series", num_classes=4, in_chans=None, data_inputs=data.model_inputs,
                          input_key="series", loss=ReNNLoss(), stages=[
                              {"name": "local", "epochs": 1, "train": ["detector"], "losses": ["loss_local"]},
                              {"name": "global", "epochs": 1, "train": ["head"], "losses": ["loss_task"]}])
    # stages leave submodules without gradients: DDP must look for unused parameters
    trainer = two_process_trainer(tmp_path, strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
                                  max_epochs=2)
    trainer.fit(system, datamodule=data)
    assert {"val/acc", "val/rule_recall", "val/rule_precision"} <= set(trainer.callback_metrics)


class SaveDetections(pl.Callback):
    """Each rank writes its validation detections (with leaf boxes of every partition) and targets."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        detections = pl_module.model(batch["images"])
        fixed = pl_module.model.fixed_partitions()  # (T,) bool each
        for found, target in zip(detections, batch["targets"]):
            masks = {"parse": found["parse_leaves"], **{p: m[None].expand(len(found["boxes"]), -1)
                                                        for p, m in fixed.items()}}  # (D, T) each
            partitions = {p: {**found, "leaf_mask": masks[p]} for p in pl_module.partitions}
            self.rows.append({"target": target, "partitions": partitions})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(self.rows, self.folder / f"detections{trainer.global_rank}.pt")


def test_two_process_ddp_detection_metrics_equal_gathered(tmp_path: Path) -> None:
    from datamodules import PartsWorldScenesDataModule
    from zoo.aog_rcnn.metrics import DetectionAP, ParsePartIoU
    from zoo.aog_rcnn.system import AOGRCNNSystem

    pl.seed_everything(0)
    data = PartsWorldScenesDataModule(num_train=8, num_val=8, num_test=4, canvas_size=96, object_sizes=(32, 48),
                                      batch_size=4)
    # The DDP training path runs (forward, backward, gradient all-reduce) at learning rate 0, so the weights stay at
    # their initialisation, where keeping every (proposal, class) detection leaves some on the objects: every
    # metric compared below is non-zero.
    system = AOGRCNNSystem("aog_rcnn_tinycnn", num_classes=data.num_classes, image_size=96,
                             model_kwargs={"box_detections_per_img": 1000},
                             optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    trainer = two_process_trainer(tmp_path, SaveDetections(tmp_path), strategy=DDPStrategy(start_method="spawn"))
    trainer.fit(system, datamodule=data)
    rows = [row for r in (0, 1) for row in torch.load(tmp_path / f"detections{r}.pt", weights_only=False)]
    assert sorted(int(row["target"]["index"]) for row in rows) == list(range(8))  # both halves, once each
    average_precision = DetectionAP()  # one process over every image: VOC's matching for map_50, COCO's for map
    average_precision.update([{k: row["partitions"]["parse"][k] for k in ("boxes", "scores", "labels")}
                              for row in rows], [row["target"] for row in rows])
    gathered = average_precision.compute()
    assert gathered["map_50"] > 0
    for key in ("map_50", "map"):
        assert trainer.callback_metrics[f"val/{key}"].item() == pytest.approx(gathered[key].item(), abs=1e-6)
    for partition in system.partitions:
        metric = ParsePartIoU()
        metric.update([row["partitions"][partition] for row in rows], [row["target"] for row in rows])
        assert metric.compute()["matched"] > 0
        assert trainer.callback_metrics[f"val/{partition}_part_iou"].item() == pytest.approx(
            metric.compute()["part_iou"].item(), abs=1e-6)


class SaveExplanations(pl.Callback):
    """Each rank writes its validation sentences and references, its frozen modules and its REINFORCE baseline."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

        self.baselines: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: dict[str, Any], batch_idx: int) -> None:
        # read right after the step: DDP re-broadcasts rank 0's buffers before the next forward, hiding any drift
        self.baselines.append(pl_module.loss.discriminative.baseline.item())

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        generated, _ = pl_module.model.explain(batch["image"], batch["label"], mode="greedy")
        self.rows.append((generated, batch["captions"]))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({"sentences": [g for g, _ in self.rows], "captions": [c for _, c in self.rows],
                    "encoder": pl_module.model.image_encoder.state_dict(),
                    "sentence_classifier": pl_module.sentence_classifier.state_dict(),
                    "baselines": torch.tensor(self.baselines)},
                   self.folder / f"explanations{trainer.global_rank}.pt")


def test_textual_explanations_share_frozen_modules_baseline_and_cider(tmp_path: Path) -> None:
    from zoo.engine import prepare_auxiliaries
    from zoo.textual.metrics import CIDErD
    from zoo.textual.system import TextualSystem

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=64, num_val=32, num_test=16, batch_size=16, image_size=32)
    system = TextualSystem(variant="explanation", num_classes=data.num_classes, discriminative_weight=0.2,
                           encoder_epochs=1, sentence_classifier_epochs=1, hidden=64, image_size=32)
    trainer = two_process_trainer(tmp_path, SaveExplanations(tmp_path))
    prepare_auxiliaries(system, trainer, data)  # encoder and sentence classifier, trained with the run's strategy
    trainer.fit(system, datamodule=data)
    ranks = [torch.load(tmp_path / f"explanations{r}.pt", weights_only=True) for r in (0, 1)]
    for module in ("encoder", "sentence_classifier"):  # trained before the first step, then broadcast from rank 0
        assert all(torch.equal(ranks[0][module][k], ranks[1][module][k]) for k in ranks[0][module]), module
    baselines = ranks[0]["baselines"]  # after each step: the mean reward over every rank's batch, so one value
    assert len(baselines) == 2 and ((baselines > 0) & (baselines < 1)).all()
    assert torch.equal(baselines, ranks[1]["baselines"])
    reference = CIDErD(end_token=2, start_token=1)
    for rank in ranks:
        for sentences, captions in zip(rank["sentences"], rank["captions"]):
            reference.update(sentences, captions)
    assert sum(len(s) for rank in ranks for s in rank["sentences"]) == 32
    assert trainer.callback_metrics["val/cider_d"].item() == pytest.approx(reference.compute().item(), rel=1e-6)


def test_a_spawned_rank_ends_its_gloo_group_and_other_launchers_keep_theirs(tmp_path: Path) -> None:
    """ddp_spawn workers left their gloo group to interpreter shutdown, where a rank aborted now and then (SIGABRT,
    "terminate called without an active exception") after fit: the System's teardown now destroys it there, and
    only there (a `ddp` script's next fit / test reuses its group)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from zoo.baselines.system import ClassifierSystem

    try:
        for launcher, ends in ((object.__new__(_SubprocessScriptLauncher), False),
                               (object.__new__(_MultiProcessingLauncher), True)):
            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}{ends}", rank=0,
                                        world_size=1)
            system = ClassifierSystem("baseline_tinycnn", num_classes=3)
            system._trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))
            system.teardown("fit")
            assert dist.is_initialized() != ends, type(launcher).__name__
    finally:
        if dist.is_initialized():  # a failing run leaves no group to the worker's next tests
            dist.destroy_process_group()


def test_two_process_detection_map_with_an_odd_validation_split_equals_one_process(tmp_path: Path) -> None:
    """5 validation scenes on 2 ranks (3 and 2 images): torchmetrics gathers mAP's per-image states one collective
    per image, so the ranks met in mismatched collectives (a crash, or a hang); the shorter rank now pads with empty
    images, which leave COCO AP unchanged: the logged mAP equals one process's on the same model."""
    from datamodules import PartsWorldScenesDataModule
    from zoo.aog_rcnn.metrics import DetectionAP
    from zoo.aog_rcnn.system import AOGRCNNSystem

    pl.seed_everything(0)
    data = PartsWorldScenesDataModule(num_train=4, num_val=5, num_test=4, canvas_size=96, object_sizes=(32, 48),
                                      batch_size=2)
    # At initialisation, keeping every (proposal, class) detection leaves some on the objects: a non-zero mAP.
    system = AOGRCNNSystem("aog_rcnn_tinycnn", num_classes=data.num_classes, image_size=96,
                           model_kwargs={"box_detections_per_img": 1000})
    trainer = two_process_trainer(tmp_path, strategy=DDPStrategy(start_method="spawn"))
    trainer.validate(system, datamodule=data)
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    single.validate(system, datamodule=data)
    assert single.callback_metrics["val/map_50"] > 0
    for name in ("val/map_50", "val/map"):
        assert trainer.callback_metrics[name].item() == pytest.approx(single.callback_metrics[name].item(), abs=1e-6)
    # The padding itself: empty images (no detection, no object) leave both numbers as they are.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    detections = [{"boxes": boxes + 1, "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([0, 1])},
                  {"boxes": boxes[:1] * 2, "scores": torch.tensor([0.7]), "labels": torch.tensor([1])}]
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1])}, {"boxes": boxes[:1] * 2, "labels": torch.tensor([0])}]
    empty = ({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
    real, padded = DetectionAP(), DetectionAP()
    real.update(detections, targets)
    padded.update([*detections, empty[0], empty[0]], [*targets, empty[1], empty[1]])
    assert real.compute()["map_50"] > 0
    assert {k: v.item() for k, v in padded.compute().items()} == {k: v.item() for k, v in real.compute().items()}


class SaveRankZeroReports(pl.Callback):
    """Rank zero writes the test split's intervention curve and the pictures' fixed validation batch: what rank zero
    reads alone from the datamodule's loaders (this rank's shard under DDP)."""

    def __init__(self, folder: Path) -> None:
        from zoo.cbm.callback import InterventionCallback

        self.folder, self.intervention = folder, InterventionCallback(num_points=5)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from zoo.engine.callbacks import FixedBatchCallback

        self.intervention.on_test_end(trainer, pl_module)  # rank zero only, as in a run
        if trainer.is_global_zero:
            torch.save({"curve": self.intervention.curves["test"]["acc"],
                        "fixed": FixedBatchCallback().fixed_batch(trainer)["index"]}, self.folder / "reports.pt")


def test_rank_zero_reports_read_the_whole_split_as_one_process(tmp_path: Path) -> None:
    """CBM's intervention curve and the pictures' fixed batch are computed on rank zero alone: from its shard of the
    split they changed with the process count (test.md's k = 0 row 0.2280 with two processes, 0.2500 with one, the
    task accuracy), and the pictures showed other images. Both now read the whole split."""
    from zoo.cbm.system import CBMSystem

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_classes=4, num_train=16, num_val=30, num_test=30, batch_size=8, image_size=32)
    cbm = CBMSystem(model_name="cbm_tinycnn", num_classes=4, image_size=32)
    trainer = two_process_trainer(tmp_path, SaveRankZeroReports(tmp_path))
    accuracy = trainer.test(cbm, datamodule=data, verbose=False)[0]["test/acc"]
    spawned = torch.load(tmp_path / "reports.pt", weights_only=True)
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[SaveRankZeroReports(tmp_path)])
    single.test(cbm, datamodule=data, verbose=False)
    one_process = torch.load(tmp_path / "reports.pt", weights_only=True)
    assert spawned["curve"][0] == pytest.approx(accuracy, abs=1e-6)  # k = 0: the task accuracy over every rank
    assert spawned["curve"] == pytest.approx(one_process["curve"], abs=1e-6)
    assert torch.equal(spawned["fixed"], one_process["fixed"])
    assert [int(data.split_samples("val")[i]["label"]) for i in spawned["fixed"].tolist()] == [0, 1, 2, 3] * 2
