"""What a run leaves on disk: last.ckpt holds the final weights even when the last epoch does not validate,
`predict` writes predictions.csv for feature selectors (L2X, INVASE), and a run without a run folder
(fast_dev_run) writes no pictures into the checkpoints/ folder every run shares."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16"]
# 2 training steps per epoch, validation every second epoch: epoch 2 (the third) ends without validating
SPARSE_VALIDATION = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     "--trainer.check_val_every_n_epoch=2", "--trainer.deterministic=true",
                     "--progress_bar.refresh_rate=0",  # an epoch-level scheduler: its state must resume too
                     "--model.init_args.scheduler=torch.optim.lr_scheduler.StepLR",
                     "--model.init_args.scheduler.init_args.step_size=1",
                     "--model.init_args.scheduler.init_args.gamma=0.5"]


def last_checkpoint(root: Path, name: str) -> dict:
    return torch.load(root / "checkpoints" / name / "checkpoints" / "last.ckpt", weights_only=True)


def test_last_checkpoint_holds_the_final_epoch_that_did_not_validate_and_resumes(in_tmp_dir: Path) -> None:
    from train import main

    def fit(name: str, epochs: int, *extra: str) -> None:
        main(["fit", "--config", str(REPO / "configs/baselines/parts_world.yaml"), *WORLD, *SPARSE_VALIDATION,
              f"--trainer.max_epochs={epochs}", f"--trainer.logger.init_args.name={name}", *extra])

    fit("short", 3)  # validates after epoch 1 only
    short = last_checkpoint(in_tmp_dir, "short")
    assert short["global_step"] == 6 and short["epoch"] == 3  # was step 4, epoch 1: the validation's, not the end
    assert "RNGStateCallback" in short["callbacks"]  # the same contents as a validation-end save
    fit("short", 4, "--ckpt_path=last")  # one more epoch (validated) from the end-of-fit checkpoint
    fit("whole", 4)  # validates after epochs 1 and 3
    resumed, whole = last_checkpoint(in_tmp_dir, "short"), last_checkpoint(in_tmp_dir, "whole")
    assert resumed["global_step"] == whole["global_step"] == 8
    differ = [k for k in whole["state_dict"] if not torch.equal(whole["state_dict"][k], resumed["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ: {differ[:8]}"


L2X_CASES = {  # config, data overrides, selected features per sample (None: varies, INVASE)
    "switch": ("configs/l2x/switch.yaml", ["--data.init_args.num_test=40"], 5),
    "invase_switch": ("configs/l2x/invase_switch.yaml", ["--data.init_args.num_test=40"], None),
    "digits": ("configs/l2x/digits.yaml", [], 4),  # patches: explanation pictures too
    "sentiment": ("configs/l2x/sentiment.yaml", ["--data.init_args.num_test=40", "--data.init_args.max_len=16"],
                  3),  # tokens
}


@pytest.mark.parametrize("case", list(L2X_CASES))
def test_predict_writes_predictions_of_feature_selectors(case: str, in_tmp_dir: Path) -> None:
    from train import main

    config, extra, k = L2X_CASES[case]
    small = [] if case == "digits" else ["--data.init_args.num_train=64", "--data.init_args.num_val=32"]
    main(["fit", "--config", str(REPO / config), *small, *extra, "--trainer.max_epochs=1",
          "--model.init_args.black_box_epochs=1", "--model.init_args.evaluator_epochs=0",
          "--trainer.logger.init_args.name=run", "--trainer.callbacks=null", "--progress_bar.refresh_rate=0"])
    run = in_tmp_dir / "checkpoints" / "run"
    main(["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    with (run / "predictions" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and [int(row["index"]) for row in rows] == list(range(len(rows)))
    if case != "digits":
        assert len(rows) == 40  # the test split
    for row in rows:
        assert {"label", "pred", "pred_name", "probability", "black_box_pred", "black_box_pred_name"} <= set(row)
        assert 0.5 <= float(row["probability"]) <= 1 and int(row["black_box_pred"]) in (0, 1)
        selected = row["selected"].split()
        assert k is None or len(selected) == k
    pictures = sorted((run / "predictions").glob("*.png"))
    assert len(pictures) == (min(32, len(rows)) if case == "digits" else 0)  # pictures for images only


PICTURE_FOLDERS = {"filters", "concepts", "intervention", "parse_trees", "prototypes", "selection", "explanations"}


@pytest.mark.parametrize("config", ["configs/cbm/parts_world.yaml", "configs/l2x/digits.yaml"])
def test_fast_dev_run_writes_no_pictures_into_the_shared_checkpoints_folder(config: str, in_tmp_dir: Path) -> None:
    from train import main

    small = [] if "digits" in config else [*WORLD, "--data.init_args.num_test=32"]
    cli = main(["fit", "--config", str(REPO / config), "--trainer.fast_dev_run=true", *small,
                *(["--model.init_args.black_box_epochs=1", "--model.init_args.evaluator_epochs=0"]
                  if "l2x" in config else [])])
    assert cli.trainer.state.finished
    written = {path.relative_to(in_tmp_dir).parts[1] for path in (in_tmp_dir / "checkpoints").rglob("*")}
    assert not written & PICTURE_FOLDERS, sorted(written)


def test_a_fit_without_a_logger_warns_that_its_checkpoints_are_shared(in_tmp_dir: Path) -> None:
    """Runs with --trainer.logger=false all wrote checkpoints/checkpoints/last.ckpt (each overwrote the last, and
    `--ckpt_path last` resumed whichever run wrote it) without a word: now said at the start."""
    from train import main

    with pytest.warns(UserWarning, match="logger=false.*every run without a logger shares"):
        cli = main(["fit", "--config", str(REPO / "configs/baselines/parts_world.yaml"), "--trainer.logger=false",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                    *WORLD])
    assert cli.trainer.state.finished and (in_tmp_dir / "checkpoints" / "checkpoints" / "last.ckpt").is_file()


def test_a_second_predict_leaves_no_picture_of_the_first(in_tmp_dir: Path) -> None:
    """A predict with fewer samples (or of another checkpoint) left the earlier predict's pictures beside its rows:
    "8 rows ... 8 pictures" printed, 32 PNGs in the folder. The folder holds one predict's files; others stay."""
    from train import main

    main(["fit", "--config", str(REPO / "configs/baselines/parts_world.yaml"), *WORLD, "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--progress_bar.refresh_rate=0",
          "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    again = ["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    main([*again, "--trainer.limit_predict_batches=2"])
    folder = run / "predictions"
    assert len(list(folder.glob("*.png"))) == 32
    (folder / "notes.txt").write_text("mine")
    main([*again, "--trainer.limit_predict_batches=1", "--data.init_args.batch_size=8"])
    with (folder / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 8
    assert sorted(path.name for path in folder.iterdir()) == [f"{i:05d}.png" for i in range(8)] + \
        ["notes.txt", "predictions.csv"]
