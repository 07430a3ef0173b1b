"""What validate / test / predict of a checkpoint do with the settings they are given: a `--ckpt_path` a later
`--config` reset is named as such; the settings that change no weight (the textual `max_len`) are taken as given,
as `load_from_checkpoint(path, max_len=4)` takes them, and any other model setting the checkpoint's replaces is
warned about; a textual predict draws no pictures and says nothing about them. A decoding length is taken as
given only where the user gives it (a family config that sets none keeps the checkpoint's), and only settings that
decide the model evaluated are warned about (not helper epochs nor the optimiser; {} and None are one empty
model_kwargs; a model_kwargs entry the checkpoint lacks is said)."""

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


def placeholder_run(root: Path, ckpt_path: str | None = None) -> Path:
    """checkpoints/run under `root`: a run's config.yaml (which holds `ckpt_path: null`, or a resumed run's
    `ckpt_path`) and a last.ckpt that is no checkpoint (the refusals come before it is read)."""
    run = root / "checkpoints" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"last")
    config = yaml.safe_load(BASELINE.read_text()) | {"ckpt_path": ckpt_path}
    config["trainer"]["logger"]["init_args"]["name"] = "run"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.mark.parametrize("given", [["--ckpt_path", "last"], ["--ckpt_path=checkpoints/run/checkpoints/last.ckpt"]])
def test_a_ckpt_path_a_later_config_resets_is_named_as_such(in_tmp_dir: Path, capsys: pytest.CaptureFixture,
                                                            given: list[str]) -> None:
    """`validate --ckpt_path last --config <run>/config.yaml`: the run's config (read after it) holds `ckpt_path:
    null`, so the refusal said "no --ckpt_path is given", though one was."""
    run = placeholder_run(in_tmp_dir)
    error = refused(capsys, ["validate", *given, "--config", str(run / "config.yaml"), *TINY])
    value = given[-1].removeprefix("--ckpt_path=")
    assert f"validate: --ckpt_path {value} is given before --config {run / 'config.yaml'}, whose `ckpt_path: " \
           "null` (a run's config.yaml holds one), read after it, replaced it, so the model would be validated with " \
           "untrained weights" in error, error
    assert f"--ckpt_path after --config: --config {run / 'config.yaml'} --ckpt_path {value}" in error, error
    assert "no --ckpt_path is given" not in error, error


@pytest.fixture(scope="module")
def textual_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny explanation-label run (hidden 16, max_len 6, one batch of one epoch): its folder."""
    root = tmp_path_factory.mktemp("textual")
    main(["fit", "--config", str(REPO / "configs/textual/explanation_label.yaml"), *TINY,
          "--model.init_args.encoder_epochs=1", "--model.init_args.sentence_classifier_epochs=1",
          "--model.init_args.hidden=16", "--model.init_args.max_len=6", "--data.init_args.image_size=32",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
          "--trainer.callbacks=[]",
          f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
          "--trainer.logger.init_args.name=words"])
    return root / "words"


def evaluated(command: str, run: Path, *options: str, config: Path | None = None,
              ckpt_path: str | None = None) -> tuple[object, list[str]]:
    """`train.py <command>` of the run's config (or `config`) and last checkpoint (its file, or `ckpt_path`) with
    `options`: the CLI and every warning."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cli = main([command, "--config", str(config or run / "config.yaml"),
                    f"--ckpt_path={ckpt_path or run / 'checkpoints' / 'last.ckpt'}", *options])
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


def family_validated(run: Path, *options: str, ckpt_path: str | None = None) -> tuple[object, list[str]]:
    """`validate` of the run's last checkpoint (its file, or `ckpt_path`) with the family config it was trained from
    (it sets no max_len nor hidden) and the run's data: the CLI and every warning."""
    return evaluated("validate", run, *TINY, "--data.init_args.image_size=32", "--trainer.limit_val_batches=1",
                     "--trainer.callbacks=[]", f"--trainer.logger.init_args.save_dir={run.parent}",
                     f"--trainer.logger.init_args.name={run.name}", *options,
                     config=REPO / "configs/textual/explanation_label.yaml", ckpt_path=ckpt_path)


def test_evaluation_with_the_family_config_keeps_the_checkpoints_decoding_length(textual_run: Path) -> None:
    """The family config sets no max_len, so the parsed value is the class default 18, which was "taken as given"
    over the checkpoint's 6, silently (val/cider_d 0.0588 where the run's own config gave 0.1318). Only a max_len
    the user gives (command line, --config file) is taken; helper epochs (the family config's default 4, the
    run's 1) are not warned about, nor a size the config does not set (hidden: "--model.init_args.hidden=256 is
    ignored ... Drop those options" named the parser's default, an option nobody gave); one given is."""
    cli, messages = family_validated(textual_run)
    assert cli.model.hparams.max_len == 6 and cli.model.model.generator.max_len == 6
    assert not [m for m in messages if "is ignored" in m], messages  # hidden 256 is a default: not given, not said
    cli, messages = family_validated(textual_run, "--model.init_args.hidden=32")
    ignored = [m for m in messages if "is ignored" in m]
    assert len(ignored) == 1 and "--model.init_args.hidden=32 is ignored: the checkpoint's 16 is used" in \
        ignored[0], ignored
    assert "max_len=" not in ignored[0] and "_epochs" not in ignored[0], ignored
    for given in (["--model.init_args.max_len=3"], ["--model.init_args.max_len", "3"]):
        cli, _ = family_validated(textual_run, *given)
        assert cli.model.hparams.max_len == 3 and cli.model.model.generator.max_len == 3, given


def test_evaluation_of_the_last_checkpoint_takes_its_settings_as_a_file_does(textual_run: Path) -> None:
    """`--ckpt_path last` (the same file as the run's last.ckpt) took none of the checkpoint's settings: Lightning
    copies them for a file only, so the family config's max_len 18 decoded a model trained at 6, silently, and a size
    given (hidden 256 against the run's 16) ended in load_state_dict's size-mismatch traceback."""
    cli, messages = family_validated(textual_run, "--model.init_args.hidden=256", ckpt_path="last")
    assert cli.model.hparams.max_len == 6 and cli.model.model.generator.max_len == 6
    assert cli.model.hparams.hidden == 16 and cli.checkpoint_file == str(textual_run / "checkpoints" / "last.ckpt")
    assert cli.config["validate"]["ckpt_path"] == "last"
    ignored = [m for m in messages if "is ignored" in m]
    assert len(ignored) == 1 and "--model.init_args.hidden=256 is ignored: the checkpoint's 16 is used" in \
        ignored[0], ignored
    cli, _ = family_validated(textual_run, "--model.init_args.max_len=3", ckpt_path="last")
    assert cli.model.hparams.max_len == 3 and cli.model.model.generator.max_len == 3


def test_a_resumed_runs_config_naming_the_same_checkpoint_otherwise_is_not_refused(textual_run: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run's config.yaml holds the checkpoint it resumed from, written as it was given (absolute, `last`):
    a --ckpt_path before it naming the same file otherwise (relative, `last`) restores that file: not refused."""
    monkeypatch.chdir(textual_run.parent)
    config = yaml.safe_load((textual_run / "config.yaml").read_text())
    held = textual_run / "resumed.yaml"
    for holds, given in ((str(textual_run / "checkpoints" / "last.ckpt"), "words/checkpoints/last.ckpt"),
                         ("last", "./words/checkpoints/last.ckpt")):
        held.write_text(yaml.safe_dump(config | {"ckpt_path": holds}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = main(["validate", f"--ckpt_path={given}", "--config", str(held), "--trainer.limit_val_batches=1"])
        assert Path(cli.checkpoint_file).resolve() == (textual_run / "checkpoints" / "last.ckpt").resolve()
    held.unlink()


@pytest.mark.parametrize("option", ["--config", "-c"])
def test_a_fit_whose_ckpt_path_a_later_config_resets_is_refused_before_the_run_moves(
        in_tmp_dir: Path, capsys: pytest.CaptureFixture, option: str) -> None:
    """`fit --ckpt_path last --config <run>/config.yaml` (or `-c`): the run's config (read after it) holds `ckpt_path:
    null`, so the fit moved the run asked for to stale/ and trained a new one from epoch 0, its message saying "to
    continue a run instead, give --ckpt_path last" (as given)."""
    run = placeholder_run(in_tmp_dir)
    error = refused(capsys, ["fit", "--ckpt_path", "last", option, str(run / "config.yaml"), *TINY])
    assert f"fit: --ckpt_path last is given before --config {run / 'config.yaml'}, whose `ckpt_path: null` (a " \
           "run's config.yaml holds one), read after it, replaced it, so the fit would start afresh" in error, error
    assert f"--ckpt_path after --config: --config {run / 'config.yaml'} --ckpt_path last" in error, error
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"last" and not (in_tmp_dir / "checkpoints" /
                                                                                "stale").exists()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_ckpt_path_a_resumed_runs_config_replaces_is_refused(in_tmp_dir: Path, capsys: pytest.CaptureFixture,
                                                               command: str) -> None:
    """A resumed run's config.yaml holds the `ckpt_path` it resumed from (`last`), not null: `validate --ckpt_path
    <run>/checkpoints/best-*.ckpt --config <run>/config.yaml` validated last.ckpt, and a fit resumed from the file
    asked for restored last.ckpt, both without a word."""
    run = placeholder_run(in_tmp_dir, ckpt_path="last")
    best = run / "checkpoints" / "best-epoch0-step1.ckpt"
    best.write_bytes(b"best")
    error = refused(capsys, [command, f"--ckpt_path={best}", "--config", str(run / "config.yaml"), *TINY])
    assert f"{command}: --ckpt_path {best} is given before --config {run / 'config.yaml'}, whose `ckpt_path: last` " \
           f"(the config.yaml of a run resumed from it holds one), read after it, replaced it, so the {command} " \
           f"would restore last instead. Give --ckpt_path after --config" in error, error


def test_given_explicitly_reads_the_options_and_the_config_files_as_given(tmp_path: Path) -> None:
    """Where a setting counts as given: an option in any of jsonargparse's forms, a --model mapping, a --config
    file that sets it; not a --config file that leaves it unset, nor another setting's option."""
    from zoo.cli.lightning import given_explicitly

    key = "model.init_args.max_len"
    for args in (["--model.init_args.max_len=3"], ["--model.init_args.max_len", "3"], ["--model.max_len=3"],
                 ["--model", "{init_args: {max_len: 3}}"], ["--model.init_args={max_len: 3}"]):
        assert given_explicitly(key, ["validate", *args]), args
    entry = "model.init_args.model_kwargs.drop_rate"  # an entry of a mapping option, in either mapping
    for args in (["--model.init_args.model_kwargs={drop_rate: 0.5}"], ["--model.init_args",
                                                                         "{model_kwargs: {drop_rate: 0.5}}"]):
        assert given_explicitly(entry, args) and not given_explicitly(f"{entry}_x", args), args
    sets, unset = tmp_path / "sets.yaml", tmp_path / "unset.yaml"
    sets.write_text(yaml.safe_dump({"model": {"init_args": {"max_len": 6}}}))
    unset.write_text(yaml.safe_dump({"model": {"init_args": {"hidden": 6}}, "max_len": 6}))
    assert given_explicitly(key, ["validate", "--config", str(unset), f"--config={sets}"])
    assert given_explicitly(key, ["validate", "-c", str(sets)])
    for args in (["--config", str(unset)], ["--config", str(REPO / "configs/textual/explanation_label.yaml")],
                 ["--model.init_args.max_len_x=3"], ["--model.init_args.hidden=3"], ["--config", "missing.yaml"]):
        assert not given_explicitly(key, ["validate", *args]), args


def test_only_settings_of_the_model_evaluated_are_warned_about(textual_run: Path) -> None:
    """"is ignored" named settings that only train (textual encoder_epochs / sentence_classifier_epochs, the
    optimiser's lr), so it told the user to drop options for no reason; a model_kwargs entry the checkpoint lacks
    was dropped silently. A size the model is built with is still said."""
    _, messages = evaluated("validate", textual_run, "--trainer.limit_val_batches=1",
                            "--model.init_args.encoder_epochs=7", "--model.init_args.sentence_classifier_epochs=7",
                            "--model.init_args.optimizer.init_args.lr=0.5", "--model.init_args.aux_lr=0.5")
    assert not [m for m in messages if "is ignored" in m], messages
    cli, messages = evaluated("validate", textual_run, "--trainer.limit_val_batches=1",
                              "--model.init_args.model_kwargs.class_dim=32",
                              "--model.init_args.model_kwargs.embed_dim=8",
                              "--model.init_args.model_kwargs.feature_dim=8")
    ignored = [m for m in messages if "is ignored" in m]
    assert len(ignored) == 1, messages
    assert "--model.init_args.model_kwargs.class_dim=32 is ignored: the checkpoint's 64 is used" in ignored[0]
    assert "--model.init_args.model_kwargs.embed_dim=8 is ignored: the checkpoint's model_kwargs give no " \
           "embed_dim, so the model's default 128 is used" in ignored[0], ignored
    assert "model_kwargs.feature_dim=8 is ignored" in ignored[0], ignored
    kwargs = cli.model.hparams.model_kwargs  # the checkpoint's: the entries it lacks are dropped
    assert kwargs["class_dim"] == 64 and "embed_dim" not in kwargs and "feature_dim" not in kwargs, kwargs


def test_ignored_model_settings_of_l2x_and_a_classifier() -> None:
    """The rule on other families, from settings as `zoo.weights.model_settings` gives them: L2X's helper epochs
    are not said; `model_kwargs: {}` against a checkpoint's None is no difference; an entry the checkpoint's None
    mapping lacks is said unless it is the model's default; a model_kwargs value is compared as written."""
    from zoo.baselines.system import ClassifierSystem
    from zoo.cli.lightning import ignored_model_settings
    from zoo.l2x.system import L2XSystem
    from zoo.weights import resume_free

    p = "model.init_args."
    used = {f"{p}model_name": "l2x_vector", f"{p}black_box_epochs": 1, f"{p}evaluator_epochs": 1,
            f"{p}model_kwargs.k": 4, f"{p}optimizer.init_args.lr": 0.001}
    given = {f"{p}model_name": "l2x_vector", f"{p}black_box_epochs": 10, f"{p}evaluator_epochs": 10,
             f"{p}model_kwargs.k": 4.0, f"{p}optimizer.init_args.lr": 0.1}
    assert ignored_model_settings(given, used, L2XSystem, resume_free) == []
    assert ignored_model_settings({**given, f"{p}model_kwargs.k": 2}, used, L2XSystem, resume_free) == \
        [f"--{p}model_kwargs.k=2 is ignored: the checkpoint's 4 is used"]
    used = {f"{p}model_name": "baseline_tinycnn", f"{p}model_kwargs": None}
    assert ignored_model_settings({f"{p}model_kwargs": {}}, used, ClassifierSystem, resume_free) == []
    assert ignored_model_settings({f"{p}model_kwargs.drop_rate": 0.0}, used, ClassifierSystem, resume_free) == []
    assert ignored_model_settings({f"{p}model_kwargs.drop_rate": 0.5, f"{p}model_kwargs.pretrained_path": "w.pt"},
                                  used, ClassifierSystem, resume_free) == \
        [f"--{p}model_kwargs.drop_rate=0.5 is ignored: the checkpoint's model_kwargs give no drop_rate, so the "
         "model's default 0.0 is used"]
