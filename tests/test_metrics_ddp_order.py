"""Metrics that must give one process's values on two gloo processes (torch.multiprocessing on the CPU), each rank
evaluating the shard an evaluation sampler gives it:

- `DetectionAP`'s VOC mAP@0.5 (the detector's checkpoint monitor) ranks detections of equal score in the order of
  their images in the dataset (the targets' "index"). It ranked them in arrival order, which after a DDP gather is
  rank-major (rank 0's images 0, 2, 4, ..., then rank 1's 1, 3, 5, ...): with a true and a false positive both
  scored 1.0, 0.8418 on two processes against 0.6868 on one. Ties are common: softmax scores saturate to 1.0 in
  float32, and bf16 keeps 8 bits of a score.
- `ConceptAUROC` keeps (n, K) "cat" states: a rank without samples gathered torchmetrics' 1-D stand-in against the
  others' (n, K) and the gather aborted (gloo: "Received data size doesn't match expected size"), in compute() and
  in `CBMSystem.concept_table`'s `sync_context`; and `concept_table` skipped the gather on a rank whose metrics had
  no update while the other ranks entered it (a hang).

Every spawn has a deadline: a hang fails the test instead of blocking the run."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import gloo_ranks
from zoo.aog_rcnn.metrics import DetectionAP
from zoo.cbm.metrics import ConceptAUROC

WORLD, BATCH = 2, 4
DEADLINE_S = 20.0  # both ranks together; a run takes a few seconds, a mismatched collective hangs until killed


def unrepeated_shards(n: int) -> list[list[int]]:
    """What Lightning's UnrepeatedDistributedSampler (the evaluation sampler under DDP) gives each rank: rank 0
    images 0, 2, 4, ..., rank 1 images 1, 3, 5, ..."""
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    return [list(UnrepeatedDistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=False))
            for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------ DetectionAP
def tied_detections(images: list[int], bf16: bool) -> tuple[list[dict[str, torch.Tensor]],
                                                             list[dict[str, torch.Tensor]]]:
    """One class-1 object per image. float32: even images a true positive scored 1.0, odd images a false positive
    (far from the object) scored 1.0 and a true positive scored 0.5, so the ranking of the 1.0 ties decides the AP.
    bf16: three detections per image, the first a hit on 60% of the images, scores sigmoids rounded to bf16
    (many ties), as a bf16-true run gives them. Each target carries its image's dataset "index"."""
    g = torch.Generator().manual_seed(1)
    scores = torch.sigmoid(torch.randn(64, 3, generator=g) * 4 + 2).to(torch.bfloat16).float()  # (64, 3)
    hit = torch.rand(64, generator=g) > 0.4  # (64,)
    box, far = torch.tensor([10.0, 10.0, 50.0, 50.0]), torch.tensor([100.0, 100.0, 140.0, 140.0])
    detections, targets = [], []
    for i in images:
        if bf16:
            boxes = torch.stack([box if hit[i] else far, far + 5, far + 10])  # (3, 4)
            detections.append({"boxes": boxes, "scores": scores[i], "labels": torch.ones(3, dtype=torch.long)})
        elif i % 2 == 0:
            detections.append({"boxes": box[None], "scores": torch.tensor([1.0]), "labels": torch.tensor([1])})
        else:
            detections.append({"boxes": torch.stack([far, box]), "scores": torch.tensor([1.0, 0.5]),
                               "labels": torch.tensor([1, 1])})
        targets.append({"boxes": box[None], "labels": torch.tensor([1]), "index": torch.tensor(i)})
    return detections, targets


def detection_ap(images: list[int]) -> dict[str, float]:
    """map_50 and map of the float32 and the bf16 tied detections of `images`, in batches of BATCH."""
    values = {}
    for bf16 in (False, True):
        metric = DetectionAP()
        detections, targets = tied_detections(images, bf16)
        for i in range(0, len(images), BATCH):
            metric.update(detections[i:i + BATCH], targets[i:i + BATCH])
        values |= {f"{'bf16' if bf16 else 'float32'}/{k}": float(v) for k, v in metric.compute().items()}
    return values


def test_detection_ap_ranks_tied_scores_in_dataset_order_on_two_processes(tmp_path: Path) -> None:
    """31 images, rank 0 evaluating 16 and rank 1 15: map_50 and map are one process's (map_50 before: 0.8418
    against 0.6868 in float32, 0.1221 against 0.1202 in bf16)."""
    n = 31
    one = detection_ap(list(range(n)))
    assert one["float32/map_50"] == pytest.approx(0.6868, abs=1e-4)  # the 1.0 ties in image order
    for values in gloo_ranks(tmp_path, detection_ap, unrepeated_shards(n), deadline_s=DEADLINE_S):
        assert values == pytest.approx(one, rel=1e-6, abs=1e-9)


def test_detection_ap_orders_ties_by_the_images_index_not_their_arrival() -> None:
    """One process fed the images in another order (as a gather across ranks interleaves them): with their dataset
    indices map_50 is that of the dataset order; without indices, the arrival order (unchanged). (`map` is
    torchmetrics' COCO evaluation, whose image ids are the arrival positions: under DDP its element-by-element
    gather of the per-image lists interleaves the ranks' images, which is the dataset order for the unrepeated
    sampler's strided shards, as the two-process test checks.)"""
    n = 31
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    map_50 = lambda images: {k: v for k, v in detection_ap(images).items() if k.endswith("map_50")}  # noqa: E731
    assert map_50(shuffled) == pytest.approx(map_50(list(range(n))), rel=1e-6, abs=1e-9)

    def without_index(images: list[int]) -> float:
        metric = DetectionAP()
        detections, targets = tied_detections(images, bf16=False)
        metric.update(detections, [{k: v for k, v in t.items() if k != "index"} for t in targets])
        return float(metric.compute()["map_50"])

    assert without_index(list(range(n))) == pytest.approx(0.6868, abs=1e-4)
    assert without_index(unrepeated_shards(n)[0] + unrepeated_shards(n)[1]) == pytest.approx(0.8418, abs=1e-4)


# ----------------------------------------------------------------------------------------------- ConceptAUROC
K = 6


def concept_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (12, K) and concepts (12, K) in {0, 1}; concept 5 always present (no AUROC: NaN), concept 4's logits
    +-20 (ties)."""
    g = torch.Generator().manual_seed(0)
    logits, concepts = torch.randn(12, K, generator=g) * 3, (torch.rand(12, K, generator=g) > 0.5).long()
    concepts[:, 5] = 1
    logits[:, 4] = torch.where(torch.rand(12, generator=g) > 0.5, 20.0, -20.0)
    return logits, concepts


def concept_auroc_values(samples: list[int]) -> dict[str, list[float]]:
    """ConceptAUROC's compute() and its per-concept AUROC under `sync_context` (as `CBMSystem.concept_table` reads
    it), in batches of BATCH of `samples`."""
    logits, concepts = concept_data()
    metric = ConceptAUROC(K)
    for i in range(0, len(samples), BATCH):
        rows = torch.tensor(samples[i:i + BATCH])
        metric.update(logits[rows], concepts[rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rank without samples: torchmetrics warns compute() came before update()
        macro = metric.compute()
    with metric.sync_context(should_sync=torch.distributed.is_initialized()):
        per_concept = metric.per_concept()
    return {"macro": [float(macro)], "per_concept": per_concept.tolist()}


def concept_table(samples: list[int], world: int) -> dict[str, list[float]]:
    """`CBMSystem.concept_table("val")` after its validation metrics saw `samples` (a stand-in trainer of `world`
    processes; a rank without samples updates nothing, as Lightning's loop without batches)."""
    from zoo.cbm.system import CBMSystem

    system = CBMSystem("cbm_tinycnn", num_classes=3, model_kwargs={"num_concepts": K})
    system.trainer = types.SimpleNamespace(world_size=world)
    logits, concepts = concept_data()
    for i in range(0, len(samples), BATCH):
        rows = torch.tensor(samples[i:i + BATCH])
        for name in ("val_concept_f1", "val_concept_auroc"):
            system.metrics[name].update(logits[rows], concepts[rows])
    return {column: values.tolist() for column, values in system.concept_table("val").items()}


def assert_same(ranks: list[dict[str, list[float]]], one: dict[str, list[float]]) -> None:
    for values in ranks:
        assert values.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(torch.tensor(values[key]), torch.tensor(one[key]), equal_nan=True)


def test_concept_auroc_syncs_a_rank_without_samples(tmp_path: Path) -> None:
    """Rank 0 evaluates 12 samples, rank 1 none: compute() and per_concept() under sync_context give one process's
    values on both ranks (before: the gather aborted)."""
    one = concept_auroc_values(list(range(12)))
    assert torch.tensor(one["per_concept"]).isnan().nonzero().flatten().tolist() == [5]  # always present
    assert_same(gloo_ranks(tmp_path, concept_auroc_values, [list(range(12)), []], deadline_s=DEADLINE_S), one)


def test_concept_table_joins_the_gather_on_a_rank_without_updates(tmp_path: Path) -> None:
    """`CBMSystem.concept_table` on rank 0 with 12 samples and rank 1 with none: every rank gets one process's F1
    and AUROC per concept (before: rank 1 skipped the gather rank 0 waited in)."""
    one = concept_table(list(range(12)), 1)
    assert set(one) == {"f1", "auroc"}
    assert_same(gloo_ranks(tmp_path, concept_table, [list(range(12)), []], WORLD, deadline_s=DEADLINE_S), one)
    assert concept_table([], 1) == {}  # nothing evaluated: no column
