"""A checkpoint evaluated, used for predictions or resumed with data that feeds its model other inputs than it was
trained on (another normalisation, image size, class names or class order) is refused, naming the setting and both
values, instead of silently writing wrong predictions; state dicts wrapped as torchvision's reference scripts, DeiT and
MAE save them ({"model": ...}) load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import zoo
from tests.conftest import REPO
from train import command_line, main
from zoo.registry import check_same_model
from zoo.weights import CheckpointError

TINY_WORLD = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
              "--data.init_args.batch_size=8"]
ONE_STEP = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
            "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false"]


def refused(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """The error `train.py <args>` exits with: status 2, said once, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        command_line(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    return error


def test_predict_with_other_normalisation_or_image_size_than_training_is_refused(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """An ICNN trained on normalised 48-pixel images, predicted with its family config (64 pixels, no normalisation):
    the images were normalised otherwise and predictions.csv silently wrong, or (image size alone) torch's "size
    mismatch for model.top_filters.log_mean_z" came out. Its own config.yaml still predicts."""
    main(["fit", "--config", str(REPO / "configs/icnn/parts_world.yaml"), *TINY_WORLD, *ONE_STEP,
          "--data.init_args.image_size=48", "--data.init_args.mean=[0.5,0.4,0.3]",
          "--data.init_args.std=[0.2,0.25,0.3]",
          "--trainer.callbacks=[]", "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"

    error = refused(capsys, ["predict", "--config", str(run / "config.yaml"), ckpt, "--data.init_args.mean=null",
                             "--data.init_args.std=null"])  # the images unnormalised: silently wrong predictions
    assert "mean=[0.5, 0.4, 0.3]" in error and "mean=None" in error, error
    error = refused(capsys, ["predict", "--config", str(REPO / "configs/icnn/parts_world.yaml"), *TINY_WORLD, ckpt,
                             "--trainer.callbacks=[]"])
    assert "mean=[0.5, 0.4, 0.3]" in error and "mean=None" in error, error
    assert f"--config {run / 'config.yaml'}" in error, error
    assert not (run / "predictions").exists()

    error = refused(capsys, ["predict", "--config", str(run / "config.yaml"), ckpt, "--data.init_args.image_size=64"])
    assert "image_size=48" in error and "image_size=64" in error and "size mismatch" not in error, error

    # a resumed fit alike (it went on learning from unnormalised images), also through `--ckpt_path last`
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    for given in (ckpt, "--ckpt_path=last"):
        error = refused(capsys, ["fit", "--config", str(run / "config.yaml"), given, "--trainer.max_epochs=2",
                                 "--data.init_args.mean=null", "--data.init_args.std=null"])
        assert "mean=[0.5, 0.4, 0.3]" in error and "mean=None" in error, error
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before

    # a checkpoint without its datamodule's settings (trained from Python): the model's own image size is compared
    bare = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    bare.pop("datamodule_hyper_parameters")
    torch.save(bare, run / "bare.ckpt")
    error = refused(capsys, ["validate", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'bare.ckpt'}",
                             "--data.init_args.image_size=64"])
    assert "(image_size=48)" in error and "(image_size=64)" in error and "size mismatch" not in error, error

    # compare's `checkpoint:` runs are checked alike, before any run trains
    spec = in_tmp_dir / "spec.yaml"
    spec.write_text(yaml.safe_dump({"compare": {"name": "cmp", "args": [*TINY_WORLD, *ONE_STEP], "runs": {
        "trained": {"config": str(REPO / "configs/icnn/parts_world.yaml"), "checkpoint": ckpt.split("=", 1)[1]},
        "plain": {"config": str(REPO / "configs/baselines/parts_world.yaml")}}}}))
    error = refused(capsys, ["compare", "--config", str(spec), "--no_explain"])
    assert "mean=[0.5, 0.4, 0.3]" in error and "mean=None" in error, error
    assert not (in_tmp_dir / "checkpoints" / "cmp").exists()

    main(["predict", "--config", str(run / "config.yaml"), ckpt])
    assert (run / "predictions" / "predictions.csv").is_file()


def test_data_with_other_class_names_is_refused_and_pretrained_mean_matches_its_numbers(
        image_folder_root: Path, in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Class ids of a folder whose classes are named otherwise (same count) were read as the checkpoint's classes:
    predictions named and scored by the wrong classes. `mean: pretrained` (stored as written) equals the numbers it
    stands for, so a run predicted with them written out is not refused."""
    main(["fit", "--config", str(REPO / "configs/baselines/image_folder.yaml"), *ONE_STEP,
          f"--data.init_args.root={image_folder_root}", "--data.init_args.image_size=32",
          "--data.init_args.batch_size=4", "--data.init_args.mean=pretrained", "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    again = ["--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]

    renamed = in_tmp_dir / "renamed"
    shutil.copytree(image_folder_root, renamed)
    for split in ("train", "val"):
        (renamed / split / "cat").rename(renamed / split / "zebra")  # classes [dog, zebra]: ids 0, 1 swap meaning
    error = refused(capsys, ["predict", *again, f"--data.init_args.root={renamed}"])
    assert "['cat', 'dog']" in error and "['dog', 'zebra']" in error, error
    assert not (run / "predictions").exists()

    error = refused(capsys, ["validate", *again, "--data.init_args.mean=null"])
    assert "mean=[0.485, 0.456, 0.406]" in error and "mean=None" in error, error

    written_out = ["--data.init_args.mean=[0.485,0.456,0.406]", "--data.init_args.std=[0.229,0.224,0.225]"]
    main(["predict", *again, *written_out])
    assert (run / "predictions" / "predictions.csv").is_file()


def test_class_names_in_another_order_and_equal_settings_written_otherwise() -> None:
    from zoo.weights import check_class_names, check_data_fits_checkpoint

    with pytest.raises(CheckpointError, match=r"\['dog', 'cat'\]; this run's data has \['cat', 'dog'\] \(the same "
                                              r"names in another order"):
        check_class_names(["dog", "cat"], ["cat", "dog"], "ckpt", "hint")
    many = [f"bird {i}" for i in range(200)]
    with pytest.raises(CheckpointError, match=r"\(2 of 200 differ: id 3: 'bird 3' vs 'bird 4', id 4: 'bird 4' vs "
                                              r"'bird 3'\) \(the same names in another order"):
        check_class_names(many, many[:3] + [many[4], many[3]] + many[5:], "ckpt", "hint")
    check_class_names(["a", "b"], ("a", "b"), "ckpt", "hint")
    check_class_names(None, ["a", "b"], "ckpt", "hint")  # a checkpoint saved without names: nothing to compare
    check_data_fits_checkpoint({"mean": (0.5,), "std": [0.25], "image_size": 64, "root": "a"},
                               {"mean": [0.5, 0.5, 0.5], "std": (0.25,) * 3, "image_size": 64, "root": "b"}, "c", "h")
    check_data_fits_checkpoint({"mean": None, "std": None}, {"mean": [0.0], "std": [1.0, 1.0, 1.0]}, "c", "h")
    with pytest.raises(CheckpointError, match="upsample_mode='nearest'; this run's data has upsample_mode='bilinear'"):
        check_data_fits_checkpoint({"upsample_mode": "nearest"}, {"upsample_mode": "bilinear"}, "c", "h")


def test_check_same_model_names_the_image_size_of_a_model_sized_by_it() -> None:
    """ICNN's template bank is sized for its top map: another image_size is named, not left to torch's "size
    mismatch"; a classifier, which takes any size, is not refused."""
    icnn = {"model_name": "icnn_tinycnn", "num_classes": 3, "in_chans": 3, "image_size": 100}
    with pytest.raises(CheckpointError, match=r"\(image_size=100\); this run builds .* \(image_size=64\)"):
        check_same_model(icnn, {**icnn, "image_size": 64}, "the checkpoint")
    check_same_model(icnn, {**icnn, "image_size": [100, 100]}, "the checkpoint")
    check_same_model({**icnn, "model_name": "baseline_tinycnn"}, {**icnn, "model_name": "baseline_tinycnn",
                                                                  "image_size": 64}, "the checkpoint")


def test_state_dicts_wrapped_under_model_or_ema_load(tmp_path: Path) -> None:
    """torchvision's reference scripts, DeiT and MAE save {"model": state_dict, ...}: it was refused as "does not
    hold a state dict; got dict". Unwrapped as timm does; a file holding none names its keys."""
    state = zoo.create_model("baseline_tinycnn", num_classes=3).state_dict()
    for key in ("model", "model_ema", "state_dict_ema"):
        path = tmp_path / f"{key}.pth"
        torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, key: state}, path)
        model = zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(path))
        loaded = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
        assert loaded and all(torch.equal(v, state[k]) for k, v in loaded.items()), key
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "weights": [1, 2]}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"got dict with keys \['epoch', 'optimizer', 'weights'\]"):
        zoo.create_model("baseline_tinycnn", num_classes=3, pretrained_path=str(tmp_path / "none.pth"))


def test_a_system_restored_at_another_image_size_names_it(tmp_path: Path) -> None:
    """A checkpoint of an ICNN restored into one built for another image size (a `fit --ckpt_path` whose data gives
    another size): the System's own check names the size, where torch said "size mismatch for
    model.top_filters.log_mean_z". (`load_from_checkpoint(..., image_size=)` rewrites the checkpoint's own
    hyper-parameters first, so there only torch's message is left.)"""
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.icnn.system import ICNNSystem

    system = ICNNSystem("icnn_tinycnn", num_classes=3, image_size=64)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(system)
    trainer.save_checkpoint(tmp_path / "icnn.ckpt")
    data = PartsWorldDataModule(num_classes=3, num_train=8, num_val=4, num_test=4, batch_size=4, image_size=32)
    with pytest.raises(CheckpointError, match=r"\(image_size=64\); this run builds .* \(image_size=32\)"):
        trainer.validate(ICNNSystem("icnn_tinycnn", num_classes=3, image_size=32), datamodule=data,
                         ckpt_path=tmp_path / "icnn.ckpt", verbose=False)


def test_a_resumed_fit_with_other_model_settings_is_refused_and_resume_free_ones_apply(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A fit resumed with another learning rate trained on at the checkpoint's (the optimiser's state holds it) and
    one with another loss weight switched the loss mid-run (`last`) or kept the old one (a file: Lightning copies the
    checkpoint's hyperparameters over the config), both silently. Each is refused, naming the key and both values;
    adding a scheduler alike. The non-finite-loss policy may change (to skip the batch a run died on) and applies,
    also through a file; the run's own config.yaml resumes."""
    config = str(REPO / "configs/icnn/parts_world.yaml")
    main(["fit", "--config", config, *TINY_WORLD, *ONE_STEP, "--trainer.callbacks=[]",
          "--trainer.logger.init_args.name=run"])
    run = in_tmp_dir / "checkpoints" / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["zoo_model_settings"]["model.init_args.optimizer.init_args.lr"] == 0.002
    before = last.read_bytes()
    resume = ["fit", "--config", config, *TINY_WORLD, *ONE_STEP, "--trainer.max_epochs=2", "--trainer.callbacks=[]",
              "--trainer.logger.init_args.name=run"]
    for given in (f"--ckpt_path={last}", "--ckpt_path=last"):
        error = refused(capsys, [*resume, given, "--model.init_args.optimizer.init_args.lr=0.5",
                                 "--model.init_args.loss.init_args.weight=7"])
        assert "optimizer.init_args.lr: 0.002 in the checkpoint, 0.5 here" in error, error
        assert "loss.init_args.weight: 1 in the checkpoint, 7 here" in error, error
        assert f"--config {run / 'config.yaml'}" in error, error
    scheduler = ["--model.init_args.scheduler=torch.optim.lr_scheduler.StepLR",
                 "--model.init_args.scheduler.init_args.step_size=1"]
    error = refused(capsys, [*resume, "--ckpt_path=last", *scheduler])
    assert "model.init_args.scheduler: None in the checkpoint" in error, error
    error = refused(capsys, [*resume, "--ckpt_path=last", "--model.init_args.model_kwargs.mu=centroid"])
    assert "model_kwargs.mu: not set (the model's default now: 'argmax') in the checkpoint, 'centroid' here" in error, \
        error  # the model's default named as such, not as what the checkpoint set
    assert last.read_bytes() == before

    cli = main([*resume, f"--ckpt_path={last}", "--model.init_args.nonfinite_loss=skip",
                "--model.init_args.model_kwargs.masks=true"])  # ICNN's default: the same model as its run's
    assert cli.model.hparams.nonfinite_loss == "skip" and cli.trainer.current_epoch == 2
    assert torch.load(last, weights_only=True)["zoo_model_settings"]["model.init_args.nonfinite_loss"] == "skip"
    cli = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path=last", "--trainer.max_epochs=3"])
    assert cli.trainer.current_epoch == 3


def test_a_resumed_fit_with_other_data_settings_is_refused_and_where_the_files_are_may_change(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A fit resumed with another batch size or data seed went on at its batch position in other batches of other
    samples, mixing two datasets in one run, silently. Refused, naming each setting and both values (`last` and a
    file alike); the loader's worker count, the test split's size (and a dataset folder that moved) may change. A
    starting-weight file that moved, given anew inside model_kwargs, is what the resumed run records (the file's
    hyperparameters put the old path back)."""
    config = str(REPO / "configs/baselines/parts_world.yaml")
    torch.save(zoo.create_model("baseline_tinycnn", num_classes=6).state_dict(), in_tmp_dir / "a.pth")
    main(["fit", "--config", config, *TINY_WORLD, *ONE_STEP, "--trainer.callbacks=[]",
          "--trainer.logger.init_args.name=run", "--model.init_args.model_kwargs.pretrained_path=a.pth"])
    (in_tmp_dir / "a.pth").rename(in_tmp_dir / "b.pth")
    last = in_tmp_dir / "checkpoints" / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    resume = ["fit", "--config", config, *TINY_WORLD, *ONE_STEP, "--trainer.max_epochs=2", "--trainer.callbacks=[]",
              "--trainer.logger.init_args.name=run"]
    for given in (f"--ckpt_path={last}", "--ckpt_path=last"):
        error = refused(capsys, [*resume, given, "--data.init_args.batch_size=4", "--data.init_args.seed=5"])
        assert "batch_size: 8 in the checkpoint, 4 here" in error and "seed: 0 in the checkpoint, 5 here" in error, error
        assert "resumed fit goes on with the data its run was trained on" in error, error
    assert last.read_bytes() == before
    cli = main([*resume, f"--ckpt_path={last}", "--data.init_args.num_workers=1", "--data.init_args.num_test=16",
                "--model.init_args.model_kwargs.pretrained_path=b.pth"])
    assert cli.trainer.current_epoch == 2 and cli.datamodule.hparams.num_workers == 1
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["model_kwargs"]["pretrained_path"] == "b.pth"
    assert saved["datamodule_hyper_parameters"]["num_test"] == 16


def test_a_resumed_fit_with_a_null_model_kwargs_and_a_default_entry_builds_the_same_model(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A config without model_kwargs (null, as the baselines') resumed with an entry at the model's default was
    refused ("model_kwargs: None in the checkpoint, (not set) here"): an empty mapping is no difference, its entries
    are compared one by one (another value is refused, naming the entry alone)."""
    config = str(REPO / "configs/baselines/parts_world.yaml")
    run = ["--config", config, *TINY_WORLD, *ONE_STEP, "--trainer.callbacks=[]", "--trainer.logger.init_args.name=run"]
    main(["fit", *run])
    error = refused(capsys, ["fit", *run, "--trainer.max_epochs=2", "--ckpt_path=last",
                             "--model.init_args.model_kwargs.drop_rate=0.5"])
    assert "model_kwargs.drop_rate: not set (the model's default now: 0) in the checkpoint, 0.5 here" in error and \
        "model_kwargs: " not in error, error
    cli = main(["fit", *run, "--trainer.max_epochs=2", "--ckpt_path=last", "--model.init_args.model_kwargs.drop_rate=0"])
    assert cli.trainer.current_epoch == 2


def test_a_moved_helper_file_given_anew_applies_on_resume_through_a_checkpoint_file(in_tmp_dir: Path) -> None:
    """`*_checkpoint` files may change on resume (they moved; the checkpoint holds the helper's weights), but through
    `--ckpt_path FILE` Lightning put the checkpoint's old path back over the given one and the System read it:
    "Weight file 'bb1.pt' does not exist". Now the given path applies and nothing is read while a checkpoint's
    weights will replace the System's."""
    from zoo.l2x.system import L2XSystem
    from zoo.weights import checkpoint_replaces_weights

    torch.manual_seed(0)
    helper = L2XSystem(data_inputs={"num_features": 10}, model_kwargs={"k": 2})
    torch.save(helper.state_dict(), in_tmp_dir / "bb1.pt")
    config = str(REPO / "configs/l2x/xor.yaml")
    run = ["--config", config, *ONE_STEP, "--trainer.callbacks=[]", "--trainer.logger.init_args.name=run",
           "--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32",
           "--data.init_args.batch_size=32", "--model.init_args.evaluator_epochs=0"]
    main(["fit", *run, "--model.init_args.black_box_checkpoint=bb1.pt"])
    (in_tmp_dir / "bb1.pt").rename(in_tmp_dir / "bb2.pt")
    last = in_tmp_dir / "checkpoints" / "run" / "checkpoints" / "last.ckpt"
    cli = main(["fit", *run, "--trainer.max_epochs=2", f"--ckpt_path={last}",
                "--model.init_args.black_box_checkpoint=bb2.pt"])
    assert cli.trainer.current_epoch == 2 and cli.model.hparams.black_box_checkpoint == "bb2.pt"
    with checkpoint_replaces_weights():  # a file that is gone is not read when a checkpoint replaces the weights
        L2XSystem(data_inputs={"num_features": 10}, model_kwargs={"k": 2}, black_box_checkpoint="gone.pt")


def test_a_resumed_fit_compares_no_setting_the_data_gives_the_model(in_tmp_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The System arguments the CLI links from the data (num_classes, in_chans, image_size, data_inputs,
    class_names) are in a run's settings at their defaults, which the data replaces: a checkpoint written before
    such a default changed (ReNN's in_chans, 3 then None) was refused with the config it was trained with. They are
    the data check's: the same data resumes, another is refused by it."""
    config = str(REPO / "configs/baselines/parts_world.yaml")
    run = ["--config", config, *TINY_WORLD, *ONE_STEP, "--trainer.callbacks=[]", "--trainer.logger.init_args.name=run"]
    main(["fit", *run])
    last = in_tmp_dir / "checkpoints" / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    for key, old_default in (("in_chans", 1), ("num_classes", 10), ("image_size", 224), ("class_names", ["a"])):
        checkpoint["zoo_model_settings"][f"model.init_args.{key}"] = old_default
    torch.save(checkpoint, last)
    error = refused(capsys, ["fit", *run, "--trainer.max_epochs=2", "--ckpt_path=last",
                             "--data.init_args.num_classes=4"])  # other data: the data check names it
    assert "num_classes" in error and "in_chans" not in error, error
    cli = main(["fit", *run, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert cli.trainer.current_epoch == 2
