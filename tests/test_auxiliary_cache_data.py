"""The cached helper models' key (zoo.engine.auxiliary.cache_key) reads what the datamodule's files and folders hold,
not only their paths: a re-fit into the same run folder after the data changed under the same path trains the
helpers again instead of loading ones trained on the old data."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from datamodules import CSVTextDataModule, ImageFolderDataModule
from losses.l2x import LabelCrossEntropy
from tests.conftest import REPO
from tests.helpers import REVIEWS, write_table
from zoo.engine.auxiliary import Auxiliary, cache_key

OTHER_REVIEWS = [("fresh", "Superb, a joy from start to end."), ("rotten", "Awful; I left early."),
                 ("fresh", "Great cast and a great script."), ("rotten", "Bad, slow and tedious.")] * 10


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_table(path, rows, ",")


def black_box() -> tuple[Auxiliary, nn.Module]:
    return Auxiliary("black_box", loss=LabelCrossEntropy("tokens", "label"), epochs=1), nn.Linear(4, 2)


def test_a_rewritten_csv_under_the_same_path_changes_the_key(in_tmp_dir: Path) -> None:
    aux, net = black_box()
    table = write_csv(in_tmp_dir / "data" / "my.csv", REVIEWS)

    def key() -> str:  # a relative path, read from the working folder as the datamodule reads it
        return cache_key(aux, net, CSVTextDataModule("data/my.csv", labels=["rotten", "fresh"]))

    first = key()
    mtime = table.stat().st_mtime_ns
    write_csv(table, REVIEWS)  # the same rows written again: the same contents, the same key
    os.utime(table, ns=(mtime + 10**9, mtime + 10**9))
    assert key() == first
    write_csv(table, OTHER_REVIEWS)
    assert key() != first


def test_a_file_added_to_a_data_folder_changes_the_key(image_folder_root: Path) -> None:
    aux, net = black_box()
    first = cache_key(aux, net, ImageFolderDataModule(str(image_folder_root), image_size=32))
    assert cache_key(aux, net, ImageFolderDataModule(str(image_folder_root), image_size=32)) == first
    (image_folder_root / "train" / "cat" / "extra.png").write_bytes(
        (next((image_folder_root / "train" / "cat").glob("*.png"))).read_bytes())
    assert cache_key(aux, net, ImageFolderDataModule(str(image_folder_root), image_size=32)) != first


def test_a_data_folder_holding_the_run_folder_is_not_fingerprinted(image_folder_root: Path) -> None:
    """The cache is written in the run folder: a data folder holding it would change its key at every fit."""
    aux, net = black_box()
    data = ImageFolderDataModule(str(image_folder_root), image_size=32)
    outputs = image_folder_root / "checkpoints" / "run"
    first = cache_key(aux, net, data, outputs)
    (outputs / "auxiliary").mkdir(parents=True)
    (outputs / "auxiliary" / "black_box-0123456789.ckpt").write_bytes(b"weights")
    assert cache_key(aux, net, data, outputs) == first


def test_ablate_still_names_the_fingerprints() -> None:
    from zoo import fingerprints
    from zoo.cli.ablate import file_fingerprint, folder_fingerprint

    assert file_fingerprint is fingerprints.file_fingerprint and folder_fingerprint is fingerprints.folder_fingerprint


def test_a_refit_after_the_csv_changed_trains_the_helpers_again(in_tmp_dir: Path) -> None:
    """configs/l2x/rotten_tomatoes.yaml on data/my.csv, fitted twice into the same run folder (`version: ""`): the
    second fit, after my.csv was rewritten with other rows, trains a black box and an evaluator of its own."""
    from train import main

    table = write_csv(in_tmp_dir / "data" / "my.csv", REVIEWS)
    args = ["fit", "--config", str(REPO / "configs/l2x/rotten_tomatoes.yaml"), "--data.init_args.path=data/my.csv",
            "--data.init_args.max_len=16", "--data.init_args.max_vocab=64", "--trainer.logger.init_args.name=cache",
            "--model.init_args.black_box_epochs=1", "--model.init_args.evaluator_epochs=1",
            "--trainer.max_epochs=1", "--trainer.accelerator=cpu"]
    cache = in_tmp_dir / "checkpoints" / "cache" / "auxiliary"
    main(args)
    assert len(list(cache.glob("black_box-*.ckpt"))) == 1 and len(list(cache.glob("evaluator-*.ckpt"))) == 1
    write_csv(table, OTHER_REVIEWS)
    main(args)
    assert len(list(cache.glob("black_box-*.ckpt"))) == 2 and len(list(cache.glob("evaluator-*.ckpt"))) == 2
