"""Mistakes said before anything trains or moves (`zoo.cli.preflight` and the checks of compare's and ablate's own
options): an optimiser value torch refuses, a stage summing a term the loss does not give, a checkpoint or
EarlyStopping monitor the System does not log, an ablate or compare named as a fit run or a file, --print_config
with compare or ablate, and the smaller spec, grid and stage-key typos."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from tests.conftest import REPO
from tests.test_compare_ablate import said_once
from zoo.baselines.system import ClassifierSystem
from zoo.cli.errors import is_configuration_error

SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]
FAST = ["--trainer.fast_dev_run=true", *SMALL_WORLD]
BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
RENN = str(REPO / "configs/renn/rule_series.yaml")
LR = "model.init_args.optimizer.init_args.lr"
TYPO_STAGES = ("--model.init_args.stages=[{name: local, epochs: 1, train: [detector], losses: [loss_local]}, "
               "{name: joint, epochs: 1, losses: [loss_task, loss_locl]}]")
EARLY_STOPPING = ("--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.EarlyStopping, "
                  "init_args: {monitor: val/acc_typo}}]")


def write_spec(folder: Path, compare: dict) -> str:
    (folder / "spec.yaml").write_text(yaml.safe_dump({"compare": compare}))
    return str(folder / "spec.yaml")


def folders(path: Path) -> list[str]:
    """What a run folder holds (nothing where it was never made)."""
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def test_an_ablate_point_the_optimiser_refuses_is_said_before_the_first_point_trains(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """lr=[0.01,-0.1]: point 1 trained, then point 2 died in configure_optimizers with a traceback, its folder left
    behind. Now torch's reason, naming the point, before any point trains; no point folder."""
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "lr", "--grid", f"{LR}=[0.01,-0.1]", *FAST])
    assert "Invalid learning rate: -0.1" in error and "ablate point 2/2" in error, error
    assert "no point has trained" in error and folders(in_tmp_dir / "checkpoints" / "lr") == [], error


def test_a_stage_summing_a_term_the_loss_does_not_give_is_said_before_training(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """ReNN's joint stage summing 'loss_locl' failed with a KeyError after the earlier stages trained and wrote
    checkpoints; now every stage is checked against the loss's terms first, with the closest name."""
    error = said_once(capsys, ["ablate", "--config", RENN, "--name", "stages", "--grid", "seed_everything=[0]",
                               TYPO_STAGES, *FAST])
    assert "stage 'joint' sums 'loss_locl' (did you mean 'loss_local'?)" in error, error
    assert "neither ReNNLoss nor the model gives such a term" in error, error
    assert folders(in_tmp_dir / "checkpoints" / "stages") == [], error


@pytest.mark.parametrize("option, said", [
    (f"--{LR}=-0.1", "Invalid learning rate: -0.1"),
    ("--checkpoint.monitor=val/ac", "(did you mean 'val/acc'?)"),
])
def test_fit_says_it_before_the_earlier_run_is_moved(in_tmp_dir: Path, capsys: pytest.CaptureFixture, option: str,
                                                     said: str) -> None:
    """`fit` refused these only after `before_fit` had moved the earlier run to stale/ (a traceback, or a whole
    epoch later); the earlier run stays where it was."""
    run = in_tmp_dir / "checkpoints" / "baselines_parts_world"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {}\n")
    (run / "checkpoints" / "last.ckpt").write_text("earlier run\n")
    error = said_once(capsys, ["fit", "--config", BASELINE, "--trainer.max_epochs=1", option, *SMALL_WORLD])
    assert said in error, error
    assert folders(run) == ["checkpoints", "config.yaml"] and not (run.parent / "stale").exists(), error


def test_a_stage_loss_only_a_forward_can_refuse_is_a_configuration_error() -> None:
    """Where the code cannot tell the terms beforehand, the first batch of the stage refuses it: marked (printed
    without a traceback), its message unquoted, with the closest term."""
    from zoo.engine.stages import Schedule

    terms = {"loss_task": torch.tensor(1.0), "loss_local": torch.tensor(2.0)}
    with pytest.raises(KeyError) as info:
        Schedule([{"name": "joint", "losses": ["loss_task", "loss_locl"]}], torch.nn.Linear(1, 1)).select(terms)
    assert is_configuration_error(info.value)
    assert str(info.value).startswith("stage 'joint' sums ['loss_locl']") and "'loss_locl' -> 'loss_local'" in str(
        info.value), str(info.value)


def test_a_mistyped_stage_key_is_said_with_the_right_one() -> None:
    from zoo.engine.stages import Schedule

    with pytest.raises(ValueError, match="stage 'local' has no key 'epoch' \\(did you mean 'epochs'\\?\\)"):
        Schedule([{"name": "local", "epoch": 2}], torch.nn.Linear(1, 1))


@pytest.mark.parametrize("option, said", [
    ("--checkpoint.monitor=val/ac", "the checkpoint's monitor (checkpoint.monitor) is 'val/ac', which "
                                    "ClassifierSystem does not log (did you mean 'val/acc'?)"),
    (EARLY_STOPPING, "EarlyStopping's monitor is 'val/acc_typo', which ClassifierSystem does not log (did you mean "
                     "'val/acc'?)"),
])
def test_a_monitor_the_system_does_not_log_is_said_before_any_run_trains(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture, option: str, said: str) -> None:
    """Lightning refused a mistyped monitor with a MisconfigurationException after a whole epoch."""
    spec = write_spec(in_tmp_dir, {"name": "watched", "runs": {"a": {"config": BASELINE}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", option, *FAST])
    assert said in error and "compare run 'a'" in error, error
    assert folders(in_tmp_dir / "checkpoints" / "watched") == [], error
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "w", "--grid", "seed_everything=[0]",
                               option, *FAST])
    assert said in error and folders(in_tmp_dir / "checkpoints" / "w") == [], error


@pytest.mark.parametrize("config", ["l2x/xor.yaml", "aog_rcnn/parts_world_scenes.yaml", "renn/rule_series.yaml",
                                    "textual/description.yaml", "protopnet/parts_world.yaml"])
def test_the_shipped_monitors_and_stages_pass_and_the_system_is_left_as_it_was(config: str) -> None:
    """Every shipped monitor (val/posthoc_acc, val/map_50 of a dict metric, val/acc) and stage passes; building the
    optimiser and scheduler changes no weight and no requires_grad."""
    from zoo.cli.lightning import ZooCLI
    from zoo.cli.preflight import preflight

    cli = ZooCLI(args=["--config", str(REPO / "configs" / config), "--trainer.logger=false"], run=False)
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    trainable = [p.requires_grad for p in cli.model.parameters()]
    preflight(cli.model, cli.trainer.callbacks)
    assert [p.requires_grad for p in cli.model.parameters()] == trainable
    after = cli.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_ablate_named_as_a_fit_run_or_a_file_is_refused(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`ablate --name icnn_parts_world` wrote its table and points into the fit's run folder (the next fit moved
    the table to stale/ and left the points); a file of that name failed with a traceback at mkdir. Compare too."""
    (in_tmp_dir / "checkpoints" / "taken").mkdir(parents=True)
    (in_tmp_dir / "checkpoints" / "taken" / "config.yaml").write_text("trainer: {}\n")
    (in_tmp_dir / "checkpoints" / "cfile").write_text("not a folder\n")
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "taken", "--grid", "seed_everything=[0]",
                               *FAST])
    assert "ablate: checkpoints/taken is the run folder of a `train.py fit`" in error and "--name <name>" in error
    assert folders(in_tmp_dir / "checkpoints" / "taken") == ["config.yaml"]
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "cfile", "--grid", "seed_everything=[0]",
                               *FAST])
    assert "ablate: checkpoints/cfile is a file, not a folder" in error, error
    spec = write_spec(in_tmp_dir, {"name": "cfile", "runs": {"a": {"config": BASELINE}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", *FAST])
    assert "compare: checkpoints/cfile is a file, not a folder" in error, error


@pytest.mark.parametrize("command", ["compare", "ablate"])
def test_print_config_is_refused_for_compare_and_ablate(in_tmp_dir: Path, capsys: pytest.CaptureFixture,
                                                        command: str) -> None:
    """It printed the first run's config only, exit 0."""
    grid = ["--grid", "seed_everything=[0,1]"] if command == "ablate" else []
    error = said_once(capsys, [command, "--config", BASELINE, *grid, "--print_config"])
    assert f"{command}: --print_config prints one run's config" in error, error
    assert f"python train.py fit --config {BASELINE} --print_config" in error, error


def test_a_spec_without_runs_names_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`run:` for `runs:` said "is not a compare spec" and all of the help, with no hint."""
    spec = write_spec(tmp_path, {"run": {"a": {"config": BASELINE}}})
    error = said_once(capsys, ["compare", "--config", spec])
    assert "compare has no `runs` (did you mean 'runs' for 'run'?)" in error, error
    assert len(error.splitlines()) <= 3, error


@pytest.mark.parametrize("grid", ["seed_everything=[]", "seed_everything=1"])
def test_an_empty_or_scalar_grid_says_it_needs_a_list_in_one_line(capsys: pytest.CaptureFixture, grid: str) -> None:
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--grid", grid])
    assert "seed_everything needs a non-empty list of values, e.g. --grid seed_everything=[" in error, error
    assert len(error.splitlines()) <= 3, error


class LogsMine(pl.Callback):
    """A user's callback that logs a metric of its own, which a user's checkpoint may monitor."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("val/mine", 1.0)


class LogsComputed(pl.Callback):
    """A callback logging a name its code computes: what it logs cannot be read from its source."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = "val/" + "computed"
        pl_module.log(name, 1.0)


def test_a_monitor_a_users_callback_logs_is_not_refused() -> None:
    """The check read only the System's code: a monitor on a metric the run's own callback logs was refused."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from zoo.baselines.system import ClassifierSystem
    from zoo.cli.preflight import check_monitors

    system = ClassifierSystem("baseline_tinycnn", num_classes=6)
    check_monitors(system, [LogsMine(), ModelCheckpoint(monitor="val/mine")])
    check_monitors(system, [LogsComputed(), ModelCheckpoint(monitor="val/computed")])  # unknowable: not checked
    with pytest.raises(ValueError, match="'val/mien', which ClassifierSystem does not log"):
        check_monitors(system, [LogsMine(), ModelCheckpoint(monitor="val/mien")])


USER_MODULE = """
import torch
from torchmetrics.classification import MulticlassF1Score

from zoo.baselines.system import ClassifierSystem


class SparseLoss(torch.nn.Module):
    def forward(self, out, batch):
        task = torch.nn.functional.cross_entropy(out["logits"], batch["label"])
        return dict(loss_task=task, loss_sparsity=out["logits"].abs().mean())


class F1System(ClassifierSystem):
    def setup(self, stage):
        super().setup(stage)
        self.add_metric("f1", MulticlassF1Score(6))
"""


def test_a_users_loss_or_system_is_not_judged_by_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage summing a user loss's term named by a keyword (no "loss_x" string in its code), and a monitor on a
    metric a user System adds in `setup`, were refused (valid runs that trained before the preflight): a user's
    code is left to the run itself."""
    import importlib

    from pytorch_lightning.callbacks import ModelCheckpoint

    from zoo.baselines.system import ClassifierSystem
    from zoo.cli.preflight import check_monitors, check_stage_losses

    (tmp_path / "user_family.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    user = importlib.import_module("user_family")
    stages = [{"name": "warm", "epochs": 1, "losses": ["loss_task"]},
              {"name": "all", "epochs": 1, "losses": ["loss_task", "_".join(["loss", "sparsity"])]}]
    check_stage_losses(ClassifierSystem("baseline_tinycnn", num_classes=6, loss=user.SparseLoss(), stages=stages))
    check_monitors(user.F1System("baseline_tinycnn", num_classes=6), [ModelCheckpoint(monitor="val/f1")])
    with pytest.raises(ValueError, match="'val/f1', which ClassifierSystem does not log"):  # the zoo's own: checked
        check_monitors(ClassifierSystem("baseline_tinycnn", num_classes=6), [ModelCheckpoint(monitor="val/f1")])


class WritesMetric(pl.Callback):
    """A user's callback that sets a metric in trainer.callback_metrics itself, as LearningRateMonitor does."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics["val/other"] = torch.tensor(2.0)


def test_a_monitor_a_learning_rate_monitor_or_a_callback_writes_is_not_refused() -> None:
    """LearningRateMonitor writes "lr-Adam" (and "lr-Adam/<group>", "...-momentum") into trainer.callback_metrics,
    and so may a user's callback: EarlyStopping on lr-Adam (stop once the rate has decayed), which trained before the
    preflight, was refused with exit 2. A monitor nothing logs is still refused."""
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    from zoo.baselines.system import ClassifierSystem
    from zoo.cli.preflight import check_monitors

    system = ClassifierSystem("baseline_tinycnn", num_classes=6)
    for monitor in ("lr-Adam", "lr-SGD-1", "lr-Adam/backbone", "lr-Adam/pg1-momentum", "lr-Adam-weight_decay"):
        check_monitors(system, [LearningRateMonitor(), EarlyStopping(monitor=monitor, stopping_threshold=1e-4)])
    check_monitors(system, [WritesMetric(), ModelCheckpoint(monitor="val/other")])  # unknowable: not checked
    with pytest.raises(ValueError, match="'lr-Adam', which ClassifierSystem does not log"):
        check_monitors(system, [EarlyStopping(monitor="lr-Adam")])  # no LearningRateMonitor writes it


def test_early_stopping_on_the_learning_rate_monitors_name_trains_and_stops(in_tmp_dir: Path) -> None:
    """The audit's run: EarlyStopping on lr-Adam with a threshold, StepLR dividing the rate by 100 each epoch; it
    stops after 2 of 4 epochs, on the name Lightning's LearningRateMonitor gives."""
    from train import main

    callbacks = ("--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.LearningRateMonitor, init_args: "
                 "{logging_interval: epoch}}, {class_path: pytorch_lightning.callbacks.EarlyStopping, init_args: "
                 "{monitor: lr-Adam, mode: min, stopping_threshold: 0.0001, patience: 100}}]")
    cli = main(["fit", "--config", BASELINE, callbacks, "--model.init_args.scheduler={class_path: "
                "torch.optim.lr_scheduler.StepLR, init_args: {step_size: 1, gamma: 0.01}}", "--trainer.max_epochs=4",
                "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=8",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *SMALL_WORLD])
    assert cli.trainer.current_epoch == 2 and "lr-Adam" in cli.trainer.callback_metrics


class SetupSystem(ClassifierSystem):
    """A user's System building a layer in `setup` (as Lightning documents) that its own optimiser reads."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not hasattr(self, "extra"):
            self.extra = torch.nn.Linear(4, 4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": self.model.parameters()},
                                {"params": self.extra.parameters(), "lr": 0.01}], lr=0.1)


def test_a_users_optimiser_of_layers_built_in_setup_is_left_to_the_fit() -> None:
    """The preflight called a user System's `configure_optimizers` before Lightning's `setup`: its layers did not
    exist yet (AttributeError traceback, for a run that trained before). A user's optimiser is left to the fit; the
    zoo's own (its optimizer and scheduler factories) is still checked."""
    from zoo.cli.preflight import preflight

    preflight(SetupSystem("baseline_tinycnn", num_classes=6))
    bad = ClassifierSystem("baseline_tinycnn", num_classes=6, optimizer=lambda params: torch.optim.SGD(params, lr=-1))
    with pytest.raises(ValueError, match="the optimizer or scheduler refuses its settings: Invalid learning rate"):
        preflight(bad)


def test_the_systems_data_settings_are_checked_before_anything_moves() -> None:
    """A CBM predicting the parts world's 36 concepts fitted on data of 5 (CUB with attributes=true keeps as many as
    its filter does) was refused at setup, inside the fit, after the earlier run had moved to stale/: preflight runs
    the System's data checks on the datamodule as built (a configuration error, said in one line)."""
    from types import SimpleNamespace

    from datamodules import DataSettingError
    from zoo.cbm.system import CBMSystem
    from zoo.cli.preflight import preflight

    cbm = CBMSystem(num_classes=3, image_size=32)
    with pytest.raises(DataSettingError, match="model_kwargs.num_concepts") as raised:
        preflight(cbm, [], SimpleNamespace(num_classes=3, num_concepts=5))
    assert is_configuration_error(raised.value)
    preflight(cbm, [], SimpleNamespace(num_classes=3, num_concepts=36))  # the same count: nothing said
    with pytest.raises(DataSettingError, match="num_classes=3 but the data's num_classes is 4"):
        preflight(cbm, [], SimpleNamespace(num_classes=4))  # every System's settings, the engine's check



def test_a_fit_that_would_train_nothing_is_refused_before_the_earlier_run_moves(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`fit --trainer.max_epochs=0` moved the run folder's trained run to stale/, trained nothing, wrote no checkpoint
    and exited 0: refused by name, nothing moved (max_steps and limit_train_batches 0 alike)."""
    from zoo.cli import main

    small = [*SMALL_WORLD, "--data.init_args.image_size=32", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--progress_bar.refresh_rate=0"]
    main(["fit", "--config", BASELINE, *small])
    run = in_tmp_dir / "checkpoints" / "baselines_parts_world"
    before = folders(run)
    for budget in ("--trainer.max_epochs=0", "--trainer.max_steps=0", "--trainer.limit_train_batches=0"):
        error = said_once(capsys, ["fit", "--config", BASELINE, *small, budget])
        assert f"{budget.removeprefix('--')} trains nothing" in error and "nothing was moved" in error, error
    assert folders(run) == before and "checkpoints" in before and not (in_tmp_dir / "checkpoints" / "stale").exists()


@pytest.mark.parametrize("arg, said", [
    ("--model.init_args.model_kwargs={drop_rat: 0.1}", "Did you mean 'drop_rate'?"),  # the model refuses it
    ("--model.init_args.optimizer.init_args.momentum=0.9", "momentum"),  # the parser refuses it (Adam has none)
])
def test_arguments_of_one_compare_run_that_do_not_hold_name_the_run(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture, arg: str, said: str) -> None:
    """Two runs of one config, the second given an argument that does not hold: the error named neither run."""
    spec = write_spec(in_tmp_dir, {"name": "two", "runs": {"a": {"config": BASELINE},
                                                           "b": {"config": BASELINE, "args": [arg]}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", *FAST])
    assert said in error and "compare run 'b'" in error and "compare run 'a'" not in error, error
    assert folders(in_tmp_dir / "checkpoints" / "two") == [], error



def test_a_compare_run_or_ablate_point_that_would_train_nothing_is_refused_before_any_trains(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """compare --trainer.max_epochs=0 reported untrained weights with exit 0; an ablate point of 0 epochs alike."""
    spec = write_spec(in_tmp_dir, {"name": "nothing", "runs": {"a": {"config": BASELINE}}})
    error = said_once(capsys, ["compare", "--config", spec, "--no_explain", *SMALL_WORLD, "--trainer.max_epochs=0"])
    assert "compare run 'a'" in error and "max_epochs=0 trains nothing" in error, error
    assert folders(in_tmp_dir / "checkpoints" / "nothing") == [], error
    error = said_once(capsys, ["ablate", "--config", BASELINE, "--name", "budget", *SMALL_WORLD,
                               "--grid", "trainer.max_epochs=[1,0]"])
    assert "ablate point 2/2" in error and "max_epochs=0 trains nothing" in error, error
    assert folders(in_tmp_dir / "checkpoints" / "budget") == [], error



def test_overfit_batches_replace_the_train_batch_limit_as_lightning_reads_it() -> None:
    """An ablate point's config (no Trainer built): `overfit_batches` 1 trains with `limit_train_batches` 0, as
    `train.py fit` does; the budget was refused there."""
    from jsonargparse import Namespace

    from zoo.cli.lightning import refuse_empty_budget

    refuse_empty_budget(Namespace(max_epochs=1, max_steps=-1, limit_train_batches=0, overfit_batches=1))
    for empty in (Namespace(max_epochs=1, max_steps=-1, limit_train_batches=0, overfit_batches=0),
                  Namespace(max_epochs=0, max_steps=-1, limit_train_batches=None, overfit_batches=1)):
        with pytest.raises(ValueError, match="trains nothing"):
            refuse_empty_budget(empty)
