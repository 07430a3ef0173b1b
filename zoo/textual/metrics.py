"""Sentence metrics for textual explanations: CIDEr-D (Vedantam et al. 2015, the coco-caption `CiderD` scorer),
`as_text` for torchmetrics' BLEU-4 and ROUGE-L (`RougeL`: its F-measure) on token ids,
class similarity / class rank (Hendricks et al. 2016: CIDEr of a sentence against all reference sentences of a
class), and, on parts_world, precision / recall of the parts a sentence names.

CIDEr-D as in coco-caption: n = 1..4; each sentence's n-gram counts weighted by
log(#reference sets / max(1, #reference sets containing the n-gram)) (document frequencies over the evaluated
corpus's references); per n, sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref divided by both norms,
times the length penalty exp(-(len_cand - len_ref)^2 / (2 * 6^2)); mean over n, mean over references, x 10.
Token sequences are compared as ids (0 = padding; everything from the end token on is dropped), so the metric
states are tensors and reduce correctly under DDP (each rank's rows joined into one tensor before the gather, so
ranks that ran different numbers of batches, or none, still meet in the same collectives; rows ordered by their
dataset index, so a class pool holds the same references whatever the number of processes). A reference row that
holds no word (all padding: a CUB image with fewer sentences than `sentences_per_image` gets such rows) is no
reference: it is dropped before scoring, and an image left without any reference is left out of CIDEr-D's mean and
of the class pools (`reference_texts` does the same for BLEU and ROUGE).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.utilities.distributed import gather_all_tensors

from datamodules._base import decode_tokens
from zoo.checks import check_input

Sentence = Sequence[int | str]  # token ids, or their strings as `decode_tokens` writes them
SIGMA = 6.0


def ngram_counts(sentence: Sentence, n_max: int = 4) -> list[Counter]:
    return [Counter(tuple(sentence[i:i + n]) for i in range(len(sentence) - n + 1)) for n in range(1, n_max + 1)]


def document_frequency(reference_sets: Sequence[Sequence[Sentence]], n_max: int = 4) -> Counter:
    """For each n-gram, in how many reference sets (images) it occurs."""
    frequency: Counter = Counter()
    for references in reference_sets:
        frequency.update({g for ref in references for counts in ngram_counts(ref, n_max) for g in counts})
    return frequency


def _tfidf(sentence: Sentence, frequency: Counter, log_num_sets: float, n_max: int) -> tuple[list[dict], list[float]]:
    vectors, norms = [], []
    for counts in ngram_counts(sentence, n_max):
        vector = {g: c * (log_num_sets - math.log(max(1.0, frequency[g]))) for g, c in counts.items()}
        vectors.append(vector)
        norms.append(math.sqrt(sum(v * v for v in vector.values())))
    return vectors, norms


def cider_d(candidate: Sentence, references: Sequence[Sentence], frequency: Counter, num_sets: int,
            n_max: int = 4, cache: dict | None = None) -> float:
    """CIDEr-D of one candidate against its references, given corpus document frequencies. `cache` (a dict kept
    across calls with the same frequencies) memoises tf-idf vectors of repeated sentences."""
    log_num_sets = math.log(max(1, num_sets))
    cache = {} if cache is None else cache

    def vectors(sentence: Sentence) -> tuple[list[dict], list[float]]:
        key = tuple(sentence)
        if key not in cache:
            cache[key] = _tfidf(sentence, frequency, log_num_sets, n_max)
        return cache[key]

    cand_vec, cand_norm = vectors(candidate)
    total = 0.0
    for reference in references:
        ref_vec, ref_norm = vectors(reference)
        penalty = math.exp(-((len(candidate) - len(reference)) ** 2) / (2 * SIGMA**2))
        per_n = []
        for n in range(n_max):
            value = sum(min(w, ref_vec[n][g]) * ref_vec[n][g] for g, w in cand_vec[n].items() if g in ref_vec[n])
            if cand_norm[n] and ref_norm[n]:
                value /= cand_norm[n] * ref_norm[n]
            per_n.append(value * penalty)
        total += sum(per_n) / n_max
    return 10.0 * total / max(1, len(references))


def as_text(tokens: torch.Tensor, end_token: int, start_token: int | None = None) -> list:
    """Token rows as whitespace-joined id strings ("12 5 7"), up to the end token, padding and the start token
    dropped (`datamodules._base.decode_tokens` without a vocabulary): (B, L) -> B strings, (B, R, L) -> B lists of
    R strings. Word n-grams and id n-grams match alike, so torchmetrics' BLEU and ROUGE score these as they would
    the words."""
    if tokens.ndim == 3:
        return [as_text(rows, end_token, start_token) for rows in tokens]
    return [" ".join(decode_tokens(row, end_token=end_token, skip=(0, start_token))) for row in tokens]


def reference_texts(texts: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Candidates and their references (as `as_text` writes them) for torchmetrics' BLEU and ROUGE, each image's
    empty references dropped (an all-padding row is no sentence: as a reference, "" was the closest length in BLEU's
    brevity penalty and raised a 2-word candidate against a 7-word reference from 0.08 to 1.0), and images left
    without a reference dropped with their candidate."""
    kept = [(text, [r for r in refs if r]) for text, refs in zip(texts, references)]
    kept = [(text, refs) for text, refs in kept if refs]
    return [text for text, _ in kept], [refs for _, refs in kept]


def _pad_cat(parts: Sequence[torch.Tensor] | torch.Tensor, ndim: int, device: torch.device) -> torch.Tensor:
    """Tensors of `ndim` dims concatenated along dim 0, every other dim zero-padded (0 = padding) to the widest;
    parts without rows are left out (a rank that ran no batch gathers as (0,) * ndim). (0,) * ndim, long, when no
    part holds a row."""
    parts = [p for p in ([parts] if isinstance(parts, torch.Tensor) else parts) if len(p)]
    if not parts:
        return torch.zeros((0,) * ndim, dtype=torch.long, device=device)
    widths = [max(p.shape[d] for p in parts) for d in range(1, ndim)]
    return torch.cat([torch.nn.functional.pad(p, [x for d in reversed(range(1, ndim))
                                                   for x in (0, widths[d - 1] - p.shape[d])]) for p in parts])


class _SentenceStore(Metric):
    """Keeps candidates (N, L), references (N, R, L), labels (N,) and dataset indices (N,) as tensors (gathered
    across ranks).

    Under DDP each rank joins its rows into one tensor per state before the gather (`_sync_dist`): torchmetrics
    gathers a list state element by element, so ranks with different numbers of updates (an unrepeated evaluation
    sampler gives one rank a batch fewer) met in mismatched collectives (a crash or a hang). Rows with an index
    (`update(..., indices=)`, the batch's "index") are ordered by it and repeated indices (a padding sampler's
    repeated samples) kept once, so the rows are those of one process on the whole set, in its order; without
    indices, the arrival order (rank 0's rows, then rank 1's, ...)."""

    higher_is_better: bool | None = None
    full_state_update = False
    _STATE_NDIM: ClassVar[dict[str, int]] = {"candidates": 2, "references": 3, "labels": 1, "indices": 1}

    def __init__(self, end_token: int, start_token: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.end_token, self.start_token = end_token, start_token
        # No "cat" reduction across ranks: each rank pads its rows to its own width, so the gathered per-rank
        # tensors stay a list (one tensor per rank, `_sync_dist`) and `_rows` pads them to one width.
        for name in self._STATE_NDIM:
            self.add_state(name, default=[], dist_reduce_fx=None)

    def update(self, candidates: torch.Tensor, references: torch.Tensor, labels: torch.Tensor | None = None,
               indices: torch.Tensor | None = None) -> None:
        """candidates (N, L) and references (N, R, L) token ids; labels (N,) class ids (0 when None); indices (N,)
        the rows' dataset indices (-1, unknown, when None)."""
        name = type(self).__name__
        check_input(name, candidates, ("N", "L"), "token ids", kind="long")
        check_input(name, references, (len(candidates), "R", "L"), "token ids", kind="long")
        if indices is not None:
            check_input(name, indices, (len(candidates),), "dataset indices", kind="long")
        length = max(candidates.shape[1], references.shape[2])  # pad to one length so batches concatenate
        self.candidates.append(torch.nn.functional.pad(candidates, (0, length - candidates.shape[1])))
        self.references.append(torch.nn.functional.pad(references, (0, length - references.shape[2])))
        unknown = torch.full((len(candidates),), -1, dtype=torch.long, device=candidates.device)
        self.labels.append(labels.long() if labels is not None else torch.zeros_like(unknown))
        self.indices.append(indices if indices is not None else unknown)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        """One tensor per state and rank before torchmetrics' gather (one collective per state whatever the number
        of updates; `gather_all_tensors` pads and trims shapes that differ across ranks). The local lists come back
        on `unsync` (torchmetrics caches them before the sync)."""
        for name, ndim in self._STATE_NDIM.items():
            setattr(self, name, [_pad_cat(getattr(self, name), ndim, self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates (N, L), references (N, R, L) and labels (N,): ordered by dataset index, each index once,
        when every row has one; in arrival order otherwise."""
        cands = _pad_cat(self.candidates, 2, self.device)  # (N, L)
        refs = _pad_cat(self.references, 3, self.device)  # (N, R, L)
        labels, indices = _pad_cat(self.labels, 1, self.device), _pad_cat(self.indices, 1, self.device)  # (N,) each
        if len(indices) and bool((indices >= 0).all()):
            order = indices.argsort(stable=True)  # (N,)
            ordered = indices[order]
            first = torch.ones_like(ordered, dtype=torch.bool)
            first[1:] = ordered[1:] != ordered[:-1]  # a repeated index: the same sample again
            order = order[first]
            cands, refs, labels = cands[order], refs[order], labels[order]
        return cands, refs, labels

    def _sentences(self) -> tuple[list[list[str]], list[list[list[str]]], torch.Tensor]:
        """Candidates, references and labels as token strings; each image's empty references (all-padding rows)
        dropped, so an image may keep fewer references than R, or none."""
        cands, refs, labels = self._rows()
        cut = lambda row: decode_tokens(row, end_token=self.end_token, skip=(0, self.start_token))  # noqa: E731
        references = [[words for words in map(cut, rs) if words] for rs in refs]
        return [cut(c) for c in cands], references, labels


class CIDErD(_SentenceStore):
    """Corpus CIDEr-D of generated sentences against each image's reference sentences (mean over images). Empty
    reference rows are dropped (each image's score is the mean over its real references), and images without any
    reference are left out of the mean and of the document frequencies."""

    higher_is_better = True
    full_state_update = False

    def compute(self) -> torch.Tensor:
        candidates, references, _ = self._sentences()
        pairs = [(c, r) for c, r in zip(candidates, references) if r]
        kept = [r for _, r in pairs]
        frequency, cache = document_frequency(kept), {}
        scores = [cider_d(c, r, frequency, len(kept), cache=cache) for c, r in pairs]
        return torch.tensor(sum(scores) / max(1, len(scores)))


class ClassRelevance(_SentenceStore):
    """Class similarity (CIDEr-D of a sentence against all references of its true class) and class rank (rank,
    1 = best, of the true class among the classes by that score), averaged over sentences.

    The class reference pools are the evaluated references grouped by label, at most `pool_size` per class (the
    first non-empty ones; all-padding rows are no references). The metric sees only the evaluated set, so the
    ranked classes are the classes that occur in it with at least one reference: on a full validation or test split
    of parts_world or CUB that is every class (rank 1..C, as the paper's), on a partial one (`limit_val_batches`)
    fewer, and ranks are then not comparable with full-split ones. Sentences of a class without any reference are
    left out. Ties count half: rank = 1 + #classes scoring higher + 0.5 x #other classes scoring the same (the mean
    rank over the tied places), so an empty sentence, or one whose words no class uses, ranks (C + 1) / 2, not 1."""

    higher_is_better = None  # mixed: class_similarity is higher-better, class_rank lower-better
    full_state_update = False

    def __init__(self, end_token: int, start_token: int | None = None, pool_size: int = 60, **kwargs) -> None:
        super().__init__(end_token, start_token, **kwargs)
        self.pool_size = pool_size

    def compute(self) -> dict[str, torch.Tensor]:
        candidates, references, labels = self._sentences()
        labels = labels.tolist()
        pools = {c: [r for refs, lab in zip(references, labels) if lab == c for r in refs][: self.pool_size]
                 for c in sorted(set(labels))}
        classes = [c for c, pool in pools.items() if pool]  # the ranked classes: those with a reference
        scored = [(cand, classes.index(lab)) for cand, lab in zip(candidates, labels) if lab in classes]
        frequency, cache = document_frequency([pools[c] for c in classes]), {}
        scores = torch.tensor([[cider_d(cand, pools[c], frequency, len(classes), cache=cache) for c in classes]
                               for cand, _ in scored], dtype=torch.float64).reshape(len(scored), len(classes))  # (N, C)
        true = torch.tensor([index for _, index in scored], dtype=torch.long)
        own = scores.gather(1, true[:, None]).squeeze(1)  # (N,)
        higher, same = (scores > own[:, None]).sum(1), (scores == own[:, None]).sum(1) - 1  # same: other classes
        rank = 1 + higher + 0.5 * same
        return {"class_similarity": own.mean().float(), "class_rank": rank.mean().float()}


class AttributeMention(Metric):
    """Parts named by sentences against the truth (parts_world): precision = named parts that are in the image
    (object parts or visible distractors) / named; recall = object parts named / object parts (the class-
    discriminative attributes); both averaged over sentences."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("precision_sum", "recall_sum", "count"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, mentioned: torch.Tensor, object_parts: torch.Tensor, distractors: torch.Tensor) -> None:
        """mentioned (B, A) multi-hot of named part types; object_parts (B, P) and distractors (B, D) type ids
        (-1 = none)."""
        num_types = mentioned.shape[1]

        def multi_hot(types: torch.Tensor) -> torch.Tensor:  # (B, K) type ids, -1 = none -> (B, A) bool
            return (torch.nn.functional.one_hot(types.clamp(min=0), num_types) * (types >= 0)[..., None]).any(1)

        present = multi_hot(object_parts)  # (B, A)
        visible = present | multi_hot(distractors)  # (B, A)
        named = mentioned.bool()
        self.precision_sum += ((named & visible).sum(1) / named.sum(1).clamp(min=1)).sum()
        self.recall_sum += ((named & present).sum(1) / present.sum(1).clamp(min=1)).sum()
        self.count += len(named)

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {"attribute_precision": self.precision_sum / count, "attribute_recall": self.recall_sum / count}


class RougeL(Metric):
    """ROUGE-L F-measure (torchmetrics' functional `rouge_score`, best reference per sentence) averaged over
    sentences, as one scalar, so it is logged as a metric object (`<stage>/rouge_l`).

    Keeps the sum of the sentences' F-measures and their count (summed across ranks), not torchmetrics'
    `ROUGEScore`'s list of one tensor per sentence: that list was gathered element by element, so under DDP ranks
    with different numbers of sentences (an unrepeated evaluation sampler, or images dropped for lack of a
    reference) met in mismatched collectives and crashed. The value is `ROUGEScore`'s mean; nan before any
    sentence, as its."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, accumulate: str = "best", use_stemmer: bool = False, normalizer: Callable | None = None,
                 tokenizer: Callable | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.options = {"accumulate": accumulate, "use_stemmer": use_stemmer, "normalizer": normalizer,
                        "tokenizer": tokenizer}
        self.add_state("fmeasure_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def __hash__(self) -> int:
        """One hash per object, fixed for its life: torchmetrics' `ROUGEScore` hashed its states alone, so two
        copies with equal (empty) states hashed and compared equal and `nn.Module.named_modules` kept only one (the
        test copy was then invisible to Lightning's metric logging and to `.to(device)`)."""
        return hash((type(self).__name__, id(self)))

    def update(self, preds: str | Sequence[str], target: str | Sequence[str] | Sequence[Sequence[str]]) -> None:
        """preds: N sentences; target: N reference lists (or N references, one each), as `ROUGEScore.update`."""
        count = 1 if isinstance(preds, str) else len(preds)
        if count == 0:  # every image of the batch dropped (no reference): nothing to add
            return
        mean = rouge_score(preds, target, rouge_keys="rougeL", **self.options)["rougeL_fmeasure"]  # over the N
        self.fmeasure_sum += mean.to(self.fmeasure_sum) * count
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.fmeasure_sum / self.count
