"""compare and ablate score each run with a validation after its fit: that validation logs to TensorBoard in the
run's own `validate` run (``<run>/validate``, as `train.py validate` of the run), not into the fit's curves, where
it was a val/* point one step after the fit's last validation, an `epoch` point of an epoch that never ran, a
picture more and a second HPARAMS session in the fit's run."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import REPO
from train import main

BASELINE = str(REPO / "configs/baselines/parts_world.yaml")
TINY = ["--data.init_args.num_train=32", "--data.init_args.num_val=16", "--data.init_args.num_test=16",
        "--data.init_args.batch_size=16", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files directly in `folder` (one TensorBoard run;
    its sub-folders are runs of their own), {} without any."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(folder.glob("events.out.tfevents.*")):
        return {}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def has_hparams_session(folder: Path) -> bool:
    """Whether the event files directly in `folder` hold an HPARAMS session (TensorBoard's HPARAMS entry)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    try:
        return "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    except KeyError:
        return False


def assert_fit_curves_end_at_the_fit(run: Path) -> None:
    """The fit's run (max_epochs=1: one validation) has one val/* point per tag and no `epoch` point after epoch 0."""
    fit = scalars(run)
    val_tags = [tag for tag in fit if tag.startswith("val/")]
    assert val_tags, fit
    for tag in val_tags:
        assert len(fit[tag]) == 1, (tag, fit[tag])
    assert max(value for _, value in fit["epoch"]) == 0, fit["epoch"]


def test_compare_scores_in_the_runs_validate_run_trained_or_evaluated(in_tmp_dir: Path) -> None:
    """A trained compare run: the fit's curves end at its last validation; <run>/validate holds the scoring
    validation's val/acc, the report's, and the explanations figure. A `checkpoint:` run (evaluated, not trained)
    logs only there."""
    spec = {"compare": {"name": "cmp", "args": TINY,
                        "explain": {"num_images": 2, "methods": ["saliency"], "metrics": ["deletion"]},
                        "runs": {"a": {"config": BASELINE}}}}
    (in_tmp_dir / "cmp.yaml").write_text(yaml.safe_dump(spec))
    (row,) = main(["compare", "--config", "cmp.yaml"])
    run = in_tmp_dir / "checkpoints" / "cmp" / "a"
    assert_fit_curves_end_at_the_fit(run)
    scored = scalars(run / "validate")
    assert [value for _, value in scored["val/acc"]] == [row["acc"]]
    assert has_hparams_session(run / "validate")  # as `train.py validate`'s: hp_metric is the run's val/acc

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for folder in (run, run / "validate"):
        events = EventAccumulator(str(folder), size_guidance={"images": 0})
        events.Reload()
        images[folder.name] = events.Tags()["images"]
    assert "explanations" in images["validate"] and "explanations" not in images["a"], images

    spec = {"compare": {"name": "kept", "args": TINY,
                        "runs": {"b": {"config": BASELINE, "checkpoint": str(run / "checkpoints" / "last.ckpt")}}}}
    (in_tmp_dir / "kept.yaml").write_text(yaml.safe_dump(spec))
    (row,) = main(["compare", "--config", "kept.yaml", "--no_explain"])
    evaluated = in_tmp_dir / "checkpoints" / "kept" / "b"
    assert scalars(evaluated) == {}
    assert [value for _, value in scalars(evaluated / "validate")["val/acc"]] == [row["acc"]]


def test_an_ablate_point_scores_in_its_validate_run_without_an_hparams_entry(in_tmp_dir: Path) -> None:
    """An ablate point's fit curves end at its last validation; <point>/validate holds the scoring validation,
    with no HPARAMS session of its own (ablate writes the points' entries, `without_hp_metric`)."""
    main(["ablate", "--config", BASELINE, "--name", "grid", "--grid", "seed_everything=[0]", *TINY])
    point = in_tmp_dir / "checkpoints" / "grid" / "seed_everything=0"
    assert_fit_curves_end_at_the_fit(point)
    assert len(scalars(point / "validate")["val/acc"]) == 1
    assert not has_hparams_session(point) and not has_hparams_session(point / "validate")


def test_a_logger_with_a_sub_dir_of_its_own_scores_below_it(tmp_path: Path) -> None:
    """A fit logger with its own `sub_dir` (<run>/fit) was left as it was: the scoring validation went into the
    fit's curves. Its evaluation logger is <run>/fit/validate."""
    from pytorch_lightning.loggers import TensorBoardLogger

    from zoo.engine.callbacks import evaluation_logger

    fit = TensorBoardLogger(str(tmp_path), name="run", version="v", sub_dir="fit")
    assert evaluation_logger(fit, "validate").log_dir == str(tmp_path / "run" / "v" / "fit" / "validate")
    assert evaluation_logger(TensorBoardLogger(str(tmp_path), name="run", version="v"), "validate").log_dir == \
        str(tmp_path / "run" / "v" / "validate")
