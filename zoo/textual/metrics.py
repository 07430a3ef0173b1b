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
dataset index, so a padding sampler's repeated samples count once whatever the number of processes). A reference
row that holds no word (all padding: a CUB image with fewer sentences than `sentences_per_image` gets such rows) is
no reference: it is dropped before scoring, and an image left without any reference is left out of CIDEr-D's mean
and of the class pools (`reference_texts` does the same for BLEU and ROUGE).
"""

from __future__ import annotations

import math
import warnings
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


def _sparse_ngrams(sentences: Sequence[Sentence], n: int, ids: dict) -> list[torch.Tensor]:
    """Every sentence's n-grams of order n as (row, n-gram id, count) triples: three (E,) long tensors. `ids`
    (n-gram -> id, shared across calls) grows with the n-grams not seen before."""
    triples = [(row, ids.setdefault(gram, len(ids)), count) for row, sentence in enumerate(sentences)
               for gram, count in Counter(tuple(sentence[i:i + n]) for i in range(len(sentence) - n + 1)).items()]
    return [torch.tensor([t[i] for t in triples], dtype=torch.long).reshape(-1) for i in range(3)]


def _inverse_norms(rows: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """1 / the Euclidean norm of each of `size` sparse vectors given as (row, weight) entries, (E,) each: (size,)
    float64; 0 for a zero vector (whose dot products are 0 anyway)."""
    squares = torch.zeros(size, dtype=torch.float64).index_add_(0, rows, weights.double() ** 2)
    return torch.where(squares > 0, squares.rsqrt(), 0.0)


def class_cider_d(candidates: Sequence[Sentence], references: Sequence[Sentence], reference_classes: torch.Tensor,
                  num_classes: int, n_max: int = 4) -> torch.Tensor:
    """CIDEr-D of every candidate against every class's pool of references, (N, C) float64: per class, what
    `cider_d(candidate, pool, frequency, num_classes)` gives with `frequency` the document frequencies over the C
    pools (`document_frequency(pools)`); reference_classes (M,) is each reference's class in 0..C-1.

    Computed for all pools at once, linear in the references: with n-gram counts c, r and idf >= 0,
    min(c idf, r idf) r idf = idf^2 sum_{k >= 1} [c >= k] [r >= k] r, so each class's references, divided by their
    norms and grouped by length (the length penalty depends on it), sum into one sparse row per (class, length) and a
    candidate meets each such row once per k: the cost grows with the classes and lengths, not with the pool sizes."""
    num_cands = len(candidates)
    ref_classes = reference_classes.long()
    ref_len = torch.tensor([len(r) for r in references], dtype=torch.long).reshape(-1)  # (M,)
    cand_len = torch.tensor([len(c) for c in candidates], dtype=torch.float64).reshape(-1)  # (N,)
    # one group per (class, reference length) present: the references a length penalty treats alike
    groups, group_of = torch.unique(ref_classes * (int(ref_len.max()) + 1 if len(ref_len) else 1) + ref_len,
                                    return_inverse=True)  # (K,), (M,)
    group_len = (ref_len.new_zeros(len(groups)).scatter_(0, group_of, ref_len)).double()  # (K,)
    group_class = ref_classes.new_zeros(len(groups)).scatter_(0, group_of, ref_classes)  # (K,)
    log_num_sets = math.log(max(1, num_classes))
    total = torch.zeros(num_cands, len(groups), dtype=torch.float64)  # (N, K) sum over n of each group's dots
    for n in range(1, n_max + 1):
        ids: dict = {}
        ref_row, ref_gram, ref_count = _sparse_ngrams(references, n, ids)  # (E_r,) each
        cand_row, cand_gram, cand_count = _sparse_ngrams(candidates, n, ids)  # (E_c,) each
        if not len(ref_row) or not len(cand_row):
            continue
        grams = len(ids)
        in_class = torch.unique(ref_classes[ref_row] * grams + ref_gram) % grams  # each (class, n-gram) once
        idf = log_num_sets - torch.log(torch.bincount(in_class, minlength=grams).clamp(min=1).double())  # (G,)
        cand_scale = _inverse_norms(cand_row, cand_count * idf[cand_gram], num_cands)[cand_row] * idf[cand_gram]
        ref_scale = _inverse_norms(ref_row, ref_count * idf[ref_gram], len(references))[ref_row] * idf[ref_gram]
        for k in range(1, int(cand_count.max()) + 1):
            a, b = cand_count >= k, ref_count >= k
            cand = torch.sparse_coo_tensor(torch.stack([cand_row[a], cand_gram[a]]), cand_scale[a],
                                           (num_cands, grams), check_invariants=True)  # (N, G)
            pooled = torch.sparse_coo_tensor(torch.stack([ref_gram[b], group_of[ref_row[b]]]),  # (G, K), summed
                                             ref_scale[b] * ref_count[b], (grams, len(groups)), check_invariants=True)
            with warnings.catch_warnings():  # sparse x sparse goes through CSR, which torch calls beta
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
                total += torch.sparse.mm(cand.coalesce(), pooled.coalesce()).to_dense()  # (N, K)
    penalty = torch.exp(-((cand_len[:, None] - group_len[None]) ** 2) / (2 * SIGMA**2))  # (N, K)
    per_class = torch.zeros(num_cands, num_classes, dtype=torch.float64).index_add_(1, group_class, total * penalty)
    pool_sizes = torch.bincount(ref_classes, minlength=num_classes).clamp(min=1)  # (C,)
    return 10.0 * per_class / n_max / pool_sizes  # (N, C)


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
    reference are left out of the mean and of the document frequencies. NaN when no image is scored (no sentence,
    or none with a reference), as `RougeL` before any sentence."""

    higher_is_better = True
    full_state_update = False

    def compute(self) -> torch.Tensor:
        candidates, references, _ = self._sentences()
        pairs = [(c, r) for c, r in zip(candidates, references) if r]
        kept = [r for _, r in pairs]
        frequency, cache = document_frequency(kept), {}
        scores = [cider_d(c, r, frequency, len(kept), cache=cache) for c, r in pairs]
        return torch.tensor(sum(scores) / len(scores) if scores else float("nan"))


class ClassRelevance(_SentenceStore):
    """Class similarity (CIDEr-D of a sentence against all references of its true class) and class rank (rank,
    1 = best, of the true class among the classes by that score), averaged over sentences.

    A class's pool is every evaluated reference of that class (all-padding rows are no references), as the paper's
    "all reference sentences of the class", so every sentence is scored on the same footing whatever its position
    in the set (a pool of the first 60 references in dataset order scored the first ~20 images of a class against
    their own references and the later ones not). Document frequencies count the class pools (`class_cider_d`).
    The metric sees only the evaluated set, so the ranked classes are the classes that occur in it with at least one
    reference: on a full validation or test split of parts_world or CUB that is every class (rank 1..C, as the
    paper's), on a partial one (`limit_val_batches`) fewer, and ranks are then not comparable with full-split ones.
    Sentences of a class without any reference are left out. Ties count half: rank = 1 + #classes scoring higher +
    0.5 x #other classes scoring the same (the mean rank over the tied places; scores within 1e-9 relative, a
    summation-order rounding, are the same), so an empty sentence, or one whose words no class uses, ranks
    (C + 1) / 2, not 1."""

    higher_is_better = None  # mixed: see entry_directions
    entry_directions: ClassVar[dict[str, bool | None]] = {"class_similarity": True, "class_rank": False}
    full_state_update = False

    def compute(self) -> dict[str, torch.Tensor]:
        candidates, references, labels = self._sentences()
        pool = [(ref, label) for refs, label in zip(references, labels.tolist()) for ref in refs]
        classes = {c: i for i, c in enumerate(sorted({label for _, label in pool}))}  # the ranked classes
        scored = [i for i, label in enumerate(labels.tolist()) if label in classes]
        scores = class_cider_d([candidates[i] for i in scored], [ref for ref, _ in pool],
                               torch.tensor([classes[label] for _, label in pool], dtype=torch.long),
                               len(classes))  # (N, C)
        true = torch.tensor([classes[int(labels[i])] for i in scored], dtype=torch.long)  # (N,)
        own = scores.gather(1, true[:, None])  # (N, 1)
        same = torch.isclose(scores, own, rtol=1e-9, atol=1e-12)  # (N, C)
        higher, tied = ((scores > own) & ~same).sum(1), same.sum(1) - 1  # tied: other classes
        rank = 1 + higher + 0.5 * tied
        return {"class_similarity": own.squeeze(1).mean().float(), "class_rank": rank.mean().float()}


class AttributeMention(Metric):
    """Parts named by sentences against the truth (parts_world): precision = named parts that are in the image
    (object parts or visible distractors) / named; recall = object parts named / object parts (the class-
    discriminative attributes); both averaged over sentences, NaN before any sentence (nothing scored)."""

    higher_is_better = True
    entry_directions: ClassVar[dict[str, bool | None]] = {"attribute_precision": True, "attribute_recall": True}
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
        nan = torch.full_like(self.count, float("nan"))
        scored, count = self.count > 0, self.count.clamp(min=1)
        return {"attribute_precision": torch.where(scored, self.precision_sum / count, nan),
                "attribute_recall": torch.where(scored, self.recall_sum / count, nan)}


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
