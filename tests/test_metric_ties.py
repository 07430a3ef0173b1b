"""Ties and empty ranks in the L2X and ICNN metrics: a metric's value depends on the samples, not on the process or
batch they came in. Two gloo processes on the CPU (torch.multiprocessing), each evaluating its own shard as an
unrepeated evaluation sampler gives it, are compared with one process on all the data; every spawn has a deadline,
so a hung collective fails the test instead of blocking the run.

Before: `MedianRank` broke ties with the global random stream (here 7.5 on 2 processes, 8.0 on one, and validation
consumed the training stream); `LocationInstability` with top_n below a category's image count took the tied (zero)
peaks of a dead filter in arrival order (0.13933 on 2 processes, 0.13986 on one); `LocationInstability` and `PartIoU`
aborted the gather ("Received data size doesn't match expected size") when a rank had no image."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import gloo_ranks
from zoo.icnn.metrics import LocationInstability, PartIoU
from zoo.l2x.metrics import MedianRank

N, BATCH, WORLD = 31, 4, 2
DEADLINE_S = 45.0  # both ranks together; a run takes a few seconds, a mismatched collective hangs until killed


def make_data(n: int) -> dict[str, torch.Tensor]:
    """n samples: ICNN maps (n, 6, 4, 4) whose filter 0 is dead (all peaks tie at 0), landmarks, visibility, 3
    classes, part masks; L2X scores (n, 10) whose last 5 features tie at 0, true features 5 and 6 among them."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(n, 6, 4, 4, generator=g)
    maps[:, 0] = 0.0
    scores = torch.randn(n, 10, generator=g)
    scores[:, 5:] = 0.0
    relevant = torch.zeros(n, 10, dtype=torch.bool)
    relevant[:, [5, 6]] = True
    return {"maps": maps, "landmarks": torch.rand(n, 3, 2, generator=g) * 32,
            "visible": torch.rand(n, 3, generator=g) > 0.2, "labels": torch.arange(n) % 3,
            "part_masks": torch.rand(n, 3, 16, 16, generator=g) > 0.7,
            "part_types": torch.randint(0, 5, (n, 3), generator=g), "scores": scores, "relevant": relevant}


def evaluate(order: list[int], batch: int = BATCH) -> dict[str, float]:
    """Every metric over the samples `order` lists, in batches of `batch`."""
    data = make_data(N)
    metrics = {"median_rank": MedianRank(), "instability_top4": LocationInstability(32, top_n=4),
               "instability": LocationInstability(32),
               "part_iou": PartIoU(num_parts=5, quantile=0.2, iou_threshold=0.1)}
    for i in range(0, len(order), batch):
        rows = torch.tensor(order[i:i + batch])
        metrics["median_rank"].update(data["scores"][rows], data["relevant"][rows])
        for name in ("instability_top4", "instability"):
            metrics[name].update(data["maps"][rows], data["landmarks"][rows], data["visible"][rows],
                                 data["labels"][rows])
        metrics["part_iou"].update(data["maps"][rows], data["part_masks"][rows], data["part_types"][rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rank without a batch: torchmetrics warns compute() came before update()
        values = {name: float(metric.compute()) for name, metric in metrics.items()}
    with metrics["part_iou"].sync_context(should_sync=dist.is_initialized()):  # as ICNNSystem.filter_part_scores
        values["part_scores"] = float(metrics["part_iou"].part_scores().sum())
    return values


def two_processes(tmp_path: Path, shards: list[list[int]]) -> list[dict[str, float]]:
    """Each rank's synchronised values, evaluating shards[rank] (`tests.helpers.gloo_ranks`, spawned ranks; one
    global stream on every rank, as seed_everything gives)."""
    return gloo_ranks(tmp_path, evaluate, shards, deadline_s=DEADLINE_S, seed=7, start_method="spawn")


def one_process(order: list[int], batch: int = BATCH) -> dict[str, float]:
    torch.manual_seed(7)
    return evaluate(order, batch)


def test_two_processes_break_ties_as_one(tmp_path: Path) -> None:
    """Lightning's UnrepeatedDistributedSampler on 31 samples (rank 0: 0, 2, ..., 30; rank 1: 1, 3, ..., 29): the
    median rank over tied scores and the top-4 instability over a dead filter's tied peaks are one process's."""
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    shards = [list(UnrepeatedDistributedSampler(range(N), num_replicas=WORLD, rank=r, shuffle=False))
              for r in range(WORLD)]
    one = one_process(list(range(N)))
    for values in two_processes(tmp_path, shards):
        assert values == pytest.approx(one, rel=1e-6, abs=1e-9), (values, one)


def test_a_rank_without_images_syncs(tmp_path: Path) -> None:
    """Rank 1 evaluates nothing (fewer batches than ranks): its empty "cat" states join the gather, and both ranks
    get one process's values on rank 0's samples."""
    ranks = two_processes(tmp_path, [list(range(12)), []])
    one = one_process(list(range(12)))
    for values in ranks:
        assert values == pytest.approx(one, rel=1e-6, abs=1e-9), (values, one)


def test_median_rank_ties_ignore_batches_and_the_global_stream() -> None:
    """A sample's tie order is a function of its scores: alone or among others, in any order, the same median
    rank; the global random stream is left as it was (before, validation drew from the training stream)."""
    data = make_data(N)
    state = torch.get_rng_state()
    metric = MedianRank()
    metric.update(data["scores"], data["relevant"])
    assert torch.get_rng_state().equal(state)
    single = MedianRank()
    single.update(data["scores"][3:4], data["relevant"][3:4])
    assert single.values().tolist() == metric.values()[3:4].tolist()
    shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    reordered = MedianRank()
    for rows in shuffled.split(5):
        reordered.update(data["scores"][rows], data["relevant"][rows])
    assert reordered.values().tolist() == metric.values()[shuffled].tolist()


def test_location_instability_ties_ignore_arrival_order() -> None:
    """One process fed the samples in another order and other batches (as a gather across ranks interleaves them):
    the dead filter's tied peaks give the same top-4 instability."""
    shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
    arrived, in_order = one_process(shuffled, batch=5), one_process(list(range(N)))
    assert arrived["instability_top4"] == pytest.approx(in_order["instability_top4"], rel=1e-6)
    assert arrived == pytest.approx(in_order, rel=1e-6, abs=1e-9)


def test_the_random_reference_maps_are_uniform() -> None:
    """keyed_normal XOR-ed the hash of a sample's key with the hash of each position's counter: wherever the key was
    2 x counter the two cancelled, one value per map was a 6.8-sigma outlier, and the `random` reference map's peak
    sat at pixel key // 2 in 17 % of maps (22 % of peaks in the top 4 of 64 rows, against 6.25 % for uniform maps)."""
    from zoo.explain.scores import random_maps
    from zoo.hashing import keyed_normal

    keys = torch.arange(512)
    peaks = random_maps(keys, (64, 64)).flatten(1).argmax(1)  # (512,)
    assert (peaks == keys // 2).sum() <= 2  # 0.125 expected for uniform maps
    assert (peaks < 4 * 64).float().mean() < 0.10  # the top 4 rows: 6.25 % expected
    assert keyed_normal(keys, (64, 64)).abs().max() < 5.5  # 2M draws: no structured outlier
