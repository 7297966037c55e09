"""The CIDEr-D reward equals pycocoevalcap's CIDEr-D on the same corpus (references, tokens, document
frequencies), to 1e-6, including repeated n-grams, empty captions and single references."""

from __future__ import annotations

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
