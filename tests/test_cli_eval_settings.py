"""What validate / test / predict of a checkpoint do with the settings they are given: a `--ckpt_path` a later
`--config` reset is named as such; the settings that change no weight (the textual `max_len`) are taken as given,
as `load_from_checkpoint(path, max_len=4)` takes them, and any other model setting the checkpoint's replaces is
warned about; a textual predict draws no pictures and says nothing about them."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_checkpoint_config import refused
from train import main

BASELINE = REPO / "configs/baselines/parts_world.yaml"
TINY = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
        "--data.init_args.batch_size=8", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize("given", [["--ckpt_path", "last"], ["--ckpt_path=checkpoints/run/checkpoints/last.ckpt"]])
def test_a_ckpt_path_a_later_config_resets_is_named_as_such(in_tmp_dir: Path, capsys: pytest.CaptureFixture,
                                                            given: list[str]) -> None:
    """`validate --ckpt_path last --config <run>/config.yaml`: the run's config (read after it) holds `ckpt_path:
    null`, so the refusal said "no --ckpt_path is given", though one was."""
    run = in_tmp_dir / "checkpoints" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"last")  # not read: the refusal comes first
    config = yaml.safe_load(BASELINE.read_text()) | {"ckpt_path": None}
    config["trainer"]["logger"]["init_args"]["name"] = "run"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    error = refused(capsys, ["validate", *given, "--config", str(run / "config.yaml"), *TINY])
    value = given[-1].removeprefix("--ckpt_path=")
    assert f"validate: --ckpt_path {value} is given before --config {run / 'config.yaml'}, whose `ckpt_path: " \
           "null` (a run's config.yaml holds one), read after it, replaced it, so the model would be validated with " \
           "untrained weights" in error, error
    assert f"--ckpt_path after --config: --config {run / 'config.yaml'} --ckpt_path {value}" in error, error
    assert "no --ckpt_path is given" not in error, error


@pytest.fixture(scope="module")
def textual_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny explanation-label run (hidden 16, max_len 18, one batch of one epoch): its folder."""
    root = tmp_path_factory.mktemp("textual")
    main(["fit", "--config", str(REPO / "configs/textual/explanation_label.yaml"), *TINY,
          "--model.init_args.encoder_epochs=1", "--model.init_args.sentence_classifier_epochs=1",
          "--model.init_args.hidden=16", "--data.init_args.image_size=32", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.callbacks=[]",
          f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
          "--trainer.logger.init_args.name=words"])
    return root / "words"


def evaluated(command: str, run: Path, *options: str) -> tuple[object, list[str]]:
    """`train.py <command>` of the run's config and last checkpoint with `options`: the CLI and every warning."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cli = main([command, "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                    *options])
    return cli, [str(w.message) for w in said]


def test_evaluation_takes_the_decoding_length_as_given_and_says_which_settings_it_ignores(textual_run: Path) -> None:
    """validate / test / predict with --ckpt_path FILE dropped `--model.init_args.max_len=3` silently (Lightning
    copies the checkpoint's hyperparameters over the config): sentences of the training length, while
    `load_from_checkpoint(path, max_len=3)` cut them. Now max_len is taken as given and a setting that is ignored
    (hidden: a weight's shape) is said."""
    cli, messages = evaluated("predict", textual_run, "--model.init_args.max_len=3", "--model.init_args.hidden=32")
    assert cli.model.hparams.max_len == 3 and cli.model.model.generator.max_len == 3
    assert cli.model.hparams.hidden == 16  # the checkpoint's: the weights' shape
    with (textual_run / "predictions" / "predictions.csv").open() as handle:
        sentences = [row["explanation"].split() for row in csv.DictReader(handle)]
    assert sentences and all(1 <= len(words) <= 3 for words in sentences), sentences
    ignored = [m for m in messages if "is ignored" in m]
    assert len(ignored) == 1 and "--model.init_args.hidden=32 is ignored: the checkpoint's 16 is used" in ignored[0]
    assert "max_len" in ignored[0] and "max_len=3" not in ignored[0], ignored  # named as taken, not as ignored
    assert not [m for m in messages if "model_kwargs gives" in m], messages  # model_kwargs' copy follows max_len
    cli, messages = evaluated("validate", textual_run, "--model.init_args.max_len=4", "--trainer.limit_val_batches=1")
    assert cli.model.model.generator.max_len == 4
    assert not [m for m in messages if "is ignored" in m], messages  # the run's own settings: nothing to say


def test_a_textual_predict_says_nothing_of_pictures_it_does_not_draw(textual_run: Path) -> None:
    """Every textual predict warned "predict: no explanation pictures (ExplanationModel takes more than the
    inputs ...)", though its explanations are the sentences in predictions.csv (README: no pictures)."""
    _, messages = evaluated("predict", textual_run)
    assert not [m for m in messages if "explanation pictures" in m], messages
    assert (textual_run / "predictions" / "predictions.csv").is_file()
    assert not list((textual_run / "predictions").glob("*.png"))
