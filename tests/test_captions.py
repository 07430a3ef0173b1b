"""Textual-explanation groundwork: parts_world reference sentences and the sentence metrics (CIDEr-D against
hand-worked cases and an independent dense reimplementation, class similarity / rank, attribute mention)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from datamodules import PartsWorldDataModule
from datamodules.parts_world import BOS, EOS, decode_caption, mention_matrix, mentioned_parts
from metrics.captions import AttributeMention, ClassRelevance, CIDErD, cider_d, document_frequency


def rows(sentences: list[list[int]], length: int = 12) -> torch.Tensor:
    out = torch.zeros(len(sentences), length, dtype=torch.long)
    for i, s in enumerate(sentences):
        out[i, : len(s) + 1] = torch.tensor([*s, EOS])
    return out


def test_cider_d_hand_worked_cases() -> None:
    refs = [[[11, 12, 13, 14]], [[15, 16, 17, 18]]]  # nothing shared between the two images
    frequency = document_frequency(refs)
    assert cider_d([11, 12, 13, 14], refs[0], frequency, 2) == pytest.approx(10.0)  # identical: cosine 1 per n
    # a shorter exact prefix: only n-grams that fit count, each n's cosine times the length penalty
    prefix = cider_d([11, 12, 13], refs[0], frequency, 2)
    cosines = [math.sqrt(3 / 4), math.sqrt(2 / 3), math.sqrt(1 / 2), 0.0]
    assert prefix == pytest.approx(10 * sum(cosines) / 4 * math.exp(-1 / 72))
    # clipping: repeating a matching word does not raise the score (CIDEr-D's min(w_cand, w_ref))
    repeated = cider_d([11, 11, 11, 11], refs[0], frequency, 2)
    assert repeated == pytest.approx(10 * (1 * 1 / (4 * 2)) / 4)  # unigram: min(4,1)*1 / (|4| * |2|), idf log 2
    # an n-gram in every image's references has idf 0 and counts for nothing
    shared = [[[11, 12]], [[11, 12]]]
    assert cider_d([11, 12], shared[0], document_frequency(shared), 2) == 0.0


def dense_cider_d(candidate: list[int], references: list[list[int]], all_refs: list[list[list[int]]]) -> float:
    """Independent reference: dense tf-idf vectors over every n-gram seen, numpy-free, straight from the paper."""
    score = 0.0
    for ref in references:
        per_n = []
        for n in range(1, 5):
            grams = lambda s: [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]  # noqa: E731
            universe = sorted({g for refs in all_refs for r in refs for g in grams(r)} | set(grams(candidate)))
            idf = {g: math.log(len(all_refs)) - math.log(max(1, sum(any(g in grams(r) for r in refs)
                                                                     for refs in all_refs))) for g in universe}
            c = [grams(candidate).count(g) * idf[g] for g in universe]
            r = [grams(ref).count(g) * idf[g] for g in universe]
            norm = math.sqrt(sum(x * x for x in c)) * math.sqrt(sum(x * x for x in r))
            dot = sum(min(a, b) * b for a, b in zip(c, r))
            per_n.append((dot / norm if norm else dot) * math.exp(-((len(candidate) - len(ref)) ** 2) / 72))
        score += sum(per_n) / 4
    return 10 * score / len(references)


def test_cider_d_metric_matches_the_dense_reference_on_random_corpora() -> None:
    rng = random.Random(0)
    sentence = lambda: [rng.randint(10, 16) for _ in range(rng.randint(3, 9))]  # noqa: E731
    references = [[sentence() for _ in range(3)] for _ in range(6)]
    candidates = [sentence() for _ in range(6)]
    expected = sum(dense_cider_d(c, r, references) for c, r in zip(candidates, references)) / 6
    metric = CIDErD(end_token=EOS)
    metric.update(rows(candidates[:4]), torch.stack([rows(r) for r in references[:4]]))
    metric.update(rows(candidates[4:], 10), torch.stack([rows(r, 10) for r in references[4:]]))  # other widths
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)


def test_class_rank_prefers_the_class_whose_sentences_match() -> None:
    refs = torch.stack([rows([[11, 12, 13]] * 2), rows([[11, 12, 13]] * 2), rows([[14, 15, 16]] * 2)])
    labels = torch.tensor([0, 0, 1])
    metric = ClassRelevance(end_token=EOS)
    metric.update(rows([[11, 12, 13], [14, 15, 16], [14, 15, 16]]), refs, labels)
    result = metric.compute()  # sentence 1 describes class 1 though labelled 0: rank 2 there
    assert result["class_rank"].item() == pytest.approx((1 + 2 + 1) / 3)


def test_parts_world_captions_name_visible_parts() -> None:
    data = PartsWorldDataModule(num_train=64, num_val=8, num_test=8)
    data.setup()
    t = data.splits["train"].tensors
    assert t["captions"].shape == (64, 3, 18) and (t["captions"][:, :, 0] == BOS).all()
    for i in range(64):
        visible = set(t["part_types"][i].tolist()) | {d for d in t["distractor_types"][i].tolist() if d >= 0}
        for caption in t["captions"][i]:
            named = mentioned_parts(caption)
            assert 1 <= len(named) <= 3 and named <= visible, decode_caption(caption)
    # the vectorised parser the metric uses agrees with the word-by-word one
    matrix = mention_matrix(t["captions"].flatten(0, 1))
    assert [set(row.nonzero().flatten().tolist()) for row in matrix] == [
        mentioned_parts(c) for c in t["captions"].flatten(0, 1)]
    again = PartsWorldDataModule(num_train=64, num_val=8, num_test=8)
    again.setup()
    assert torch.equal(again.splits["train"].tensors["captions"], t["captions"])


def test_attribute_mention_precision_and_recall() -> None:
    metric = AttributeMention()
    mentioned = torch.zeros(2, 36)
    mentioned[0, [1, 2, 30]] = 1  # 1, 2 object parts; 30 a visible distractor
    mentioned[1, [5]] = 1  # 5 is nowhere in the image
    metric.update(mentioned, torch.tensor([[1, 2, 3], [6, 7, 8]]), torch.tensor([[30, -1], [-1, -1]]))
    result = metric.compute()
    assert result["attribute_precision"].item() == pytest.approx((1 + 0) / 2)
    assert result["attribute_recall"].item() == pytest.approx((2 / 3 + 0) / 2)
