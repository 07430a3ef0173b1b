"""The token datamodules' vocabulary is part of every checkpoint (Lightning's datamodule `state_dict` /
`load_state_dict`): validate / test / predict of a checkpoint, a resumed fit and `trainer.validate(..., ckpt_path=)`
encode the texts with the words the model was trained with, whatever folder, table or seed gives the texts.
Also: a table with unlabelled rows under `labels: null`, and typographic apostrophes."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from datamodules import CSVTextDataModule, DatasetLayoutError, DataSettingError, IMDBDataModule
from datamodules.text import encode, encode_texts, tokenize
from tests.conftest import write_imdb

REPO = Path(__file__).resolve().parents[1]
TEST_REVIEWS = {  # the same test reviews in both folders
    "pos": ["A wonderful, moving film. Great cast!", "Great story and great music.", "Superb acting, wonderful."],
    "neg": ["Boring and awful. Bad script.", "The plot was bad, the music worse.", "Awful, just awful and dull."],
}
TRAIN_REVIEWS = {
    "a": {"pos": ["A wonderful film, great music.", "Great cast, superb story.", "Moving and wonderful acting."],
          "neg": ["Bad and boring plot.", "Awful script, dull music.", "The plot was awful and bad."]},
    # other training reviews: none of the test reviews' words, so this folder's own vocabulary reads them as <unk>
    "b": {"pos": ["Delightful picture, brilliant score.", "Brilliant, delightful scenes.", "Charming cinema."],
          "neg": ["Tedious, weak dialogue.", "Weak sequel, tedious scenes.", "Poor, poor direction."]},
}


@pytest.fixture
def imdb_roots(tmp_path: Path) -> tuple[Path, Path]:
    """Two aclImdb folders with the same test reviews and other training reviews."""
    return tuple(write_imdb(tmp_path / f"aclImdb_{name}", {"train": train, "test": TEST_REVIEWS})
                 for name, train in TRAIN_REVIEWS.items())


def write_sentences(path: Path, num_rows: int = 60) -> Path:
    """A Rotten Tomatoes-like table (category, text) of many distinct words, so that another seed's training rows
    give another vocabulary."""
    generator = random.Random(0)
    cues = {"fresh": ["good", "great", "superb"], "rotten": ["bad", "awful", "dull"]}
    filler = [f"w{i}" for i in range(80)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text"])
        for i in range(num_rows):
            label = "fresh" if i % 2 else "rotten"
            words = generator.sample(filler, 6) + [generator.choice(cues[label])]
            generator.shuffle(words)
            writer.writerow([label, " ".join(words)])
    return path


def imdb(root: Path, **kwargs) -> IMDBDataModule:
    return IMDBDataModule(root, **{"max_len": 8, "max_vocab": 30, "val_fraction": 0.34} | kwargs)


def test_vocabulary_is_the_datamodule_state_and_loading_it_encodes_the_splits_with_it(
        imdb_roots: tuple[Path, Path]) -> None:
    """Another folder's own vocabulary gave the same test reviews other ids: after `load_state_dict` of the first
    folder's state, both encode them alike (whether loaded after setup or before it), and an older checkpoint's
    empty state leaves the folder's own words."""
    first, second = imdb(imdb_roots[0]), imdb(imdb_roots[1])
    assert first.state_dict() == {}  # nothing read yet: nothing saved
    first.setup()
    second.setup()
    state = first.state_dict()
    assert state == {"vocabulary": first.vocabulary, "tokenizer": 2} and "wonderful" in state["vocabulary"]
    own = second.splits["test"].tensors["tokens"].clone()
    assert not torch.equal(own, first.splits["test"].tensors["tokens"])  # the bug: other ids for the same reviews
    second.load_state_dict({})  # an older checkpoint: nothing changes
    assert torch.equal(second.splits["test"].tensors["tokens"], own)

    second.load_state_dict(state)  # after setup: the splits are encoded again
    assert second.vocabulary == first.vocabulary and second.state_dict() == state
    assert torch.equal(second.splits["test"].tensors["tokens"], first.splits["test"].tensors["tokens"])
    lookup = {word: i for i, word in enumerate(first.vocabulary) if i >= 2 and word}
    texts = [tokenize((imdb_roots[1] / name).read_text()) for name in second.sample_names("train")]
    assert torch.equal(second.splits["train"].tensors["tokens"], encode(texts, lookup, 8))
    assert torch.equal(second.splits["train"].tensors["label"], torch.tensor(
        [name.startswith("train/pos") for name in second.sample_names("train")]).long())

    before_setup = imdb(imdb_roots[1])  # loaded first: setup uses the loaded words
    before_setup.load_state_dict(state)
    assert before_setup.state_dict() == state
    before_setup.setup()
    assert before_setup.vocabulary == first.vocabulary
    assert torch.equal(before_setup.splits["test"].tensors["tokens"], first.splits["test"].tensors["tokens"])

    with pytest.raises(DataSettingError, match="holds 30 words; this datamodule's holds 40"):
        imdb(imdb_roots[1], max_vocab=40).load_state_dict(state)


def test_another_seed_takes_the_checkpoint_words_for_a_table(tmp_path: Path) -> None:
    """CSVText drew its vocabulary from the rows `seed` put in training: the same row got other ids with seed 1."""
    path = write_sentences(tmp_path / "rt.csv")
    settings = dict(label_column="category", labels=["rotten", "fresh"], max_len=8, max_vocab=20)
    trained, other = (CSVTextDataModule(path, seed=seed, **settings) for seed in (0, 1))
    trained.setup()
    other.setup()
    assert other.vocabulary != trained.vocabulary
    other.load_state_dict(trained.state_dict())
    lookup = {word: i for i, word in enumerate(trained.vocabulary) if i >= 2 and word}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    for split, samples in other.splits.items():
        texts = [tokenize(rows[int(name.removeprefix("row "))]["text"]) for name in other.sample_names(split)]
        assert torch.equal(samples.tensors["tokens"], encode(texts, lookup, 8)), split


def fit_l2x(root: Path, *extra: str) -> None:
    from train import main

    main(["fit", "--config", str(REPO / "configs/l2x/imdb.yaml"), f"--data.init_args.root={root}",
          "--data.init_args.max_len=8", "--data.init_args.max_vocab=30", "--data.init_args.batch_size=4",
          "--model.init_args.model_kwargs.k=2", "--model.init_args.black_box_epochs=1",
          "--model.init_args.evaluator_epochs=1", "--trainer.logger.init_args.name=run",
          "--progress_bar.refresh_rate=0", *extra])


def test_predict_and_a_resumed_fit_read_new_reviews_with_the_checkpoint_words(
        imdb_roots: tuple[Path, Path], in_tmp_dir: Path) -> None:
    """predict of an L2X checkpoint with another folder (other training reviews, the same test reviews) gave other
    black-box predictions and selected words for the same review; now the same rows. A fit resumed on that folder
    goes on with the checkpoint's words and its black box and evaluator (none trained anew)."""
    from train import main

    fit_l2x(imdb_roots[0], "--trainer.max_epochs=1")
    run = in_tmp_dir / "checkpoints" / "run"
    checkpoint = run / "checkpoints" / "last.ckpt"
    words = torch.load(checkpoint, weights_only=True)["IMDBDataModule"]["vocabulary"]
    assert len(words) == 30 and "wonderful" in words
    trained = IMDBDataModule(imdb_roots[0], max_len=8, max_vocab=30)  # the run's data, as the config read it
    trained.setup()
    assert words == trained.vocabulary
    reviews = [(imdb_roots[0] / name).read_text() for name in trained.sample_names("test")]
    assert torch.equal(encode_texts(reviews, words, 8), trained.splits["test"].tensors["tokens"])  # new text, in Python
    predictions = {}
    for name, root in zip("ab", imdb_roots):
        main(["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={checkpoint}",
              f"--data.init_args.root={root}"])
        with (run / "predictions" / "predictions.csv").open() as handle:
            predictions[name] = list(csv.DictReader(handle))
    assert len(predictions["a"]) == 6 and predictions["b"] == predictions["a"]
    assert any(row["selected_words"] not in ("", "<unk> <unk>") for row in predictions["b"])

    helpers = sorted(path.name for path in (run / "auxiliary").glob("*.ckpt"))
    assert len(helpers) == 2  # the black box and the evaluator, trained once
    fit_l2x(imdb_roots[1], "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}")
    resumed = torch.load(checkpoint, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["IMDBDataModule"]["vocabulary"] == words
    assert sorted(path.name for path in (run / "auxiliary").glob("*.ckpt")) == helpers


def test_trainer_validate_with_ckpt_path_takes_the_checkpoint_words(tmp_path: Path) -> None:
    """The Python API: `trainer.validate(system, datamodule=<another seed>, ckpt_path=...)` encodes the validation
    rows with the checkpoint's words (a text CNN scored on ids that meant other words before); so does compare's
    load of a `checkpoint:` run (`load_system_weights` with the datamodule)."""
    import pytorch_lightning as pl

    from zoo.baselines.system import ClassifierSystem

    path = write_sentences(tmp_path / "rt.csv")
    settings = dict(label_column="category", labels=["rotten", "fresh"], max_len=8, max_vocab=20, batch_size=16)
    # the path as a string: a Path in the saved datamodule hyperparameters is no weights_only checkpoint
    trained, other = (CSVTextDataModule(str(path), seed=seed, **settings) for seed in (0, 1))

    def system(data: CSVTextDataModule) -> ClassifierSystem:
        return ClassifierSystem("baseline_textcnn", num_classes=2, in_chans=None, image_size=None,
                                data_inputs=data.model_inputs, input_key="tokens")

    def trainer() -> pl.Trainer:
        return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path))

    fitted = trainer()
    fitted.fit(system(trained), datamodule=trained)
    fitted.save_checkpoint(tmp_path / "model.ckpt")
    other.setup()
    assert other.vocabulary != trained.vocabulary
    trainer().validate(system(other), datamodule=other, ckpt_path=str(tmp_path / "model.ckpt"), verbose=False)
    assert other.vocabulary == trained.vocabulary
    lookup = {word: i for i, word in enumerate(trained.vocabulary) if i >= 2 and word}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    texts = [tokenize(rows[int(name.removeprefix("row "))]["text"]) for name in other.sample_names("val")]
    assert torch.equal(other.splits["val"].tensors["tokens"], encode(texts, lookup, 8))

    # compare's `checkpoint:` runs load weights without Lightning's restore: the datamodule's state comes with them
    from zoo.weights import load_system_weights

    third = CSVTextDataModule(str(path), seed=1, **settings)
    load_system_weights(system(third), tmp_path / "model.ckpt", third)
    third.setup("validate")
    assert third.vocabulary == trained.vocabulary
    assert torch.equal(third.splits["val"].tensors["tokens"], other.splits["val"].tensors["tokens"])


@pytest.mark.parametrize("bad_row", ['"a film with no label field"', '"a film with an empty label",'])
def test_rows_without_a_label_are_named_when_labels_are_read_from_the_table(tmp_path: Path, bad_row: str) -> None:
    """`labels: null` with a short row (csv gives None) crashed sorting the labels ("'<' not supported between
    instances of 'NoneType' and 'str'") naming neither file nor row; an empty label silently became class ''."""
    path = tmp_path / "rt.csv"
    path.write_text(f'text,category\n"a good film",fresh\n{bad_row}\n"a bad film",rotten\n{bad_row}\n')
    with pytest.raises(DatasetLayoutError, match=r"rt\.csv'.*2 row\(s\) have no label in column 'category': rows "
                                                 r"1, 3 \(counted from 0 after the header\)"):
        CSVTextDataModule(path, label_column="category", labels=None)
    assert CSVTextDataModule(path, label_column="category", labels=["rotten", "fresh"]).class_names == [
        "rotten", "fresh"]  # listed labels: such rows are dropped, as rows of other labels are


def test_typographic_apostrophes_read_as_the_ascii_one() -> None:
    """"I don’t" (U+2019) gave ['i', 'don', 't'] and "donʼt" (U+02BC) a word of its own, where "I don't" gives
    "don't"."""
    assert tokenize("I don\u2019t, it\u02bcs Ann\u2019s") == tokenize("I don't, it's Ann's") == [
        "i", "don't", "it's", "ann's"]


def test_a_checkpoint_from_before_the_state_reads_texts_as_they_were_read(tmp_path: Path) -> None:
    """A checkpoint without the datamodule's state (written before it was saved) was evaluated with texts read by the
    new tokenizer (’ an apostrophe: "don’t" one word, where the model learnt "don" + "t"), so its token ids moved
    silently (val/black_box_acc 0.850 -> 0.717 in the audit's run). Such a checkpoint reads them as then
    (tokenizer 1, the data's own vocabulary), through Lightning's restore and compare's `load_system_weights`."""
    import pytorch_lightning as pl

    from zoo.baselines.system import ClassifierSystem
    from zoo.weights import load_system_weights

    path = tmp_path / "rt.csv"
    generator = random.Random(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text"])
        for i in range(60):
            cue = generator.choice(["don’t like", "can’t stand"] if i % 2 else ["loved it", "great fun"])
            writer.writerow(["fresh" if i % 2 == 0 else "rotten", f"{cue} w{generator.randrange(20)}"])
    settings = dict(label_column="category", labels=["rotten", "fresh"], max_len=8, max_vocab=20, batch_size=16)
    data = CSVTextDataModule(str(path), **settings)
    system = ClassifierSystem("baseline_textcnn", num_classes=2, in_chans=None, image_size=None,
                              data_inputs=data.model_inputs, input_key="tokens")
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer = pl.Trainer(**options)
    trainer.fit(system, datamodule=data)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert checkpoint["CSVTextDataModule"]["tokenizer"] == 2 and "don't" in checkpoint["CSVTextDataModule"]["vocabulary"]
    del checkpoint["CSVTextDataModule"]  # as written before the datamodule saved its state
    torch.save(checkpoint, tmp_path / "old.ckpt")

    then = CSVTextDataModule(str(path), **settings)  # what the old code read: tokenizer 1
    then.tokenizer = 1
    then.setup()
    assert "don't" not in then.vocabulary and "don" in then.vocabulary
    for load in ("trainer", "compare"):
        other = CSVTextDataModule(str(path), **settings)
        if load == "trainer":
            pl.Trainer(**options).validate(system, datamodule=other, ckpt_path=str(tmp_path / "old.ckpt"),
                                            verbose=False)
        else:
            load_system_weights(system, tmp_path / "old.ckpt", other)
            other.setup("validate")
        assert other.tokenizer == 1 and other.vocabulary == then.vocabulary
        assert torch.equal(other.splits["val"].tensors["tokens"], then.splits["val"].tensors["tokens"])
    fresh = CSVTextDataModule(str(path), **settings)  # a new fit reads with the current tokenizer
    fresh.setup()
    assert fresh.tokenizer == 2 and "don't" in fresh.vocabulary


@pytest.mark.parametrize("max_vocab", [0, 1, 2, -5, 2.5, True])
def test_a_vocabulary_without_room_for_a_word_is_refused_when_built(imdb_root: Path, tmp_path: Path,
                                                                    max_vocab: object) -> None:
    """max_vocab <= 2 (or not a whole number) built a vocabulary of <pad> and <unk> alone: every word read as <unk>,
    and an L2X model trained on constant inputs with no error. Refused when built, naming the value and the minimum."""
    message = rf"max_vocab must be a whole number >= 3 \(<pad>, <unk> and at least one word\); got {max_vocab!r}"
    with pytest.raises(DataSettingError, match=rf"IMDBDataModule: {message}"):
        imdb(imdb_root, max_vocab=max_vocab)
    with pytest.raises(DataSettingError, match=rf"CSVTextDataModule: {message}"):
        CSVTextDataModule(write_sentences(tmp_path / "rt.csv", 12), text_column="text", label_column="category",
                          max_vocab=max_vocab)
    assert len(imdb(imdb_root, max_vocab=3).vocabulary) == 3  # the smallest: one word beside the two specials
