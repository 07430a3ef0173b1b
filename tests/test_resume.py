"""Nothing is lost when a run dies: SIGKILL mid-epoch, resume from last.ckpt, same final state as a run that never
died; checkpoints load for inference, export to safetensors, and mismatches are named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from tests.conftest import REPO
from zoo import CheckpointError

CONFIG = str(REPO / "configs/baselines/parts_world.yaml")
COMMON = ["--trainer.accelerator=cpu", "--trainer.max_epochs=3", "--trainer.deterministic=true",
          "--progress_bar.refresh_rate=0"]
WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16",
         "--data.init_args.image_size=32"]  # 4 steps an epoch; small images: the state kept matters, not the size
# One small config per family, 4 training steps per epoch, each exercising what its family keeps across epochs.
RESUME_CASES = {
    "baselines": ("configs/baselines/parts_world.yaml", WORLD),
    "icnn": ("configs/icnn/parts_world.yaml", WORLD),  # online Z_T, categories, lambda / (epoch + 1), filter pictures
    "l2x": ("configs/l2x/xor.yaml", [  # black box and EVAL-X evaluator trained before the first step
        "--data.init_args.num_train=256", "--data.init_args.num_val=64", "--data.init_args.batch_size=64",
        "--model.init_args.black_box_epochs=1", "--model.init_args.evaluator_epochs=1",
        "--trainer.callbacks+=zoo.l2x.callback.SelectionCallback"]),
    "renn": ("configs/renn/rule_series.yaml", [  # stages; killed inside the joint stage (lr x 0.1)
        "--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16",
        "--trainer.max_epochs=4", "--model.init_args.stages=[{name: local, epochs: 1, train: [detector], losses: "
        "[loss_local]}, {name: global, epochs: 1, train: [head], losses: [loss_task]}, {name: joint, epochs: 2, "
        "train: [detector, head], losses: [loss_task, loss_local], lr_scale: 0.1}]"]),
    "aog_rcnn": ("configs/aog_rcnn/parts_world_scenes.yaml", [  # folding -> unfolding at epoch 1
        "--data.init_args.num_train=16", "--data.init_args.num_val=4", "--data.init_args.batch_size=4",
        "--model.init_args.unfold_epoch=1"]),
    "textual": ("configs/textual/explanation_label.yaml", [*WORLD, "--model.init_args.discriminative_weight=0.2",
                "--model.init_args.encoder_epochs=1", "--model.init_args.sentence_classifier_epochs=1"]),
    "rule_loss": ("configs/renn/parts_world_distillation.yaml", WORLD),  # pi_t schedule
}
KILL_STEP = {"renn": 14}  # default 6: in the middle of the second epoch


def fit(cwd: Path, name: str, config: str, *extra: str, wait: bool = True) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # the repo, then what was there
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / config),
                                *COMMON, f"--trainer.logger.init_args.name={name}", *extra], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        process.communicate(timeout=300)
    return process


def final_state(cwd: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(cwd / "checkpoints" / name / "checkpoints" / "last.ckpt", weights_only=True)


def kill_and_resume(tmp_path: Path, config: str, extra: list[str], step: int, checkpoint_step: int | None
                    ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A run SIGKILLed after optimiser step `step` (its last.ckpt then at `checkpoint_step`, where given) and resumed
    with `--ckpt_path last`, beside the same run that never died (the two independent runs share the two cores):
    (the final state of the run that never died, of the resumed run, the resumed run's stderr)."""
    killer = ["--trainer.callbacks+=tests.helpers.KillAtStep", f"--trainer.callbacks.step={step}"]  # appended
    whole = fit(tmp_path, "whole", config, *extra, wait=False)
    killed = fit(tmp_path, "killed", config, *extra, *killer)
    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()[-3000:]
    if checkpoint_step is not None:
        assert final_state(tmp_path, "killed")["global_step"] == checkpoint_step
    resumed = fit(tmp_path, "killed", config, *extra, "--ckpt_path=last", wait=False)
    _, resumed_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_err[-3000:]
    return final_state(tmp_path, "whole"), final_state(tmp_path, "killed"), resumed_err


def differing_tensors(whole: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """The state-dict entries of two checkpoints that are not bitwise equal (the key sets must agree)."""
    assert whole["state_dict"].keys() == again["state_dict"].keys()
    return [k for k in whole["state_dict"] if not torch.equal(whole["state_dict"][k], again["state_dict"][k])]


@pytest.mark.parametrize("family", list(RESUME_CASES))
def test_a_run_killed_mid_epoch_resumes_to_the_same_final_state(family: str, tmp_path: Path) -> None:
    config, extra = RESUME_CASES[family]
    step = KILL_STEP.get(family, 6)
    whole_state, again, _ = kill_and_resume(tmp_path, config, extra, step, step - step % 4)  # the last epoch's end
    assert again["global_step"] == whole_state["global_step"] > step
    differ = differing_tensors(whole_state, again)
    assert not differ, f"{len(differ)} of {len(whole_state['state_dict'])} tensors differ: {differ[:8]}"


# Families whose epochs differ (stages, set_epoch schedules), resumed inside their last epoch: the epoch's stage must
# be entered again (Lightning skips `on_train_epoch_start` there). Killed at step 11, resumed from step 10.
INSIDE_STAGE_CASES = {
    "protopnet": ("configs/protopnet/parts_world.yaml", [  # inside last_layer, after its push
        *WORLD, "--data.init_args.num_classes=4", "--model.init_args.model_kwargs.prototypes_per_class=2",
        "--model.init_args.stages=[{name: warm_up, epochs: 1, train: [add_on, prototypes], losses: [loss_task]}, "
        "{name: joint, epochs: 1, train: [backbone, add_on, prototypes], losses: [loss_task, loss_cluster]}, "
        "{name: last_layer, epochs: 1, train: [last_layer], losses: [loss_task, loss_l1], lr_scale: 0.5}]"]),
    "cbm_sequential": ("configs/cbm/sequential.yaml", [  # inside the task stage: g trains, f frozen in eval mode
        *WORLD, "--model.init_args.stages=[{name: concepts, epochs: 2, train: [backbone, concept_head], losses: "
        "[loss_concept]}, {name: task, epochs: 1, train: [task_head], losses: [loss_task]}]"]),
}


# (kill step, last.ckpt step) per case; the staged families are killed at 11, resumed from 10. "baselines_last_batch":
# last.ckpt written by the validation at epoch 0's last batch (step 4), before the epoch ended: Lightning resumes
# "mid-epoch" and builds one more iterator for the finished epoch, which drew from the run's stream (30 of 38 tensors
# differed)
INSIDE_EPOCH_KILLS = {"baselines": 7, "l2x": 7, "baselines_last_batch": 5}


@pytest.mark.parametrize("family", [*INSIDE_EPOCH_KILLS, *INSIDE_STAGE_CASES])
def test_a_run_resumed_from_a_checkpoint_written_inside_an_epoch_ends_the_same(family: str, tmp_path: Path) -> None:
    """Validation every 2 of an epoch's 4 steps writes last.ckpt inside epochs; killed at step 7 (11 for the staged
    families), the run resumes from step 6 (10), half-way through epoch 1 (2). Lightning's loaders restarted the
    epoch's iterator there, drawing its remaining batches anew (20 of L2X's tensors differed): the training loaders
    now resume mid-epoch. And it did not enter the epoch's stage: ProtoPNet's pushed prototypes drifted off their
    patches under warm-up's terms, a sequential CBM trained its concept model in the task stage."""
    config, extra = INSIDE_STAGE_CASES.get(family) or RESUME_CASES[family.removesuffix("_last_batch")]
    kill = INSIDE_EPOCH_KILLS.get(family, 11)
    whole_state, again, resumed_err = kill_and_resume(
        tmp_path, config, [*extra, "--trainer.val_check_interval=2"], kill, kill - 1)  # inside the epoch's 4 steps
    assert "not resumable" not in resumed_err  # Lightning's warning for a loader restarted mid-epoch
    assert again["global_step"] == whole_state["global_step"] == 12
    differ = differing_tensors(whole_state, again)
    assert not differ, f"{len(differ)} of {len(whole_state['state_dict'])} tensors differ: {differ[:8]}"


def test_validations_inside_accumulation_windows_save_at_the_epochs_end_and_resume_the_same(tmp_path: Path) -> None:
    """4 batches an epoch, accumulate 2, validation every 3 batches: every validation falls inside a window. Its
    last.ckpt waits for the epoch's end (written mid-window, the resumed run stepped without the window's first
    gradient: 22 of 26 tensors differed; skipped, no last.ckpt was written until fit ended). Killed after step 3, the
    run resumes from epoch 0's end (step 2) and ends bit-identical."""
    extra = [*WORLD, "--trainer.accumulate_grad_batches=2", "--trainer.val_check_interval=3"]
    whole_state, again, _ = kill_and_resume(tmp_path, CONFIG, extra, 3, 2)
    assert again["global_step"] == whole_state["global_step"] == 6
    differ = differing_tensors(whole_state, again)
    assert not differ, f"{len(differ)} of {len(whole_state['state_dict'])} tensors differ: {differ[:8]}"


def test_load_checkpoint_export_and_named_mismatches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train import main

    monkeypatch.chdir(tmp_path)  # undone after the test: later tests in this worker read configs by relative path
    main(["fit", "--config", CONFIG, "--trainer.max_epochs=1", "--trainer.logger.init_args.name=src",
          "--data.init_args.num_train=64", "--data.init_args.num_val=32"])
    checkpoint = tmp_path / "checkpoints" / "src" / "checkpoints" / "last.ckpt"
    model = zoo.load_checkpoint(checkpoint, model_name="baseline_tinycnn", num_classes=6)
    images = torch.rand(2, 3, 64, 64)
    exported = zoo.load_exported(zoo.export_checkpoint(checkpoint, tmp_path / "export"))
    with torch.no_grad():
        assert torch.equal(model(images)["logits"], exported(images)["logits"])
    with pytest.raises(CheckpointError, match="holds baseline_tinycnn with 6 classes .*builds baseline_tinycnn with "
                                              "4 classes"):
        zoo.load_checkpoint(checkpoint, num_classes=4)
    with pytest.raises(CheckpointError, match="this run builds icnn_tinycnn"):
        zoo.load_checkpoint(checkpoint, model_name="icnn_tinycnn")
    with pytest.raises(CheckpointError, match=r"holds baseline_tinycnn with 6 classes.*To fine-tune its weights to "
                                              r"other classes.*pretrained_path"):  # fit --ckpt_path refuses too
        main(["fit", "--config", CONFIG, "--trainer.max_epochs=2", "--data.init_args.num_classes=4",
              "--data.init_args.num_train=64", "--data.init_args.num_val=32", f"--ckpt_path={checkpoint}"])
    with pytest.raises(CheckpointError, match="holds baseline_tinycnn .*this config builds icnn_tinycnn"):
        main(["fit", "--config", str(REPO / "configs/icnn/parts_world.yaml"), "--trainer.max_epochs=3",
              "--trainer.logger.init_args.name=other_model", "--data.init_args.num_train=64",
              "--data.init_args.num_val=32", f"--ckpt_path={checkpoint}"])
    assert not (tmp_path / "checkpoints" / "other_model").exists()  # stopped before anything was built or trained
    (tmp_path / "pickled.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Could not read checkpoint"):
        zoo.load_checkpoint(tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="needs config.json and model.safetensors"):
        zoo.load_exported(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder; name the .ckpt file"):
        zoo.load_checkpoint(checkpoint.parent)
    with pytest.raises(TypeError, match="'num_clases' \\(did you mean 'num_classes'\\?\\)"):
        zoo.load_checkpoint(checkpoint, num_clases=6)  # a typo checked nothing before
    export = tmp_path / "export"
    config = (export / "config.json").read_text()
    (export / "config.json").write_text(config[:20])  # truncated
    with pytest.raises(CheckpointError, match="Could not read the export .*JSONDecodeError"):
        zoo.load_exported(export)
    (export / "config.json").write_text(config)
    (export / "model.safetensors").write_bytes(b"\xff" * 64)  # overwritten
    with pytest.raises(CheckpointError, match="Could not read the export .*SafetensorError"):
        zoo.load_exported(export)


def test_a_truncated_checkpoint_is_named_by_path_and_by_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint cut short (a full disk, an interrupted copy) is one clear line, whether named by its path (read
    by the CLI's own check) or as `--ckpt_path last` (resolved and read inside Lightning)."""
    from zoo.cli import command_line

    monkeypatch.chdir(tmp_path)
    run = ["fit", "--config", CONFIG, "--trainer.max_epochs=1", "--trainer.logger.init_args.name=src",
           "--data.init_args.num_train=32", "--data.init_args.num_val=16", "--progress_bar.refresh_rate=0"]
    command_line(run)
    checkpoint = tmp_path / "checkpoints" / "src" / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    for given in ("last", str(checkpoint)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            command_line([*run[:3], "--trainer.max_epochs=2", *run[4:], f"--ckpt_path={given}"])
        err = capsys.readouterr().err
        assert exited.value.code == 2, err[-2000:]
        assert f"train.py: error: Could not read checkpoint '{checkpoint}' (RuntimeError: " in err  # the zoo's line
        assert "Traceback" not in err



def test_the_cuda_random_state_travels_with_the_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise drawn on a GPU (CEM's RandInt masks, dropout) comes from the device's generator: saved where the run
    uses CUDA, restored where CUDA is available, and CUDA is never started just to read it."""
    from zoo.engine.callbacks import RNGStateCallback

    device_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: pytest.fail("CUDA read in a CPU run"))
    assert "cuda" not in RNGStateCallback().state_dict()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: device_state)
    state = RNGStateCallback().state_dict()
    assert torch.equal(state["cuda"], device_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, *a: restored.append(value))
    RNGStateCallback().load_state_dict(state)
    assert len(restored) == 1 and torch.equal(restored[0], device_state)


def test_last_checkpoint_is_not_written_inside_a_gradient_accumulation_window(tmp_path: Path) -> None:
    """A validation between two batches of one accumulation window (accumulate 2, validation every 3 batches) leaves
    last.ckpt as it was: the window's first gradient is not in a checkpoint, so a run resumed from it would step
    without it (22 of 26 tensors differed from the run that never died)."""
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.baselines.system import ClassifierSystem
    from zoo.engine.callbacks import LatestCheckpoint

    class RecordSaves(pl.Callback):
        def __init__(self) -> None:
            self.batches: list[int] = []  # batches of the epoch trained when each checkpoint was written

        def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
            self.batches.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=128, num_val=16, num_test=16, batch_size=16)  # 8 batches an epoch
    saves = RecordSaves()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, val_check_interval=3,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[LatestCheckpoint(str(tmp_path)), saves])
    trainer.fit(ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes), datamodule=data)
    assert saves.batches == [6, 8]  # validated after batches 3, 6 (and the end save): 3 is inside a window
    assert (tmp_path / "last.ckpt").exists()


@pytest.mark.parametrize("budget", ["max_epochs", "max_steps"])
def test_a_fit_stopped_by_max_steps_inside_an_epoch_resumes_that_epoch(budget: str, tmp_path: Path) -> None:
    """max_steps=5 stops after batch 1 of epoch 1 (4 batches an epoch); last.ckpt, written at fit's end, is resumed
    under a 2-epoch budget (max_epochs=2, or max_steps=8). Under max_epochs Lightning took the epoch for finished:
    it said "max_epochs=2 reached" and trained nothing (5 of 8 steps; with max_epochs=3, epoch 1's last 3 batches and
    its validation were skipped). Now both end bit-identical to an uninterrupted 2-epoch run, epoch 1 validated."""
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.baselines.system import ClassifierSystem
    from zoo.engine.callbacks import LatestCheckpoint, RNGStateCallback

    class CountValidations(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.epochs += [] if trainer.sanity_checking else [trainer.current_epoch]

    def run(folder: str, ckpt_path: str | None = None, **budget: int) -> tuple[dict[str, Any], list[int]]:
        pl.seed_everything(0)
        data = PartsWorldDataModule(num_train=64, num_val=16, num_test=16, batch_size=16, image_size=32)
        validations = CountValidations()
        trainer = pl.Trainer(accelerator="cpu", deterministic=True, num_sanity_val_steps=0, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[LatestCheckpoint(str(tmp_path / folder)), RNGStateCallback(), validations],
                             **budget)
        trainer.fit(ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes, image_size=32),
                    datamodule=data, ckpt_path=ckpt_path)
        return torch.load(tmp_path / folder / "last.ckpt", weights_only=True), validations.epochs

    whole, _ = run("whole", max_epochs=2)
    stopped, validated = run("stopped", max_steps=5, max_epochs=5)
    assert stopped["global_step"] == 5 and validated == [0]
    resumed, validated = run("stopped", str(tmp_path / "stopped" / "last.ckpt"),
                             **({"max_epochs": 2} if budget == "max_epochs" else {"max_steps": 8, "max_epochs": 5}))
    assert validated == [1]  # the interrupted epoch's validation
    assert resumed["global_step"] == whole["global_step"] == 8
    differ = differing_tensors(whole, resumed)
    assert not differ, f"{len(differ)} of {len(whole['state_dict'])} tensors differ: {differ[:8]}"


def test_a_run_with_loader_workers_resumes_bit_identically(tmp_path: Path) -> None:
    """With num_workers > 0 the loaders' workers were persistent: the uninterrupted run drew its training worker
    seed once from the run's stream (the validation loader's inside the sanity check, isolated), the resumed run,
    which skips the sanity check, drew another: every later shuffle moved (weights off by up to 1.7 on ICNN).
    Workers start anew with every iterator now, the same draws in both runs."""
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.baselines.system import ClassifierSystem
    from zoo.engine.callbacks import LatestCheckpoint, RNGStateCallback

    def run(folder: str, ckpt_path: str | None = None, **budget: int) -> dict[str, Any]:
        pl.seed_everything(0)
        data = PartsWorldDataModule(num_train=64, num_val=16, num_test=16, batch_size=16, image_size=32,
                                    num_workers=2)
        trainer = pl.Trainer(accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, max_epochs=3,
                             callbacks=[LatestCheckpoint(str(tmp_path / folder)), RNGStateCallback()], **budget)
        trainer.fit(ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes, image_size=32),
                    datamodule=data, ckpt_path=ckpt_path)
        return torch.load(tmp_path / folder / "last.ckpt", weights_only=True)

    whole = run("whole")
    run("stopped", max_steps=6)  # inside epoch 1 (4 batches an epoch)
    resumed = run("stopped", str(tmp_path / "stopped" / "last.ckpt"))
    assert resumed["global_step"] == whole["global_step"] == 12
    differ = differing_tensors(whole, resumed)
    assert not differ, f"{len(differ)} of {len(whole['state_dict'])} tensors differ: {differ[:8]}"


def test_an_export_with_fewer_class_names_than_classes_is_refused(tmp_path: Path) -> None:
    """An export's config.json renamed by hand to two names for six classes loaded, and `class_names[pred]` raised
    IndexError later for classes 2-5."""
    import json

    from safetensors.torch import save_file

    model = zoo.create_model("baseline_tinycnn", num_classes=6)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    spec = {"model_name": "baseline_tinycnn", "num_classes": 6, "class_names": ["a", "b"]}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"class_names holds 2 names \(\['a', 'b'\]\) for num_classes=6"):
        zoo.load_exported(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**spec, "class_names": list("abcdef")}))
    assert zoo.load_exported(tmp_path).class_names == list("abcdef")


# every epoch a plateau (no loss is below best * (1 - 1) = 0): the rate halves at each epoch's end
PLATEAU = ("--model.init_args.scheduler={class_path: torch.optim.lr_scheduler.ReduceLROnPlateau, init_args: "
           "{patience: 0, factor: 0.5, threshold: 1.0}}")


# how the first fit stops before it is resumed to 3 epochs: at epoch 0's end (last.ckpt written at its validation,
# before the epoch's plateau step), inside epoch 1 (max_steps 3 of 2 a epoch: the resumed epoch is the one
# Lightning skips), and after fit (`trainer.save_checkpoint` once the epoch is completed: no step is owed)
PLATEAU_STOPS = {"epoch_end": ["--trainer.max_epochs=1"], "inside_epoch": ["--trainer.max_steps=3"],
                 "after_fit": ["--trainer.max_epochs=1"]}


def test_a_resumed_fit_takes_the_plateau_steps_lightning_skips(in_tmp_dir: Path) -> None:
    """ReduceLROnPlateau steps after the epoch's validation, and Lightning skips every plateau step while its loop
    is restarting: a fit resumed from last.ckpt (written at validation end, before that epoch's step) or inside an
    epoch trained on at twice the rate (`last_epoch` 1 of 2, every later tensor different). Now the checkpoint
    carries an owed step's value and the System takes the steps Lightning skips, each once: a checkpoint written
    after the epoch's step owes none. Each way of stopping (`PLATEAU_STOPS`) against the one run that never did."""
    from train import main

    def fit(name: str, *extra: str) -> Any:
        return main(["fit", "--config", CONFIG, PLATEAU, "--data.init_args.num_train=16", "--data.init_args.num_val=8",
                     "--data.init_args.batch_size=8", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
                     f"--trainer.logger.init_args.name={name}", *extra])

    # also written: a checkpoint at epoch 1's last training batch, before its validation (a user's
    # every_n_train_steps), which Lightning resumes with the next epoch restarting
    def rates(cli: Any) -> dict[str, Any]:  # the scheduler as the fit ends (3 epochs: 3 steps)
        return cli.trainer.lr_scheduler_configs[0].scheduler.state_dict()

    ended = rates(fit("whole", "--trainer.callbacks+={class_path: pytorch_lightning.callbacks.ModelCheckpoint, "
                      f"init_args: {{every_n_train_steps: 4, save_top_k: -1, dirpath: {in_tmp_dir / 'every'}, "
                      "filename: at}}"))
    whole = final_state(in_tmp_dir, "whole")
    assert whole["lr_schedulers"][0]["last_epoch"] == 2 and ended["last_epoch"] == 3
    # the next epoch's step was skipped (weights are not compared: Lightning does not run that epoch's validation
    # again on resume, and such a run is not bit-identical even without a scheduler)
    assert rates(fit("last_batch", f"--ckpt_path={in_tmp_dir / 'every' / 'at.ckpt'}")) == ended
    for stop, first in PLATEAU_STOPS.items():
        stopped = fit(stop, *first)
        ckpt = "--ckpt_path=last"
        if stop == "after_fit":
            stopped.trainer.save_checkpoint(in_tmp_dir / "after.ckpt")
            assert torch.load(in_tmp_dir / "after.ckpt", weights_only=True)["lr_schedulers"][0]["last_epoch"] == 1
            ckpt = f"--ckpt_path={in_tmp_dir / 'after.ckpt'}"
        assert rates(fit(stop, ckpt)) == ended, stop
        again = final_state(in_tmp_dir, stop)
        assert whole["lr_schedulers"] == again["lr_schedulers"], stop
        differ = differing_tensors(whole, again)
        assert not differ, f"{stop}: {len(differ)} of {len(whole['state_dict'])} tensors differ: {differ[:8]}"
