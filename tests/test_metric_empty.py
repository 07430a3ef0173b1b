"""Metrics that read raw scores the same way whatever the batching, and "nothing to score" reported as NaN, never as
a score: concept AUROC on raw logits (Mann-Whitney, ties half), AttributionInMask on a batch without ground truth,
and the empty cases of the mean metrics (faithfulness, concepts, parse parts, sentences, rule firing, ICNN's part
metrics, L2X's agreement accuracy and selection size)."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.aog_rcnn.metrics import ParsePartIoU
from zoo.cbm.metrics import ConceptAccuracy, ConceptAUROC
from zoo.explain.faithfulness import AttributionInMask, DeletionAUC
from zoo.renn.metrics import NamedRuleFiring, RuleFiring
from zoo.textual.metrics import AttributeMention, CIDErD

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # computes before any update


# ------------------------------------------------------------------------------------------------ concept AUROC
def test_concept_auroc_does_not_depend_on_the_batching() -> None:
    """torchmetrics applied the sigmoid per batch, only to a batch with a value outside [0, 1]: the first batch was
    ranked on raw logits, the second on probabilities, and two updates gave 0.6667 where one gives 1.0."""
    first, first_truth = torch.tensor([[0.9], [0.1]]), torch.tensor([[0], [0]])
    second, second_truth = torch.tensor([[2.0], [-1.0]]), torch.tensor([[1], [0]])
    batched, whole = ConceptAUROC(1), ConceptAUROC(1)
    batched.update(first, first_truth)
    batched.update(second, second_truth)
    whole.update(torch.cat([first, second]), torch.cat([first_truth, second_truth]))
    # the positive (2.0) scores above all three negatives: AUROC 1
    assert batched.compute().item() == pytest.approx(1.0)
    assert whole.compute().item() == pytest.approx(1.0)


def test_concept_auroc_keeps_large_logits_apart() -> None:
    """Logits above ~16.6 all became sigmoid 1.0 in float32 and tied (0.75); the raw logits rank them (1.0)."""
    metric = ConceptAUROC(1)
    metric.update(torch.tensor([[20.0], [30.0], [-5.0]]), torch.tensor([[0], [1], [0]]))
    assert metric.compute().item() == pytest.approx(1.0)


def test_concept_auroc_counts_ties_half_and_leaves_out_single_valued_concepts() -> None:
    from zoo.cbm.metrics import concept_auroc  # the functional form (new with the Mann-Whitney AUROC)

    # concept 0: positives 1, 2 (tied with a negative), negatives 2, 0 -> pairs (1>0) 1, (1 vs 2) 0, (2=2) 0.5,
    # (2>0) 1: 2.5 / 4; concept 1 never present, concept 2 always present: NaN, left out of the mean
    logits = torch.tensor([[1.0, 0.3, 5.0], [2.0, 0.1, 6.0], [2.0, 0.2, 7.0], [0.0, 0.4, 8.0]])
    truth = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1]])
    per_concept = concept_auroc(logits, truth)
    assert per_concept[0].item() == pytest.approx(2.5 / 4) and torch.isnan(per_concept[1:]).all()
    metric = ConceptAUROC(3)
    metric.update(logits[:1], truth[:1])
    metric.update(logits[1:], truth[1:])
    torch.testing.assert_close(metric.per_concept(), per_concept, equal_nan=True)
    assert metric.compute().item() == pytest.approx(2.5 / 4)
    assert torch.isnan(ConceptAUROC(3).compute())  # before any update


def test_concept_auroc_matches_sklearn_on_tied_and_large_logits() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(-4, 5, (300, 6), generator=generator).float() * 9  # many ties, |logit| up to 36
    truth = (torch.rand(300, 6, generator=generator) < 0.3).long()
    metric = ConceptAUROC(6)
    for rows in torch.arange(300).split(37):  # uneven batches
        metric.update(logits[rows], truth[rows])
    expected = torch.tensor([sklearn_metrics.roc_auc_score(truth[:, k].numpy(), logits[:, k].numpy())
                             for k in range(6)], dtype=torch.float32)
    torch.testing.assert_close(metric.per_concept(), expected, atol=1e-6, rtol=0)
    assert metric.compute().item() == pytest.approx(expected.mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------- AttributionInMask, skip_empty
@pytest.mark.parametrize("kind", ["pointing", "mass"])
def test_attribution_in_mask_skips_a_batch_without_ground_truth(kind: str) -> None:
    """A series batch of the class without rule events (all masks empty) reached `saliency_rank` empty: IndexError."""
    metric = AttributionInMask(kind, skip_empty=True)
    saliency, empty = torch.rand(3, 16), torch.zeros(3, 2, 16, dtype=torch.bool)
    metric.update(saliency, empty)
    assert math.isnan(metric.compute().item())  # nothing scored yet
    masks = empty.clone()
    masks[0, 1, 5] = True
    peaked = torch.zeros(3, 16)
    peaked[:, 5] = 1.0
    metric.update(peaked, masks)  # one sample kept, its peak and all its mass inside
    assert metric.compute().item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- nothing to score is NaN
def test_mean_faithfulness_score_is_nan_without_images() -> None:
    assert math.isnan(DeletionAUC().compute().item())  # 0 would be the best deletion AUC


def test_concept_accuracy_is_nan_before_any_update() -> None:
    metric = ConceptAccuracy()
    assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 1]]))
    assert metric.compute().item() == pytest.approx(0.5)


def test_parse_part_iou_is_nan_when_no_object_is_matched() -> None:
    assert all(math.isnan(value.item()) for value in ParsePartIoU().compute().values())
    metric = ParsePartIoU()
    preds = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
              "leaf_boxes": torch.zeros(0, 2, 4), "leaf_mask": torch.zeros(0, 2, dtype=torch.bool)}]
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
                "part_boxes": torch.tensor([[[0.0, 0, 5, 10], [5, 0, 10, 10]]])}]
    metric.update(preds, targets)
    result = metric.compute()
    assert result["matched"].item() == 0.0  # one object, missed
    assert all(math.isnan(result[name].item()) for name in ("part_iou", "part_recall", "leaf_precision", "leaves"))


def test_sentence_metrics_are_nan_without_sentences() -> None:
    assert math.isnan(CIDErD(end_token=2).compute().item())
    assert all(math.isnan(value.item()) for value in AttributeMention().compute().values())


def test_rule_recall_is_nan_for_a_rule_without_events_and_left_out_of_the_mean() -> None:
    rule_map, events = torch.zeros(1, 2, 10), torch.zeros(1, 2, 10)
    rule_map[0, 0, 7], events[0, 0, 5] = 1.0, 1.0  # rule a: its one event found (tolerance 2)
    rule_map[0, 1, 3] = 1.0  # rule b: fires, no events
    metric = RuleFiring(2)
    metric.update(rule_map, events)
    result = metric.compute()
    assert result["recall"][0].item() == 1.0 and math.isnan(result["recall"][1].item())
    assert result["precision"].tolist() == [1.0, 0.0]
    named = NamedRuleFiring(["a", "b"])
    named.update(rule_map, events)
    result = named.compute()
    assert result["recall"].item() == 1.0 and math.isnan(result["recall/b"].item())  # was (1 + 0) / 2
    assert result["precision"].item() == pytest.approx(0.5)


def test_rule_firing_is_nan_before_any_update_and_silent_rules_have_no_precision() -> None:
    """A rule that never fired claimed nothing: its precision is NaN (left out of means), not 1 (an untrained ReNN
    firing nowhere scored rule precision 1.0)."""
    assert all(math.isnan(value.item()) for value in NamedRuleFiring(["a", "b"]).compute().values())
    metric = RuleFiring(2)
    metric.update(torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))  # scored, never fired, no events
    result = metric.compute()
    assert torch.isnan(result["precision"]).all() and torch.isnan(result["recall"]).all()


def test_part_metrics_are_nan_before_any_update_and_after_reset() -> None:
    """ICNN's part metrics raised torchmetrics' bare "No samples to concatenate" with nothing scored."""
    from zoo.icnn.metrics import LocationInstability, PartIoU

    instability, part_iou = LocationInstability(16, top_n=2), PartIoU(num_parts=2)
    assert math.isnan(instability.compute().item()) and math.isnan(part_iou.compute().item())
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, :, 1, 1] = 1.0
    instability.update(maps, torch.full((2, 2, 2), 6.0))
    part_masks = torch.zeros(2, 2, 16, 16, dtype=torch.bool)
    part_masks[:, 0, :8, :8] = True
    part_iou.update(maps, part_masks)
    assert instability.compute().shape == part_iou.compute().shape == ()  # scored: a number, NaN's shape
    assert not math.isnan(instability.compute().item()) and not math.isnan(part_iou.compute().item())
    instability.reset()
    part_iou.reset()
    assert math.isnan(instability.compute().item()) and math.isnan(part_iou.compute().item())


def test_l2x_accuracy_and_selection_size_are_nan_without_samples() -> None:
    """0 was an accuracy (the worst) and a selection size (none), not "nothing scored"."""
    from zoo.l2x.metrics import AgreementAccuracy, SelectionRecovery

    accuracy = AgreementAccuracy()
    assert math.isnan(accuracy.compute().item())
    accuracy.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert accuracy.compute().item() == pytest.approx(0.5)
    assert math.isnan(SelectionRecovery().compute()["num_selected"].item())
