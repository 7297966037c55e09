"""CIDEr-D as a training reward: the references' n-gram vectors and document frequencies computed once (from the
training references, as for self-critical training), then each sampled caption scored by counting only its own
n-grams.

The arithmetic is pycocoevalcap's `Cider` (the COCO CIDEr-D: n-grams 1-4, tf-idf weights from the references'
document frequencies, clipped products, a Gaussian penalty with sigma 6 on the length difference, x10), so a
score equals pycocoevalcap's on the same references, tokens and document frequencies (tests/test_cider.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

Ngram = tuple[str, ...]


def ngram_counts(words: Sequence[str], n: int) -> Counter[Ngram]:
    """Every k-gram of the words for k = 1..n, with its count."""
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of candidate word lists against each key's references."""

    def __init__(self, references: Mapping[Hashable, Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        counts = {key: [ngram_counts(ref, n) for ref in refs] for key, refs in references.items()}
        self.document_frequency: Counter[Ngram] = Counter(
            ngram for refs in counts.values() for ngram in set().union(*refs))
        self.log_images = math.log(float(len(counts)))
        self.references = {key: [self._vector(c) for c in refs] for key, refs in counts.items()}

    def _vector(self, counts: Counter[Ngram]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        """tf-idf weights per n-gram order, their norms, and the length pycocoevalcap compares (its count of
        bigrams: its `n == 1` tests a 0-based order)."""
        vec: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            weight = float(tf) * (self.log_images - math.log(max(1.0, self.document_frequency[ngram])))
            vec[order][ngram] = weight
            norm[order] += weight * weight
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def __call__(self, key: Hashable, candidate: Sequence[str]) -> float:
        """The candidate's CIDEr-D against `key`'s references."""
        vec, norm, length = self._vector(ngram_counts(candidate, self.n))
        refs = self.references[key]
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for order in range(self.n):
                overlap = sum(min(w, ref_vec[order].get(g, 0.0)) * ref_vec[order].get(g, 0.0)
                              for g, w in vec[order].items())
                if norm[order] != 0 and ref_norm[order] != 0:
                    overlap /= norm[order] * ref_norm[order]
                total += overlap * penalty / self.n
        return total / len(refs) * 10.0

    def scores(self, keys: Sequence[Hashable], candidates: Sequence[Sequence[str]]) -> list[float]:
        """Each candidate's CIDEr-D against its key's references; a (key, candidate) pair that repeats within the
        batch (an image's samples often agree) is scored once."""
        memo: dict[tuple[Hashable, tuple[str, ...]], float] = {}
        for key, candidate in zip(keys, candidates):
            pair = (key, tuple(candidate))
            if pair not in memo:
                memo[pair] = self(key, candidate)
        return [memo[(key, tuple(candidate))] for key, candidate in zip(keys, candidates)]
