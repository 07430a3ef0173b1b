"""hp_metric, the metric of a run's TensorBoard HPARAMS entry, as TensorBoard serves it: one curve over a resumed fit
(no placeholder -1 at step 0 from any session: TensorBoard took the step going back as a restart and dropped the
earlier points), each point at its validation's step, the val/acc (test/acc) fallback without a checkpoint monitor,
and no HPARAMS entry for helper runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_engine import WithTeacher, cpu_trainer, data
from tests.test_tensorboard_hparams import ICNN, TINY, hparams_entries
from train import main
from zoo.engine import prepare_auxiliaries


def scalars_by_file(folder: Path, tag: str) -> list[tuple[int, float]]:
    """The (step, value) points of `tag` in the event files directly in `folder`, file after file in the order they
    were written (the Rust data server reads a run's files so; EventAccumulator per file keeps every point)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def written(path: Path) -> tuple[int, int]:  # events.out.tfevents.<time>.<host>.<pid>.<uid>
        parts = path.name.split(".")
        return int(parts[3]), int(parts[-1])

    points = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=written):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points += [(event.step, event.value) for event in events.Scalars(tag)]
    return points


def assert_hp_metric_is(folder: Path, metric: str) -> None:
    """hp_metric in `folder`'s events: one point per `metric` point, at its step with its value, never -1."""
    hp_metric, expected = scalars_by_file(folder, "hp_metric"), scalars_by_file(folder, metric)
    assert expected and [step for step, _ in hp_metric] == [step for step, _ in expected]
    assert [value for _, value in hp_metric] == pytest.approx([value for _, value in expected])


def test_a_resumed_fits_hp_metric_is_one_curve_at_the_validations_steps(in_tmp_dir: Path) -> None:
    """Every trainer start logged Lightning's placeholder hp_metric -1 at step 0, and a resumed fit its checkpoint's
    value one step after the validation it came from: the events read `0:-1 0:a 1:b | 0:-1 2:b 2:c`, which
    TensorBoard served as `0:-1 2:b 2:c` (a step going back is a restart to it). validate and test runs
    (<run>/validate, <run>/test) keep their hp_metric (val/acc, test/acc), without the -1 either."""
    args = ["--config", ICNN, *TINY, "--trainer.logger.init_args.name=run"]
    main(["fit", *args, "--trainer.max_epochs=2"])
    main(["fit", *args, "--trainer.max_epochs=3", "--ckpt_path=last"])
    run = in_tmp_dir / "checkpoints" / "run"
    assert_hp_metric_is(run, "val/acc")
    assert [step for step, _ in scalars_by_file(run, "hp_metric")] == [0, 1, 2]  # never back, nothing repeated
    assert hparams_entries(run)["."]["metrics"] == ["hp_metric"]  # the entry still declares it

    main(["validate", *args, "--ckpt_path=last"])
    main(["test", *args, "--ckpt_path=last"])
    assert_hp_metric_is(run / "validate", "val/acc")
    assert_hp_metric_is(run / "test", "test/acc")
    entries = hparams_entries(run)
    assert entries["validate"]["metrics"] == entries["test"]["metrics"] == ["hp_metric"]


def test_a_checkpoint_resumed_into_another_run_folder_keeps_its_hp_metric_at_its_step(in_tmp_dir: Path) -> None:
    """A run folder without the checkpoint's events (a fit resumed from another run's checkpoint, here with nothing
    left to train) gets the checkpoint's last hp_metric at the step of the validation it came from."""
    args = ["--config", ICNN, *TINY, "--trainer.max_epochs=2"]
    main(["fit", *args, "--trainer.logger.init_args.name=a"])
    main(["fit", *args, "--trainer.logger.init_args.name=b", "--ckpt_path=checkpoints/a/checkpoints/last.ckpt"])
    checkpoints = in_tmp_dir / "checkpoints"
    last = scalars_by_file(checkpoints / "a", "hp_metric")[-1]
    assert last[0] == 1 and scalars_by_file(checkpoints / "b", "hp_metric") == [last]


def test_without_a_monitor_hp_metric_is_val_acc(in_tmp_dir: Path) -> None:
    """With `checkpoint.monitor: null` (invase_switch, the cub200 configs, aog_rcnn voc) hp_metric stayed at
    Lightning's -1 although val/acc was logged; it is val/acc (test/acc in a test run)."""
    args = ["--config", ICNN, *TINY, "--trainer.logger.init_args.name=run", "--checkpoint.monitor=null"]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path=last"])
    run = in_tmp_dir / "checkpoints" / "run"
    assert_hp_metric_is(run, "val/acc")
    assert_hp_metric_is(run / "test", "test/acc")


def test_a_helper_run_has_no_hparams_entry(tmp_path: Path) -> None:
    """A helper's fit (L2X's black box and evaluator, the textual encoder and classifier) wrote an HPARAMS entry
    with the datamodule's settings as its only columns and hp_metric -1: a row among the real runs'."""
    prepare_auxiliaries(WithTeacher("baseline_tinycnn", num_classes=6, teacher_epochs=1), cpu_trainer(tmp_path), data())
    helper = tmp_path / "run" / "auxiliary" / "teacher"
    assert scalars_by_file(helper, "train/loss_epoch")  # its curves are there
    assert hparams_entries(helper) == {} and not scalars_by_file(helper, "hp_metric")
