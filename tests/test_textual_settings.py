"""Textual explanation heads: the sizes a user gives, the pictures and sentences the callback draws, and the
errors for a too-small vocabulary and a missing stage-1 checkpoint (audit fixes)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_textual import tiny_trainer, write_cub_sentences
from zoo.weights import CheckpointError


def test_model_kwargs_size_the_model_and_win_over_the_linked_ones(tmp_path) -> None:
    """model_kwargs were replaced by the linked ones (class_dim 64, no embed_dim): a model built with
    feature_dim / class_dim / embed_dim 1000 was silently 128 / 64 / 128. Now they size it, are recorded, survive a
    checkpoint round trip; an unknown key and a disagreeing System argument are refused by name."""
    from zoo.textual.system import TextualSystem

    sizes = {"feature_dim": 40, "class_dim": 24, "embed_dim": 20}
    system = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2, model_kwargs=sizes)
    model = system.model
    assert model.image_proj.weight.shape[0] == 40 and model.class_embed.weight.shape == (6, 24)
    assert model.generator.embed.weight.shape == (25, 20)  # (vocab_size, embed_dim)
    assert model.generator.word_lstm.input_size == 20 and model.generator.word_lstm.hidden_size == 16
    assert model.generator.feature_lstm.input_size == 16 + 40 + 24  # hidden + image feature + class feature
    assert system.hparams.model_kwargs | sizes == system.hparams.model_kwargs  # recorded as given
    assert system.hparams.model_kwargs["hidden"] == 16 and system.hparams.model_kwargs["vocab_size"] == 25
    import pytorch_lightning as pl

    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
                "pytorch-lightning_version": pl.__version__}, tmp_path / "s.ckpt")
    loaded = TextualSystem.load_from_checkpoint(tmp_path / "s.ckpt")
    assert loaded.model.generator.embed.weight.shape == (25, 20) and loaded.model.image_proj.weight.shape[0] == 40

    default = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2)  # the recorded figures' sizes
    assert default.model.class_embed.weight.shape == (6, 64) and default.model.generator.embed.weight.shape[1] == 128
    assert default.model.image_proj.weight.shape[0] == 128
    old = {k: v for k, v in default.hparams.items() if k != "model_name"}  # an old checkpoint's: the linked values
    assert old["model_kwargs"]["class_dim"] == 64 and "embed_dim" not in old["model_kwargs"]
    assert TextualSystem(**old).model.class_embed.weight.shape == (6, 64)
    with pytest.raises(ValueError, match="unknown argument 'feture_dim'.*Did you mean 'feature_dim'"):
        TextualSystem(variant="description", hidden=16, model_kwargs={"feture_dim": 8})
    with pytest.warns(UserWarning, match=r"model_kwargs gives hidden=32 and the System's hidden is 16: the System's"):
        model = TextualSystem(variant="description", hidden=16, model_kwargs={"hidden": 32}).model
    assert model.generator.word_lstm.hidden_size == 16
    # a System argument at load overrides the linked copy the checkpoint recorded (it was refused: "model_kwargs
    # gives max_len=18 but the System's max_len is 30", for model_kwargs the user never gave; then warned so)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="model_kwargs gives")
        assert TextualSystem.load_from_checkpoint(tmp_path / "s.ckpt", max_len=30).model.generator.max_len == 30
    with pytest.warns(UserWarning, match="model_kwargs gives max_len=12 and the System's max_len is 30"):  # given
        TextualSystem.load_from_checkpoint(tmp_path / "s.ckpt", max_len=30, model_kwargs={**sizes, "max_len": 12})

    # a checkpoint of other sizes than the run builds (a run written before sizes took effect, resumed with its
    # config.yaml, whose model_kwargs gave sizes the old code ignored): named, before torch's size-mismatch traceback
    built_default = {**dict(default.hparams), "model_kwargs": {k: v for k, v in default.hparams.model_kwargs.items()}}
    torch.save({"state_dict": default.state_dict(), "hyper_parameters": built_default,
                "pytorch-lightning_version": pl.__version__}, tmp_path / "old.ckpt")
    sized = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2,
                          model_kwargs={"feature_dim": 40})
    with pytest.raises(CheckpointError, match=r"other sizes than this run builds: feature_dim: 128 vs 40.*drop those"):
        sized.on_load_checkpoint(torch.load(tmp_path / "old.ckpt", weights_only=True))


def test_the_sentence_classifier_takes_its_sizes() -> None:
    """The sentence classifier (the reward model) was always 128 / 256; `sentence_classifier_kwargs` sizes it."""
    from zoo.textual.system import TextualSystem

    default = TextualSystem(variant="description", hidden=16).sentence_classifier
    assert default.embed.weight.shape == (25, 128) and default.lstm.hidden_size == 256
    sized = TextualSystem(variant="description", hidden=16,
                          sentence_classifier_kwargs={"embed_dim": 12, "hidden": 20}).sentence_classifier
    assert sized.embed.weight.shape == (25, 12) and sized.lstm.hidden_size == 20 and sized.head.in_features == 20
    with pytest.raises(ValueError, match="unknown argument 'hiden'"):
        TextualSystem(variant="description", hidden=16, sentence_classifier_kwargs={"hiden": 20})
    with pytest.raises(ValueError, match="sentence_classifier_kwargs gives dropout=0.5.*sentence_classifier_dropout"):
        TextualSystem(variant="description", hidden=16, sentence_classifier_kwargs={"dropout": 0.5})


def test_the_cli_builds_the_model_kwargs_sizes(in_tmp_dir) -> None:
    """`--model.init_args.model_kwargs={feature_dim: ..., embed_dim: ...}` from the command line reaches the model."""
    from tests.conftest import REPO
    from zoo.cli.lightning import ZooCLI

    cli = ZooCLI(args=["--config", str(REPO / "configs" / "textual" / "description.yaml"),
                       "--model.init_args.hidden=16",
                       "--model.init_args.model_kwargs={feature_dim: 36, embed_dim: 12}",
                       "--data.init_args.num_train=8", "--data.init_args.num_val=8"], run=False)
    assert cli.model.model.image_proj.weight.shape[0] == 36 and cli.model.model.generator.embed.weight.shape[1] == 12


def callback_run(tmp_path, monkeypatch, normalise: bool) -> tuple[list, list, object, object]:
    """One `validate` of an untrained explanation-label System with ExplanationTextCallback (4 images) on a tiny
    parts world (normalised with mean 0.5, std 0.1 where `normalise`): the drawn grids, written texts, callback
    and datamodule."""
    import zoo.textual.callback as callback_module
    from datamodules import PartsWorldDataModule
    from zoo.textual.callback import ExplanationTextCallback
    from zoo.textual.system import TextualSystem

    drawn: list[torch.Tensor] = []
    written: list[str] = []
    monkeypatch.setattr(callback_module, "log_image", lambda logger, tag, image, step=0: drawn.append(image))
    monkeypatch.setattr(callback_module, "log_text", lambda logger, tag, text, step=0: written.append(text))
    data = PartsWorldDataModule(num_train=8, num_val=8, num_test=4, batch_size=8, image_size=32)
    if normalise:
        data.set_normalization([0.5], [0.1])
    torch.manual_seed(0)
    system = TextualSystem(variant="explanation-label", hidden=16)
    callback = ExplanationTextCallback(num_images=4)
    tiny_trainer(tmp_path, callbacks=[callback]).validate(system, datamodule=data, verbose=False)
    return drawn, written, callback, data


def test_the_callback_draws_the_images_with_the_normalisation_undone(tmp_path, monkeypatch) -> None:
    """The picture was drawn from the normalised inputs: with mean 0.5, std 0.1 most pixels clipped."""
    from torchvision.utils import make_grid

    drawn, _, callback, data = callback_run(tmp_path, monkeypatch, normalise=True)
    images = callback.batch["image"][:4]  # as the loader gave them: normalised
    assert float(images.abs().max()) > 1.5  # far outside [0, 1]
    torch.testing.assert_close(drawn[-1], make_grid(data.denormalize(images).clamp(0, 1), nrow=4))


def test_the_callback_writes_sentences_as_the_metrics_and_predictions_decode_them(tmp_path, monkeypatch) -> None:
    """Without a datamodule `decode` the callback wrote the token ids with <bos> and past <eos> ("1 5 6 2" where
    the metrics and predict give "5 6"); it now uses the System's sentence decoder."""
    from datamodules import PartsWorldDataModule

    monkeypatch.setattr(PartsWorldDataModule, "decode", None)  # no datamodule decode: token ids as numbers
    _, written, callback, _ = callback_run(tmp_path, monkeypatch, normalise=False)
    rows = [line.split(" | ") for line in written[-1].splitlines()[2:]]
    references = [row[3].removesuffix(" |") for row in rows]
    assert len(references) == 4 and all(references)
    for reference, tokens in zip(references, callback.batch["captions"][:4, 0]):
        words = [t for t in tokens.tolist()[1:] if t != 0]  # after <bos>, padding dropped
        assert reference == " ".join(str(t) for t in words[:words.index(2)])  # up to <eos>, not "1 ... 2"


def test_a_too_small_vocab_size_is_named_before_the_helpers_train(cub_root, tmp_path) -> None:
    """train.py trains the helpers before the fit: the sentence classifier's batch check fired first, without the
    size to set. `prepare_fit_auxiliaries` now runs the System's data check first, which names it."""
    from datamodules import CUB200DataModule
    from zoo.cli.lightning import prepare_fit_auxiliaries
    from zoo.textual.system import TextualSystem

    write_cub_sentences(cub_root, lambda i, path: " ".join(f"word{i}x{k}" for k in range(6)))
    data = CUB200DataModule(str(cub_root), image_size=32, batch_size=4)
    system = TextualSystem(variant="description", num_classes=3, hidden=16, encoder_epochs=1,
                           sentence_classifier_epochs=1)
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size=25 is below the data's vocabulary of (\d+) words: set "
                                         r"--model.init_args.vocab_size=\1"):
        prepare_fit_auxiliaries(system, trainer, data, restores_checkpoint=False)
    assert not bool(system.sentence_classifier_ready) and not bool(system.image_encoder_ready)


def test_a_missing_stage_one_checkpoint_names_the_config_to_train_first(tmp_path) -> None:
    """explanation.yaml before its stage 1 said only "Checkpoint '...' does not exist"."""
    from zoo.textual.system import TextualSystem
    from zoo.weights import CheckpointError

    missing = str(tmp_path / "textual_explanation_label" / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"init_checkpoint .*last.ckpt.*does not exist: train "
                                              r"configs/textual/explanation_label.yaml first"):
        TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2, init_checkpoint=missing)
    with pytest.raises(CheckpointError, match=r"train configs/textual/description.yaml first"):
        TextualSystem(variant="explanation-dis", hidden=16, discriminative_weight=0.2, init_checkpoint=missing)


def test_a_stage_one_checkpoint_of_other_sizes_is_named_by_its_sizes(tmp_path) -> None:
    """A stage-2 run started from a stage-1 run built with other sizes was told "missing or mis-shaped [...] (a stage
    must keep the image/class inputs of the one it starts from)", never which sizes differ."""
    import pytorch_lightning as pl

    from zoo.textual.system import TextualSystem

    stage_one = TextualSystem(variant="description", hidden=16, model_kwargs={"feature_dim": 20, "embed_dim": 12},
                              sentence_classifier_kwargs={"embed_dim": 10, "hidden": 14})
    torch.save({"state_dict": stage_one.state_dict(), "hyper_parameters": dict(stage_one.hparams),
                "pytorch-lightning_version": pl.__version__}, tmp_path / "description.ckpt")
    with pytest.raises(CheckpointError, match=r"\(stage 1\) was built with other sizes than this run: feature_dim: 20 "
                                              r"vs 128; embed_dim: 12 vs 128; sentence_classifier_kwargs.embed_dim: "
                                              r"10 vs 128; sentence_classifier_kwargs.hidden: 14 vs 256"):
        TextualSystem(variant="explanation-dis", hidden=16, init_checkpoint=str(tmp_path / "description.ckpt"))
    same = TextualSystem(variant="explanation-dis", hidden=16, init_checkpoint=str(tmp_path / "description.ckpt"),
                         model_kwargs={"feature_dim": 20, "embed_dim": 12},
                         sentence_classifier_kwargs={"embed_dim": 10, "hidden": 14})
    assert same.model.image_proj.weight.shape[0] == 20



def stage_one_checkpoint(path, data, **kwargs) -> str:
    """A stage-1 (explanation-label) checkpoint file as Lightning writes it, with `data`'s hyperparameters as its
    datamodule's; no training (the data checks read only the settings)."""
    import pytorch_lightning as pl

    from zoo.textual.system import TextualSystem

    stage_one = TextualSystem(variant="explanation-label", hidden=16, **kwargs)
    torch.save({"state_dict": stage_one.state_dict(), "hyper_parameters": dict(stage_one.hparams),
                "datamodule_hyper_parameters": dict(data.hparams), "pytorch-lightning_version": pl.__version__},
               path)
    return str(path)


def test_a_stage_two_run_on_data_of_other_classes_is_refused_by_setting(tmp_path) -> None:
    """explanation.yaml from a stage trained on world_seed 0, run on world_seed 3 (other part types for every class),
    kept the stage's image encoder and sentence classifier (its reward and val/acc at chance on the new world)
    without a word. The class-defining settings are now compared; sample counts, batch size and split seed may
    differ."""
    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem

    tiny = dict(num_train=16, num_val=8, num_test=4, image_size=32)
    path = stage_one_checkpoint(tmp_path / "stage1.ckpt", PartsWorldDataModule(batch_size=8, **tiny))
    system = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2, init_checkpoint=path)
    with pytest.raises(ValueError, match=r"init_checkpoint '.*stage1.ckpt' \(an earlier stage\) was trained on other "
                                         r"data than this run's \(world_seed: 0 in the stage, 3 here\)"):
        system.check_data(PartsWorldDataModule(batch_size=8, world_seed=3, **tiny))
    with pytest.raises(ValueError, match=r"image_size: 32 in the stage, 48 here"):
        system.check_data(PartsWorldDataModule(batch_size=8, **{**tiny, "image_size": 48}))
    system.check_data(PartsWorldDataModule(batch_size=4, seed=5, **{**tiny, "num_train": 24}))  # same world
    described = TextualSystem(variant="explanation-label", class_features="description", hidden=16,
                              description_checkpoint=path)  # the class table's description model: the same rule
    with pytest.raises(ValueError, match=r"description_checkpoint .* \(world_seed: 0 in the stage, 3 here\)"):
        described.check_data(PartsWorldDataModule(batch_size=8, world_seed=3, **tiny))



def test_a_stage_two_check_takes_the_same_data_written_otherwise_and_a_resume(tmp_path) -> None:
    """False refusals the stage check's first version made: `mean: pretrained` in the stage against the same values
    as lists here (compared unresolved); a resumed run whose description_checkpoint file now holds another run (the
    class table is in the run's own checkpoint)."""
    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem
    from zoo.weights import checkpoint_replaces_weights

    tiny = dict(num_train=16, num_val=8, num_test=4, image_size=32, batch_size=8)
    path = stage_one_checkpoint(tmp_path / "stage1.ckpt", PartsWorldDataModule(mean=[0.5], std=[0.25], **tiny))
    system = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2, init_checkpoint=path)
    system.check_data(PartsWorldDataModule(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], **tiny))  # the same
    with pytest.raises(ValueError, match=r"mean: \[0.5\] in the stage, \[0.4, 0.4, 0.4\] here"):
        system.check_data(PartsWorldDataModule(mean=[0.4] * 3, std=[0.25] * 3, **tiny))
    other = stage_one_checkpoint(tmp_path / "other.ckpt", PartsWorldDataModule(world_seed=3, **tiny))
    with checkpoint_replaces_weights():  # a resumed fit: its checkpoint holds the class table
        resumed = TextualSystem(variant="explanation-label", class_features="description", hidden=16,
                                description_checkpoint=other)
        resumed.check_data(PartsWorldDataModule(**tiny))

def test_helpers_neither_trained_nor_loaded_are_refused_at_fit_start(tmp_path) -> None:
    """sentence_classifier_epochs=0 with no checkpoint trained the generator against an untrained judge (rewards
    about 1/6 for every sentence, val/acc at chance) without a word; encoder_epochs=0 froze a random encoder."""
    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem

    data = PartsWorldDataModule(num_train=16, num_val=8, num_test=4, batch_size=8, image_size=32)
    system = TextualSystem(variant="definition", hidden=16, encoder_epochs=0, sentence_classifier_epochs=0)
    with pytest.raises(ValueError, match=r"sentence_classifier_epochs=0 and no sentence_classifier_checkpoint, nor an "
                                         r"init_checkpoint .*neither trained nor loaded"):
        tiny_trainer(tmp_path).fit(system, datamodule=data)
    encoder = TextualSystem(variant="description", hidden=16, encoder_epochs=0)
    encoder.sentence_classifier_ready.fill_(True)
    with pytest.raises(ValueError, match=r"encoder_epochs=0, no encoder_checkpoint.*train_encoder=False"):
        encoder.check_helpers_ready()
    trained = TextualSystem(variant="description", hidden=16, encoder_epochs=0, train_encoder=True)
    trained.sentence_classifier_ready.fill_(True)
    trained.check_helpers_ready()  # an encoder trained with the generator
    definition = TextualSystem(variant="definition", hidden=16, encoder_epochs=0)
    definition.sentence_classifier_ready.fill_(True)
    definition.check_helpers_ready()  # reads no image: no encoder


def test_a_stage_one_checkpoint_of_another_hidden_size_or_vocabulary_is_named_by_setting(tmp_path) -> None:
    """The stage-2 config's default hidden (256) after a stage trained with hidden=16 was told "missing or
    mis-shaped [weights] (a stage must keep the image/class inputs ...)": neither the setting nor its values."""
    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem

    path = stage_one_checkpoint(tmp_path / "stage1.ckpt", PartsWorldDataModule(num_train=8, num_val=8, num_test=4,
                                                                               image_size=32))
    with pytest.raises(CheckpointError, match=r"built with other settings than this run: hidden=16 in the stage, 24 "
                                              r"here\. Give this run the stage's \(--model.init_args.hidden=16"):
        TextualSystem(variant="explanation", hidden=24, discriminative_weight=0.2, init_checkpoint=path)
    with pytest.raises(CheckpointError, match=r"vocab_size=25 in the stage, 30 here.*--model.init_args.vocab_size=25"):
        TextualSystem(variant="explanation", hidden=16, vocab_size=30, discriminative_weight=0.2, init_checkpoint=path)
    with pytest.raises(CheckpointError, match=r"num_classes=6 in the stage, 4 here.*--data.init_args.num_classes=6"):
        TextualSystem(variant="explanation", hidden=16, num_classes=4, discriminative_weight=0.2, init_checkpoint=path)
