"""Sentence metrics for textual explanations: CIDEr-D (Vedantam et al. 2015, the coco-caption `CiderD` scorer),
`as_text` for torchmetrics' BLEU-4 and ROUGE-L (`RougeL`: its F-measure) on token ids,
class similarity / class rank (Hendricks et al. 2016: CIDEr of a sentence against all reference sentences of a
class), and, on parts_world, precision / recall of the parts a sentence names.

CIDEr-D as in coco-caption: n = 1..4; each sentence's n-gram counts weighted by
log(#reference sets / max(1, #reference sets containing the n-gram)) (document frequencies over the evaluated
corpus's references); per n, sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref divided by both norms,
times the length penalty exp(-(len_cand - len_ref)^2 / (2 * 6^2)); mean over n, mean over references, x 10.
Token sequences are compared as ids (0 = padding; everything from the end token on is dropped), so the metric
states are tensors and reduce correctly under DDP. A reference row that holds no word (all padding: a CUB image with
fewer sentences than `sentences_per_image` gets such rows) is no reference: it is dropped before scoring, and an
image left without any reference is left out of CIDEr-D's mean and of the class pools (`reference_texts` does the
same for BLEU and ROUGE).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import ROUGEScore
from torchmetrics.utilities import dim_zero_cat

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


class _SentenceStore(Metric):
    """Keeps candidates (N, L), references (N, R, L) and labels (N,) as tensors (gathered across ranks)."""

    higher_is_better: bool | None = None
    full_state_update = False

    def __init__(self, end_token: int, start_token: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.end_token, self.start_token = end_token, start_token
        # No "cat" reduction across ranks: each rank pads its rows to its own width, so the gathered per-rank
        # tensors stay a list and `_sentences` pads them to one width.
        for name in ("candidates", "references", "labels"):
            self.add_state(name, default=[], dist_reduce_fx=None)

    def update(self, candidates: torch.Tensor, references: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        name = type(self).__name__
        check_input(name, candidates, ("N", "L"), "token ids", kind="long")
        check_input(name, references, (len(candidates), "R", "L"), "token ids", kind="long")
        length = max(candidates.shape[1], references.shape[2])  # pad to one length so batches concatenate
        self.candidates.append(torch.nn.functional.pad(candidates, (0, length - candidates.shape[1])))
        self.references.append(torch.nn.functional.pad(references, (0, length - references.shape[2])))
        self.labels.append(labels if labels is not None else torch.zeros(len(candidates), dtype=torch.long,
                                                                         device=candidates.device))

    def _sentences(self) -> tuple[list[list[str]], list[list[list[str]]], torch.Tensor]:
        """Candidates, references and labels as token strings; each image's empty references (all-padding rows)
        dropped, so an image may keep fewer references than R, or none."""
        def joined(parts: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
            parts = [parts] if isinstance(parts, torch.Tensor) else parts
            width = max(p.shape[-1] for p in parts)
            return dim_zero_cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts])

        cands, refs = joined(self.candidates), joined(self.references)
        cut = lambda row: decode_tokens(row, end_token=self.end_token, skip=(0, self.start_token))  # noqa: E731
        references = [[words for words in map(cut, rs) if words] for rs in refs]
        return [cut(c) for c in cands], references, dim_zero_cat(self.labels)


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


class RougeL(ROUGEScore):
    """ROUGE-L F-measure (torchmetrics' `ROUGEScore`, best reference per sentence) as one scalar, so it is logged as
    a metric object (`<stage>/rouge_l`)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(rouge_keys="rougeL", **kwargs)

    def __hash__(self) -> int:
        """One hash per object, as `torchmetrics.Metric`'s: ROUGEScore hashes its states alone, so two copies with
        equal (empty) states hash and compare equal and `nn.Module.named_modules` keeps only one. The test copy was
        then invisible to Lightning's metric logging (`test` failed) and to `.to(device)`."""
        return hash((type(self).__name__, id(self)))

    def compute(self) -> torch.Tensor:
        return super().compute()["rougeL_fmeasure"]
