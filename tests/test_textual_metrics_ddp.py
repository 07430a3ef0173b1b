"""The textual metrics under DDP: two gloo processes on the CPU (torch.multiprocessing), each rank evaluating its
own shard as an evaluation sampler gives it, compared with one process on all the data.

An unrepeated evaluation sampler (`datamodules._base._evaluation_sampler`) lets ranks run different numbers of
batches: list states gathered element by element (`_SentenceStore`, torchmetrics' `ROUGEScore`) then met in
mismatched collectives and crashed or hung, and `ClassRelevance` built its (then capped) class pools from the
references in gathered order (rank 0's first batch, rank 1's first batch, ...), so its value changed with the number
of processes. Its pools now hold every reference of the class, wherever it was evaluated. Every spawn has a
deadline: a hang fails the test instead of blocking the run."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from tests.helpers import gloo_ranks
from zoo.textual.metrics import CIDErD, ClassRelevance, RougeL, as_text, reference_texts

START, END = 1, 2  # token ids; 0 = padding, words 3..11
BATCH, WORLD = 8, 2
DEADLINE_S = 60.0  # both ranks together; a run takes a few seconds, a collective mismatch hangs until killed


def sentence_data(n: int) -> dict[str, torch.Tensor]:
    """n images, 3 classes in contiguous blocks (as CUB's files are sorted); candidates (n, 8) and references
    (n, 3, 8) of 1..6 words, the end token, then padding; some images keep one reference, image 7 none."""
    g = torch.Generator().manual_seed(0)

    def sentences(*shape: int) -> torch.Tensor:  # (*shape, 8)
        words = torch.randint(3, 12, (*shape, 8), generator=g)
        length = torch.randint(1, 7, shape, generator=g)[..., None]
        position = torch.arange(8)
        return torch.where(position < length, words, torch.where(position == length, END, 0))

    candidates, references = sentences(n), sentences(n, 3)
    references[::5, 1:] = 0  # all-padding rows: no reference
    references[7] = 0  # an image without any reference: left out of the means and the pools
    return {"candidates": candidates, "references": references, "labels": torch.arange(n) * 3 // n,
            "index": torch.arange(n)}


def trimmed(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens cut to the batch's longest row: widths differ between batches and ranks, as decoded sentences do."""
    return tokens[..., : int(tokens.ne(0).sum(-1).max()) if tokens.numel() else 0]


def evaluate(order: list[int], n: int, indexed: bool) -> dict[str, float]:
    """CIDEr-D, class similarity / rank and ROUGE-L over the images `order` lists, in batches of BATCH. `indexed`:
    each update is given the rows' dataset indices (the batch's "index"), so rows are ordered by it and a repeated
    index counts once."""
    data = sentence_data(n)
    cider, rouge = CIDErD(END, START), RougeL()
    relevance = ClassRelevance(END, START)
    for i in range(0, len(order), BATCH):
        rows = torch.tensor(order[i:i + BATCH])
        candidates, references = trimmed(data["candidates"][rows]), trimmed(data["references"][rows])
        if indexed:
            cider.update(candidates, references, indices=data["index"][rows])
            relevance.update(candidates, references, data["labels"][rows], data["index"][rows])
        else:
            cider.update(candidates, references)
            relevance.update(candidates, references, data["labels"][rows])
        rouge.update(*reference_texts(as_text(candidates, END, START), as_text(references, END, START)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rank without a batch: torchmetrics warns compute() came before update()
        values = {"cider_d": cider.compute(), **relevance.compute(), "rouge_l": rouge.compute()}
    return {name: float(value) for name, value in values.items()}


def rouge_l(order: list[int], n: int) -> dict[str, float]:
    """RougeL alone over the images `order` lists, in batches of BATCH."""
    data, rouge = sentence_data(n), RougeL()
    for i in range(0, len(order), BATCH):
        rows = torch.tensor(order[i:i + BATCH])
        rouge.update(*reference_texts(as_text(data["candidates"][rows], END, START),
                                      as_text(data["references"][rows], END, START)))
    return {"rouge_l": float(rouge.compute())}


def two_processes(tmp_path: Path, shards: list[list[int]], *args: object,
                  job: Callable[..., dict[str, float]] = evaluate) -> list[dict[str, float]]:
    """Each rank's synchronised values, `job(shards[rank], *args)` (`tests.helpers.gloo_ranks`)."""
    return gloo_ranks(tmp_path, job, shards, *args, deadline_s=DEADLINE_S)


def assert_one_process_values(ranks: list[dict[str, float]], one: dict[str, float]) -> None:
    assert set(one) == {"cider_d", "class_similarity", "class_rank", "rouge_l"}
    for values in ranks:
        assert values == pytest.approx(one, rel=1e-6, abs=1e-9), (values, one)


def unrepeated_shards(n: int) -> list[list[int]]:
    """What Lightning's UnrepeatedDistributedSampler (the evaluation sampler under DDP) gives each rank."""
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    return [list(UnrepeatedDistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=False))
            for r in range(WORLD)]


def test_sentence_metrics_sync_ranks_that_ran_different_numbers_of_batches(tmp_path: Path) -> None:
    """33 images: rank 0 evaluates 17 (3 batches), rank 1 16 (2 batches). The two-process values equal one
    process's on the 33 images (before: the list states' gathers mismatched, a crash or a hang)."""
    n = 33
    shards = unrepeated_shards(n)
    assert [len(range(0, len(s), BATCH)) for s in shards] == [3, 2]
    assert_one_process_values(two_processes(tmp_path, shards, n, False), evaluate(list(range(n)), n, False))


def test_rouge_l_syncs_ranks_with_different_numbers_of_sentences(tmp_path: Path) -> None:
    """ROUGE-L alone, rank 0 scoring 3 batches and rank 1 2 (image 7, without a reference, dropped from rank 1's):
    one process's value on the 33 images (before: one list entry per sentence, gathered one by one, crashed)."""
    n = 33
    assert two_processes(tmp_path, unrepeated_shards(n), n, job=rouge_l) == [rouge_l(list(range(n)), n)] * WORLD


def test_class_pools_are_the_one_process_pools_under_ddp(tmp_path: Path) -> None:
    """With the rows' dataset indices, each class pool holds the class's references from both ranks, as one process
    does (with capped pools, taking the first to arrive in the gather gave class similarity 0.04137 instead of
    0.07236 in an earlier audit's repro)."""
    n = 33
    ranks = two_processes(tmp_path, unrepeated_shards(n), n, True)
    assert_one_process_values(ranks, evaluate(list(range(n)), n, True))


def test_sentence_metrics_sync_a_rank_without_batches(tmp_path: Path) -> None:
    """Rank 1 evaluates nothing (fewer batches than ranks): its empty states join the gather and both ranks get
    rank 0's values."""
    n = 33
    ranks = two_processes(tmp_path, [list(range(24)), []], n, False)  # rank 0: 3 batches, rank 1: none
    assert_one_process_values(ranks, evaluate(list(range(24)), n, False))


def test_sentence_stores_count_a_padding_samplers_repeated_image_once(tmp_path: Path) -> None:
    """A padding DistributedSampler on 33 images hands image 0 to rank 1 a second time: with the rows' indices the
    repeat counts once in CIDEr-D and the class pools, so they are one process's values on the 33 images. (ROUGE-L,
    a sum over sentences without their indices, counts it twice, as BLEU does: the unrepeated evaluation sampler
    is what keeps those exact.)"""
    n = 33
    shards = [list(DistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=False)) for r in range(WORLD)]
    assert shards[1][-1] == 0 and sum(map(len, shards)) == n + 1
    one = evaluate(list(range(n)), n, True)
    for values in two_processes(tmp_path, shards, n, True):
        assert values.pop("rouge_l") != pytest.approx(one["rouge_l"], rel=1e-6)  # image 0 twice
        assert values == pytest.approx({k: v for k, v in one.items() if k != "rouge_l"}, rel=1e-6, abs=1e-9)


def test_class_pools_follow_the_dataset_index_not_the_arrival_order() -> None:
    """One process fed the images in another order (as a gather across ranks interleaves them): with their dataset
    indices class similarity and rank are those of the dataset order."""
    n = 33
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    in_order, arrived = evaluate(list(range(n)), n, True), evaluate(shuffled, n, True)
    assert arrived == pytest.approx(in_order, rel=1e-6, abs=1e-9)


@pytest.mark.filterwarnings("ignore:.*compute.*before the.*update:UserWarning")
def test_rouge_l_keeps_rouge_scores_value_and_one_hash_per_object() -> None:
    """RougeL's sum and count give torchmetrics' ROUGEScore mean of the best-reference F-measures (nan before any
    sentence, as it); two fresh copies stay two modules (ROUGEScore's copies hashed alike)."""
    from torchmetrics.text import ROUGEScore

    data = sentence_data(33)
    ours, theirs = RougeL(), ROUGEScore(rouge_keys="rougeL")
    for i in range(0, 33, BATCH):
        texts = reference_texts(as_text(data["candidates"][i:i + BATCH], END, START),
                                as_text(data["references"][i:i + BATCH], END, START))
        ours.update(*texts)
        theirs.update(*texts)
    ours.update([], [])  # a batch whose images all lacked a reference adds nothing
    assert ours.compute().item() == pytest.approx(theirs.compute()["rougeL_fmeasure"].item(), rel=1e-6)
    assert torch.isnan(RougeL().compute())
    copies = torch.nn.ModuleDict({"val": RougeL(), "test": RougeL()})
    assert len(list(copies.modules())) == 3 and hash(copies["val"]) != hash(copies["test"])
