"""Two-process CPU predict: predictions.csv holds every sample once, in order, as a one-process predict writes it.

Each rank predicted its own share and only rank zero wrote its rows: 37 samples gave a CSV of 19 (indices 0, 2, 4, ...)
with no warning."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from datamodules import PartsWorldDataModule
from tests.test_ddp import two_process_trainer
from zoo.baselines.system import ClassifierSystem
from zoo.cli.predict import CSV_NAME, PredictionWriter
from zoo.distributed import end_spawned_process_group


def read_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / CSV_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_process_predict_writes_every_sample_once(tmp_path: Path) -> None:
    pl.seed_everything(0)
    data = PartsWorldDataModule(num_train=16, num_val=8, num_test=37, batch_size=8)  # 37: ranks of 19 and 18
    system = ClassifierSystem("baseline_tinycnn", num_classes=data.num_classes, class_names=data.class_names)
    trainer = two_process_trainer(tmp_path, PredictionWriter(max_pictures=5))
    trainer.predict(system, datamodule=data, return_predictions=False)
    folder = tmp_path / "predictions"
    rows = read_rows(folder)
    assert [int(row["index"]) for row in rows] == list(range(37))
    data.setup("predict")
    test = data.splits["test"]
    images = torch.stack([test[i]["image"] for i in range(37)])  # (37, C, H, W)
    labels = torch.stack([test[i]["label"] for i in range(37)])  # (37,)
    system.eval()
    with torch.no_grad():
        probs = system(images)["logits"].softmax(-1)  # (37, K)
    assert [int(row["pred"]) for row in rows] == probs.argmax(-1).tolist()
    assert [int(row["label"]) for row in rows] == labels.tolist()
    expected = probs.max(-1).values
    assert torch.allclose(torch.tensor([float(row["probability"]) for row in rows]), expected, atol=6e-5)
    # max_pictures is the total: the first 5 samples' pictures, 3 drawn by rank zero (0, 2, 4) and 2 by rank one
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(5)]


class RowsPerSample(pl.LightningModule):
    """A detector-like predict_step: sample i gets i % 3 rows (none: the writer's one row of index and file)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)  # DDP wraps a module with parameters only

    def teardown(self, stage: str) -> None:  # as ZooSystem's: a spawned rank ends its gloo group (else SIGABRT)
        end_spawned_process_group(self.trainer)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        index = batch["index"]  # (B,)
        return {"index": index, "rows": [[{"object": k, "rank": self.global_rank} for k in range(int(i) % 3)]
                                         for i in index]}


def test_two_process_predict_gathers_rows_of_each_sample(tmp_path: Path) -> None:
    data = PartsWorldDataModule(num_train=16, num_val=8, num_test=11, batch_size=4)
    trainer = two_process_trainer(tmp_path, PredictionWriter(max_pictures=0))
    trainer.predict(RowsPerSample(), datamodule=data, return_predictions=False)
    rows = read_rows(tmp_path / "predictions")
    expected = [(i, str(k)) for i in range(11) for k in (range(i % 3) if i % 3 else [""])]
    assert [(int(row["index"]), row["object"]) for row in rows] == expected
    assert {row["rank"] for row in rows if row["rank"]} == {"0", "1"}  # both ranks' rows
