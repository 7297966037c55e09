"""The CIDEr-D reward equals pycocoevalcap's CIDEr-D on the same corpus (references, tokens, document
frequencies), to 1e-6, including repeated n-grams, empty captions and single references."""

from __future__ import annotations

from collections import Counter

import pytest
from pycocoevalcap.cider.cider import Cider

from edgecap.train.cider import CiderD

CORPORA = [
    ({"1": ["a dog runs on the grass", "a brown dog running across a green field"],
      "2": ["a man rides a red bicycle down the street", "a person riding a bike on a city road"],
      "3": ["two cats sleep on a sofa", "a pair of cats sleeping on the couch"]},
     {"1": "a dog runs on the green grass", "2": "a man rides a bike", "3": "two cats on a couch"}),
    ({"a": ["a a a a dog dog", "the dog the dog the dog"], "b": ["a man a man", "a woman"], "c": ["x"]},
     {"a": "a a a a a a", "b": "", "c": "x"}),                        # repeated n-grams, an empty caption
    ({str(i): [f"word{i} and more words here", "shared words here"] for i in range(12)},
     {str(i): "shared words here" if i % 2 else f"word{i} and" for i in range(12)}),
]


@pytest.mark.parametrize("refs, hyps", CORPORA)
def test_reward_is_pycocoevalcaps_cider_d(refs, hyps):
    _, expected = Cider().compute_score(refs, {k: [h] for k, h in hyps.items()})
    reward = CiderD({k: [r.split() for r in rs] for k, rs in refs.items()})
    got = [reward(k, hyps[k].split()) for k in refs]
    assert got == pytest.approx(list(expected), abs=1e-6)


def test_a_better_caption_gets_more():
    refs = CORPORA[0][0]
    reward = CiderD({k: [r.split() for r in rs] for k, rs in refs.items()})
    assert reward("1", "a dog runs on the grass".split()) > reward("1", "a dog".split()) > reward("1", []) == 0.0


def test_a_batch_of_samples_per_image_scores_as_pycocoevalcap_does():
    """K samples of each image (repeats included), scored in one batch against document frequencies of all the
    references: each equals pycocoevalcap's score of that sample on the same corpus."""
    refs = CORPORA[0][0]
    samples = {"1": ["a dog runs", "a brown dog running on the grass", "a dog runs"],
               "2": ["a man rides a bike", "a person on a road", ""],
               "3": ["two cats on a sofa", "cats cats cats", "two cats on a sofa"]}
    keys = [k for k in refs for _ in samples[k]]
    candidates = [s.split() for k in refs for s in samples[k]]
    got = CiderD({k: [r.split() for r in rs] for k, rs in refs.items()}).scores(keys, candidates)
    for j in range(3):  # pycocoevalcap scores one caption per image per call
        _, expected = Cider().compute_score(refs, {k: [samples[k][j]] for k in refs})
        assert got[j::3] == pytest.approx(list(expected), abs=1e-6)


def test_document_frequencies_are_counted_once_and_a_batch_counts_only_its_samples(monkeypatch):
    from edgecap.train import cider

    refs = {str(i): [f"a dog number {i} runs", "a dog runs on the grass"] for i in range(50)}
    reward = CiderD({k: [r.split() for r in rs] for k, rs in refs.items()})
    counted = []
    monkeypatch.setattr(cider, "ngram_counts", lambda words, n: counted.append(words) or Counter())
    reward.scores(["1", "2", "1", "3"], [["a", "dog"], ["a", "cat"], ["a", "dog"], ["a", "dog"]])
    assert sorted(counted) == [["a", "cat"], ["a", "dog"], ["a", "dog"]]  # no reference recounted; repeats once
