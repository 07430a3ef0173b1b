"""`compare`'s explanation report under DDP: two gloo processes on the CPU, rank zero computing the report
(`zoo.cli.compare.explanation_on_rank_zero`) while rank one waits at the barrier, as `train.py compare
--trainer.strategy=ddp` runs it after each run's fit (the process group lives on after `fit`).

The report's scores are torchmetrics Metrics, whose compute() gathered from every rank whenever a process group
existed: rank zero's gather met rank one's barrier (gloo "Connection closed by peer", or a hang), and compare crashed
after its first run. The report now runs inside `zoo.distributed.rank_local`, and rank zero's rows are a single
process's. The spawn has a deadline: a hang fails the test instead of blocking the run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.helpers import gloo_ranks

DEADLINE_S = 20.0  # both ranks together; a run takes a few seconds, a gather against a barrier hangs until killed
TIMINGS = ("ms_per_sample", "samples_per_s")  # wall-clock columns: differ from run to run


class StandInSystem:
    """The part of a System `explanation_on_rank_zero` calls: an `explanation_report` scoring a tiny CNN's saliency
    on 3 images with part masks (`zoo.explain.scores.score_explanations`: DeletionAUC, SensitivityMax,
    AttributionInMask), an L2X selector's against its black box (`zoo.l2x.scores.compare_explainers`:
    SelectionRecovery, AgreementAccuracy), and a metric built and updated before the report, computed in it."""

    def __init__(self) -> None:
        import zoo
        from zoo.explain.faithfulness import AttributionInMask

        torch.manual_seed(0)
        self.model = zoo.create_model("baseline_tinycnn", num_classes=2).eval()
        self.images, self.target = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 0])  # (B, C, H, W), (B,)
        self.masks = torch.rand(3, 2, 16, 16) > 0.6  # (B, P, H, W) parts
        self.selector = zoo.create_model("l2x_vector", num_features=10, k=2, num_classes=2).eval()
        self.black_box = zoo.create_model("baseline_mlp", num_features=10, num_classes=2).eval()
        self.x, self.relevant = torch.randn(6, 10), torch.rand(6, 10) > 0.7  # (N, d) samples and true features
        self.earlier = AttributionInMask("mass")  # built before the report's block
        self.earlier.update(torch.rand(3, 16, 16), self.masks)

    def explanation_report(self, datamodule: Any, settings: dict[str, Any]) -> list[dict[str, Any]]:
        from zoo.explain.scores import score_explanations
        from zoo.l2x.scores import compare_explainers

        images, _ = score_explanations(self.model, self.images, self.target, self.masks, methods=("saliency",),
                                       metrics=("deletion", "sensitivity"), step=64)
        l2x = compare_explainers({"l2x": self.selector}, self.black_box, None, self.x, torch.zeros(6, dtype=torch.long),
                                 self.relevant, 2, ["l2x", "saliency"])
        rows = [*images, *l2x.rows, {"method": "earlier", "mass_in_parts": self.earlier.compute().item()}]
        return [{key: value for key, value in row.items() if key not in TIMINGS} for row in rows]


def report_on_rank_zero(shard: list[int]) -> dict[str, Any]:
    """One rank of `compare` after a run's fit: rank zero's report (None on rank one, which waits at the barrier),
    then a metric of every rank's value computed after it, which syncs as DDP validation metrics do."""
    from torchmetrics.aggregation import MeanMetric

    from zoo.cli.compare import explanation_on_rank_zero
    from zoo.distributed import is_distributed

    rank = dist.get_rank()
    system = StandInSystem() if rank == 0 else None
    cli = SimpleNamespace(model=system, datamodule=None, trainer=SimpleNamespace(
        is_global_zero=rank == 0, strategy=SimpleNamespace(barrier=lambda name=None: dist.barrier())))
    report = explanation_on_rank_zero(cli, {})  # type: ignore[arg-type]
    after = MeanMetric()
    after.update(float(shard[0]))
    return {"report": report, "after": after.compute().item(), "distributed": is_distributed()}


def test_rank_zero_scores_its_report_alone_while_the_other_rank_waits(tmp_path: Path) -> None:
    zero, one = gloo_ranks(tmp_path, report_on_rank_zero, [[0], [1]], deadline_s=DEADLINE_S)
    alone = StandInSystem().explanation_report(None, {})  # one process, no group
    assert {"deletion_auc", "sensitivity_max", "mass_in_parts", "tpr", "posthoc_acc"} <= set().union(*alone)
    assert one["report"] is None
    assert len(zero["report"]) == len(alone)
    for row, single in zip(zero["report"], alone):
        assert row["method"] == single["method"] and row.keys() == single.keys()
        scores = {key: value for key, value in single.items() if key != "method"}
        assert {key: row[key] for key in scores} == pytest.approx(scores, rel=1e-6, abs=1e-9, nan_ok=True), row
    assert zero["after"] == one["after"] == 0.5  # outside the block metrics gather every rank's states again
    assert zero["distributed"] and one["distributed"]
