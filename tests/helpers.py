"""Test-only callbacks (importable by class_path from a subprocess run of train.py), writers of small datasets in
real release formats (IDX, CSV tables, torchvision weight files), and a two-process gloo harness for metrics."""

from __future__ import annotations

import bz2
import datetime
import gzip
import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class KillAtStep(pl.Callback):
    """SIGKILL this process after optimiser step `step`: no cleanup, no final checkpoint (a crashed node)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAtStep(pl.Callback):
    """Send this process SIGTERM after optimiser step `step` (a scheduler's preemption): Lightning stops the loops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def write_idx(path: Path, magic: int, array: torch.Tensor, *, gz: bool, count: int | None = None) -> None:
    """An IDX file as the MNIST releases write it: big-endian magic and dimensions, then the bytes."""
    header = struct.pack(f">I{array.dim()}I", magic, count if count is not None else len(array), *array.shape[1:])
    data = header + array.to(torch.uint8).numpy().tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_idx_set(root: Path, *, gz: bool, num_train: int = 40, num_test: int = 12) -> tuple[torch.Tensor, ...]:
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for split, count in (("train", num_train), ("t10k", num_test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator)
        labels = torch.arange(count) % 10
        write_idx(root / f"{split}-images-idx3-ubyte", 0x803, images, gz=gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", 0x801, labels, gz=gz)
        tensors += [images, labels]
    return tuple(tensors)


REVIEWS = [("fresh", "A wonderful, moving film."), ("rotten", "Dull and tedious."),
           ("plot", "A man walks, a dog barks."), ("fresh", "Wonderful acting; a moving story."),
           ("rotten", "Tedious, dull, far too long.")] * 8


def write_table(path: Path, rows: list[tuple[str, str]], delimiter: str, header: tuple[str, str] = ("category", "text")
                ) -> Path:
    lines = [delimiter.join(header)] + [delimiter.join((label, f'"{text}"')) for label, text in rows]
    data = ("\n".join(lines) + "\n").encode()
    opener = {".gz": gzip.compress, ".bz2": bz2.compress}.get(path.suffix, lambda raw: raw)
    path.write_bytes(opener(data))
    return path


def write_release_data(root: Path) -> None:
    """What `benchmarks/data/get_*.sh` put under `root/data/`, in the same formats and names but tiny: Fashion-MNIST
    IDX files (.gz), a randomly initialised torchvision mobilenet_v2 state dict under the ImageNet file's name, and
    the Rotten Tomatoes table (bz2 CSV, columns category, text). The real-data configs then run unchanged."""
    import torchvision

    write_idx_set(root / "data" / "fashion_mnist", gz=True)
    weights = root / "data" / "mobilenet_v2" / "mobilenet_v2-b0353104.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    table = root / "data" / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
    table.parent.mkdir(parents=True, exist_ok=True)
    write_table(table, REVIEWS, ",")


def _gloo_rank(rank: int, port: str, world: int, job: Callable[..., Any], shards: list[list[int]], args: tuple,
               folder: str, seed: int | None) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    torch.set_num_threads(1)
    if seed is not None:
        torch.manual_seed(seed)  # one global stream on every rank, as seed_everything gives
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        torch.save(job(shards[rank], *args), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gloo_ranks(tmp_path: Path, job: Callable[..., Any], shards: list[list[int]], *args: Any, deadline_s: float = 60.0,
               seed: int | None = None, start_method: str | None = None) -> list[Any]:
    """What `job(shards[rank], *args)` (a module-level function: it is pickled) returns on each of len(shards) gloo
    processes, each on one thread. Fails when the ranks have not finished by the deadline (a mismatched collective
    hangs; the processes are then killed). Forked where the platform can unless `start_method` says otherwise (a
    spawned rank spends seconds importing the zoo again)."""
    port = os.environ.get("MASTER_PORT", "29571")  # conftest's own_rendezvous_port: a free port per test
    method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    world = len(shards)
    context = mp.start_processes(_gloo_rank, args=(port, world, job, shards, args, str(tmp_path), seed), nprocs=world,
                                 join=False, start_method=method)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the ranks did not finish within {deadline_s:.0f} s (mismatched collectives hang)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
