"""Real-data support, tested on fixtures only (CI has no real data): torchvision ImageNet checkpoints as
backbones with a load report, the IDX image datamodule and the CSV/TSV sentence datamodule."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import zoo
from datamodules import CSVTextDataModule, DatasetLayoutError, IDXDataModule, PartsWorldDataModule
from zoo import CheckpointError
from zoo.explain.captum import FEATURE_METHODS, TokenPresence, attribute_features
from tests.helpers import REVIEWS, write_idx, write_idx_set, write_table


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised torchvision mobilenet_v2() state dict, as torchvision's ImageNet file is laid out."""
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v2().state_dict()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name", ["icnn_timm", "baseline_timm"])
def test_torchvision_checkpoint_loads_every_backbone_tensor_and_reports(
    name: str, mobilenet_file: tuple[Path, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    path, state = mobilenet_file
    with caplog.at_level(logging.INFO, logger="zoo.weights"):
        model = zoo.create_model(name, backbone="torchvision:mobilenet_v2", num_classes=4, pretrained_path=str(path))
    body = model.backbone.body.state_dict()
    backbone_keys = [k for k in state if k.startswith("features.")]
    assert sorted(body) == sorted(backbone_keys)
    assert all(torch.equal(body[k], state[k]) for k in backbone_keys)
    report = model.backbone.load_report
    assert len(report.loaded) == len(backbone_keys) == 312
    assert report.skipped == ["classifier.1.weight", "classifier.1.bias"]
    assert "head.fc.weight" in report.new and not any(k.startswith("backbone.") for k in report.new)
    if name == "icnn_timm":
        assert "added_conv.weight" in report.new and "top_filters.log_mean_z" in report.new
    assert "loaded 312 backbone tensors; skipped 2 [classifier.1.weight, classifier.1.bias]; new" in caplog.text


def test_torchvision_backbone_maps_channels_and_reductions() -> None:
    backbone = zoo.Backbone("torchvision:mobilenet_v2", out_indices=(2, 3, 4))
    maps = backbone(torch.rand(2, 3, 64, 64))
    assert backbone.channels == [m.shape[1] for m in maps] == [32, 96, 1280]
    assert backbone.reductions == [64 // m.shape[-1] for m in maps] == [8, 16, 32]


def test_torchvision_checkpoint_with_a_wrong_shape_is_refused(
    mobilenet_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = mobilenet_file
    broken = {**state, "features.18.0.weight": torch.zeros(1000, 320, 1, 1)}
    torch.save(broken, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'torchvision:mobilenet_v2': "
                                              r"shape mismatches \['features.18.0.weight: file \(1000, 320, 1, 1\) "
                                              r"vs model \(1280, 320, 1, 1\)'\]"):
        zoo.create_model("icnn_timm", backbone="torchvision:mobilenet_v2", pretrained_path=str(tmp_path / "wrong.pth"))
    del broken["features.18.0.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['features.18.0.weight'\]"):
        zoo.create_model("baseline_timm", backbone="torchvision:mobilenet_v2",
                         pretrained_path=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name, message", [("torchvision:mobilenet_v9", "Unknown torchvision model 'mobilenet_v9'. "
                                            "Did you mean: mobilenet_v2"),
                                           ("torchvision:resnet18", "has no `features` Sequential body")])
def test_torchvision_backbone_names_are_checked(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zoo.Backbone(name)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_datamodule_reads_resizes_replicates_and_normalises(tmp_path: Path, gz: bool) -> None:
    train_images, train_labels, test_images, test_labels = write_idx_set(tmp_path, gz=gz)
    data = IDXDataModule(tmp_path, image_size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                         num_train=20, num_val=8, batch_size=4)
    data.setup("fit")
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [20, 8, 12]
    assert data.num_classes == 10 and data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    sample = data.split_samples("test")[3]
    grey = F.interpolate(test_images[3].float()[None, None] / 255, size=(32, 32), mode="bilinear")[0, 0]
    assert sample["image"].shape == (3, 32, 32) and sample["label"] == test_labels[3]
    for channel, (mean, std) in enumerate(zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])):
        torch.testing.assert_close(sample["image"][channel], (grey - mean) / std)
    torch.testing.assert_close(data.denormalize(sample["image"][None])[0], grey.expand(3, -1, -1))  # for pictures
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.long
    train_ids = {int(data.splits["train"].images[i].sum()) for i in range(20)}
    val_ids = {int(data.splits["val"].images[i].sum()) for i in range(8)}
    assert not train_ids & val_ids  # validation images are set apart from the training subset


def test_idx_datamodule_takes_the_torchvision_backbones_imagenet_normalisation(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    data = IDXDataModule(tmp_path, image_size=28, mean="pretrained", num_val=4)
    data.use_pretrained_normalization("torchvision:mobilenet_v2")  # what train.py does for `mean: pretrained`
    assert (data.mean, data.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    normalised = data.split_samples("test")[0]["image"]
    raw = data.splits["test"][0]["image"]
    torch.testing.assert_close(normalised[2], (raw[2] - 0.406) / 0.225)


def test_idx_datamodule_class_names_and_native_size(tmp_path: Path) -> None:
    _, _, test_images, _ = write_idx_set(tmp_path, gz=True)
    digits = IDXDataModule(tmp_path, dataset="mnist", image_size=28, num_val=4)
    digits.setup()
    assert digits.class_names == [str(d) for d in range(10)]
    torch.testing.assert_close(digits.splits["test"][0]["image"][1], test_images[0].float() / 255)
    named = IDXDataModule(tmp_path, class_names=[f"c{i}" for i in range(12)], num_val=4)
    assert named.num_classes == 12
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        IDXDataModule(tmp_path, dataset="cifar")


def test_idx_layout_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        IDXDataModule(tmp_path / "nowhere").setup()
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetLayoutError, match=r"Neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte.gz"):
        IDXDataModule(tmp_path, num_val=4).setup()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x803, torch.zeros(12), gz=False)  # an images magic on labels
    with pytest.raises(DatasetLayoutError, match="bad magic number 0x00000803, expected 0x00000801"):
        IDXDataModule(tmp_path, num_val=4).setup()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, torch.zeros(12), gz=False, count=13)
    with pytest.raises(DatasetLayoutError, match=r"announces 13 items .* but the file holds 20 bytes"):
        IDXDataModule(tmp_path, num_val=4).setup()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, torch.zeros(11), gz=False)
    with pytest.raises(DatasetLayoutError, match="t10k: 12 images but 11 labels"):
        IDXDataModule(tmp_path, num_val=4).setup()
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetLayoutError, match="is not a readable gzip file"):
        IDXDataModule(tmp_path, num_val=4).setup()


def test_a_missing_idx_root_or_release_file_is_refused_when_built(tmp_path: Path) -> None:
    """Checked only at setup, a mistyped root failed after `fit` had moved the earlier run to stale/; now at
    construction, as CUB's and VOC's roots are. The files are looked up there, not read (a broken one: at setup)."""
    with pytest.raises(DatasetLayoutError, match=r"IDX root '.*fashion_mnst' is not a folder"):
        IDXDataModule(tmp_path / "fashion_mnst")
    write_idx_set(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"Neither train-labels-idx1-ubyte nor train-labels-idx1-ubyte.gz "
                                                 r"is in '.*'"):
        IDXDataModule(tmp_path, num_val=4)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"not read until setup")  # extracted: found, not read
    data = IDXDataModule(tmp_path, num_val=4)
    with pytest.raises(DatasetLayoutError, match="bad magic number"):
        data.setup()


def test_fit_with_a_mistyped_idx_root_leaves_the_earlier_run_in_place(in_tmp_dir: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The README's Fashion-MNIST config with a one-letter typo in the root: the earlier run's checkpoints and
    config.yaml were moved to stale/ before the data failed at setup, and `test --config <run>/config.yaml` found
    nothing."""
    from tests.conftest import REPO
    from tests.test_compare_ablate import said_once

    run = in_tmp_dir / "checkpoints" / "baselines_fashion_mnist_mobilenet"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {}\n")
    (run / "checkpoints" / "last.ckpt").write_text("earlier run\n")
    error = said_once(capsys, ["fit", "--config", str(REPO / "configs/baselines/fashion_mnist_mobilenet.yaml"),
                               "--model.init_args.model_kwargs.pretrained_path=null",
                               "--data.init_args.root=data/fashion_mnst", "--trainer.max_epochs=1"])
    assert "IDX root 'data/fashion_mnst' is not a folder" in error, error
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"], error
    assert not (run.parent / "stale").exists(), error


def test_a_data_setting_the_data_cannot_meet_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Found only when the data is read (at setup, inside the fit): still a configuration error, said once."""
    from datamodules import DataSettingError
    from zoo.cli.errors import command_line

    write_idx_set(tmp_path, gz=False)
    with pytest.raises(DataSettingError, match="num_val=2000 leaves no training images out of"):
        IDXDataModule(tmp_path, num_val=2000).setup()

    def setup_in_a_run(_: object) -> None:
        IDXDataModule(tmp_path, num_val=2000).setup()

    with pytest.raises(SystemExit) as exited:
        command_line(setup_in_a_run, [])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in error
    assert error.startswith("train.py: error: num_val=2000 leaves no training images out of")


@pytest.mark.parametrize("name, delimiter",
                         [("rt.csv", ","), ("rt.tsv", "\t"), ("rt.csv.bz2", ","), ("rt.tsv.gz", "\t")])
def test_csv_text_datamodule_keeps_listed_labels_and_builds_vocabulary_from_train(tmp_path: Path, name: str,
                                                                                 delimiter: str) -> None:
    path = write_table(tmp_path / name, REVIEWS, delimiter)
    data = CSVTextDataModule(path, label_column="category", labels=["rotten", "fresh"], max_len=6, max_vocab=30,
                             val_fraction=0.25, test_fraction=0.25, batch_size=4)
    assert data.num_classes == 2 and data.class_names == ["rotten", "fresh"]
    data.setup()
    assert sum(len(data.splits[s]) for s in ("train", "val", "test")) == 32  # the 8 "plot" rows are dropped
    assert [len(data.splits[s]) for s in ("val", "test")] == [8, 8]
    train = data.splits["train"].tensors
    train_words = {data.vocabulary[t] for t in train["tokens"].flatten().tolist() if t > 1}
    assert {w for w in data.vocabulary[2:] if w} == train_words  # the vocabulary is the training split's words
    assert "barks" not in data.vocabulary and data.model_inputs == {"vocab_size": 30, "max_len": 6}
    for tokens, label in zip(train["tokens"], train["label"]):
        text = data.decode(tokens)
        assert text in ("a wonderful moving film", "dull and tedious", "wonderful acting a moving story",
                        "tedious dull far too long")
        assert label == (1 if "wonderful" in text else 0)
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == (4, 6) and batch["tokens"].dtype == torch.long


def test_csv_text_datamodule_reads_every_label_without_a_list(tmp_path: Path) -> None:
    data = CSVTextDataModule(write_table(tmp_path / "rt.csv", REVIEWS, ","), label_column="category")
    assert data.class_names == ["fresh", "plot", "rotten"] and data.num_classes == 3


def test_csv_text_datamodule_errors_name_columns_labels_and_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        CSVTextDataModule(tmp_path / "none.csv", labels=["a", "b"]).setup()
    path = write_table(tmp_path / "rt.csv", REVIEWS, ",")
    with pytest.raises(DatasetLayoutError, match=r"has no column \['label'\]; its columns are \['category', 'text'\]"):
        CSVTextDataModule(path, labels=["fresh", "rotten"]).setup()
    with pytest.raises(DatasetLayoutError, match=r"has no column \['review'\]"):
        CSVTextDataModule(path, text_column="review", label_column="category")
    with pytest.raises(ValueError, match=r"no row has label \['positive'\] in column 'category'; its labels are "
                                         r"\['fresh', 'plot', 'rotten'\]"):
        CSVTextDataModule(path, label_column="category", labels=["positive", "fresh"]).setup()
    (tmp_path / "rt.json").write_text("{}")
    with pytest.raises(DatasetLayoutError, match="neither .csv nor .tsv"):
        CSVTextDataModule(tmp_path / "rt.json", labels=["a", "b"]).setup()
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetLayoutError, match="Could not read .*broken.csv.gz"):
        CSVTextDataModule(tmp_path / "broken.csv.gz", labels=["a", "b"]).setup()



@pytest.mark.parametrize("labels", [["rotten", "fresh"], None])
def test_a_missing_or_unknown_text_table_is_refused_when_built(tmp_path: Path, labels: list[str] | None) -> None:
    """With `labels` listed the file was first looked at in setup: a mistyped path failed after `fit` had moved the
    earlier run to stale/. Now, whatever `labels` is, at construction (as IMDB's root is)."""
    with pytest.raises(DatasetLayoutError, match=r"Text table '.*nope.csv' does not exist"):
        CSVTextDataModule(tmp_path / "nope.csv", labels=labels)
    (tmp_path / "rt.json").write_text("{}")
    with pytest.raises(DatasetLayoutError, match=r"rt.json' is neither .csv nor .tsv \(optionally .gz / .bz2\)"):
        CSVTextDataModule(tmp_path / "rt.json", labels=labels)


@pytest.mark.parametrize("name", ["excel.csv", "excel.csv.gz"])
def test_csv_text_datamodule_reads_a_byte_order_mark(tmp_path: Path, name: str) -> None:
    """Excel's "CSV UTF-8" export starts with a byte-order mark, which must not stick to the first column's name."""
    plain = write_table(tmp_path / "plain.csv", REVIEWS, ",", header=("label", "text")).read_bytes()
    data = b"\xef\xbb\xbf" + plain
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    module = CSVTextDataModule(tmp_path / name, labels=["rotten", "fresh"], max_len=6, max_vocab=30)
    module.setup()
    assert module.class_names == ["rotten", "fresh"] and sum(len(s) for s in module.splits.values()) == 32


def test_csv_text_datamodule_names_an_empty_training_split(tmp_path: Path) -> None:
    path = write_table(tmp_path / "two.csv", REVIEWS[:2], ",", header=("label", "text"))
    module = CSVTextDataModule(path, max_len=6, max_vocab=30)
    with pytest.raises(ValueError, match=r"CSVTextDataModule: the 'train' split has no samples; it holds the rows of "
                                         r"'.*two.csv' with a listed label left after val_fraction=0.1, "
                                         r"test_fraction=0.1 \(one row each at least\). Split sizes: "
                                         r"\{'val': 1, 'test': 1, 'train': 0\}"):
        module.train_dataloader()

def test_captum_methods_explain_token_positions_through_presence() -> None:
    """Every Captum feature method scores (B, L) token positions of a text classifier; presence 1 is the text as it
    is, presence 0 the padding embedding (what L2X's masking gives), and padding positions score 0."""
    torch.manual_seed(0)
    model = zoo.create_model("baseline_textcnn", vocab_size=40, max_len=10).eval()
    tokens = torch.randint(2, 40, (3, 10))
    tokens[:, 7:] = 0
    presence = TokenPresence(model, tokens)
    torch.testing.assert_close(presence(torch.ones(3, 10)), model(tokens)["logits"])
    dropped = torch.ones(3, 10)
    dropped[:, 2] = 0
    torch.testing.assert_close(presence(dropped), model(tokens.index_fill(1, torch.tensor([2]), 0))["logits"])
    target = torch.tensor([0, 1, 0])
    for method in FEATURE_METHODS:
        scores = torch.cat([attribute_features(model, tokens[i:i + 1], target[i:i + 1], method) for i in range(3)])
        assert scores.shape == (3, 10) and (scores[:, 7:] == 0).all() and (scores[:, :7] > 0).any(), method
    with pytest.raises(ValueError, match="has no nn.Embedding"):
        TokenPresence(torch.nn.Linear(10, 2), tokens)


def test_l2x_race_runs_on_sentences_from_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race's sentence task: L2X and every Captum method on the same sentences, and the page of kept words."""
    from benchmarks.l2x_race import race_task

    path = write_table(tmp_path / "rt.csv.bz2", REVIEWS, ",")
    monkeypatch.chdir(tmp_path)
    settings = {"text_data": {"rt": {"path": str(path), "label_column": "category", "labels": ["rotten", "fresh"],
                                     "max_len": 8, "max_vocab": 40, "batch_size": 8, "k": 2}},
                "black_box_epochs": 1, "evaluator_epochs": 1, "epochs": 1, "num_explained": 4,
                "num_explained_perturbation": 2, "repeats": 1, "device": torch.device("cpu"), "words_shown": 2}
    rows, _ = race_task("race", "rt", settings, ["l2x", "invase", *FEATURE_METHODS, "lime:20", "random"])
    assert [row["method"] for row in rows] == ["l2x", *FEATURE_METHODS, "lime:20", "random"]  # INVASE: no text model
    assert all(row["num_selected"] == 2 and 0 <= row["posthoc_acc"] <= 1 and "evalx_acc" in row for row in rows)
    assert "samples_per_s" not in rows[-1] and all(row["samples_per_s"] > 0 for row in rows[:-1])
    page = (tmp_path / "checkpoints/race/rt/selected_words.md").read_text()
    assert "- l2x: " in page and "- lime: " in page and "| l2x | fresh |" in page


def test_parts_world_with_shared_part_types_differs_only_in_layout() -> None:
    """The harder classification world: every class has the same part types; classes differ in where they sit."""
    data = PartsWorldDataModule(num_classes=12, shared_part_types=True, num_train=24, num_val=12, num_test=12)
    types, slots = data.world.part_types, data.world.slots  # (C, P) each
    assert all(sorted(row.tolist()) == sorted(types[0].tolist()) for row in types)
    layouts = {tuple(sorted(zip(t.tolist(), s.tolist()))) for t, s in zip(types, slots)}
    assert len(layouts) == 12
    data.setup()
    batch = data.splits["train"].tensors
    assert (batch["part_types"] == types[batch["label"]]).all()
    default = PartsWorldDataModule(num_classes=12, num_train=24, num_val=12, num_test=12)
    assert len({tuple(sorted(row.tolist())) for row in default.world.part_types}) > 1
