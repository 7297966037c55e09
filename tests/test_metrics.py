"""Caption metrics: sanity of scores, tokenizers, SPICE fallback, input errors, corpus statistics."""

from __future__ import annotations

import re
import time

import pytest
from pycocoevalcap.bleu.bleu import Bleu

from edgecap.runtime.errors import EdgecapError
from edgecap.train import metrics
from edgecap.train.metrics import METRICS, bleu4, corpus_stats, java_available, score_captions

needs_java = pytest.mark.skipif(not java_available(), reason="Java not found: PTB tokenizer and METEOR need a JRE")

REFS = {
    "1": ["A dog runs on the grass.", "a brown dog running across a green field"],
    "2": ["A man rides a red bicycle down the street.", "a person riding a bike on a city road"],
    "3": ["Two cats sleep on a sofa.", "a pair of cats sleeping on the couch"],
    "4": ["A plate of food with rice and vegetables.", "a dish of rice with some vegetables"],
}
GOOD = {k: refs[0] for k, refs in REFS.items()}
CLOSE = {
    "1": "a dog runs on the green grass",
    "2": "a man rides a bicycle down a street",
    "3": "two cats sleep on the couch",
    "4": "a plate of food with rice",
}
BAD = {k: "purple quantum umbrella finance yesterday" for k in REFS}
NO_JAVA = ("BLEU", "ROUGE-L", "CIDEr-D")


def _check_ranking(good: dict, close: dict, bad: dict) -> None:
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert good["ROUGE-L"] == pytest.approx(1.0) and good["CIDEr-D"] > 1.0  # CIDEr-D runs 0..10
    assert bad["BLEU-4"] < 1e-6 and bad["CIDEr-D"] == pytest.approx(0.0, abs=1e-9)
    for name in good:
        assert good[name] > close[name] > bad[name], name


def test_simple_tokenizer_ranks_hypotheses():
    good, close, bad = (score_captions(REFS, h, tokenizer="simple", metrics=NO_JAVA) for h in (GOOD, CLOSE, BAD))
    assert list(good) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"]
    _check_ranking(good, close, bad)


@pytest.fixture(scope="module")
def ptb_scores():
    """Default metrics (PTB tokenizer, METEOR included) for GOOD, CLOSE and BAD, plus the METEOR objects made."""
    made = []

    class SpyMeteor(metrics.Meteor):
        def __init__(self):
            super().__init__()
            made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "Meteor", SpyMeteor)
        scores = [score_captions(REFS, h) for h in (GOOD, CLOSE, BAD)]
    return scores, made


@needs_java
def test_ptb_default_metrics_rank_hypotheses(ptb_scores):
    (good, close, bad), _ = ptb_scores
    assert list(good) == [m for m in METRICS if m != "SPICE"]
    assert all(isinstance(v, float) for v in good.values())
    assert good["METEOR"] > 0.9
    _check_ranking(good, close, bad)


@needs_java
def test_meteor_java_process_is_closed(ptb_scores):
    _, made = ptb_scores
    assert len(made) == 3
    assert all(m.meteor_p.poll() is not None and m.meteor_p.stdin.closed for m in made)


def test_bleu4_is_pycocoevalcap_bleu_on_simply_tokenized_text():
    """bleu4 (early stopping's Java-free score) against pycocoevalcap's Bleu scorer called directly on captions
    tokenized here by the documented rule: lowercase, non-word characters to spaces."""
    def tokenized(text: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())

    for hyps in (GOOD, CLOSE, BAD):
        gts = {k: [tokenized(r) for r in refs] for k, refs in REFS.items()}
        res = {k: [tokenized(h)] for k, h in hyps.items()}
        expected = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
        assert bleu4(REFS, hyps) == pytest.approx(expected, abs=1e-12)
    assert bleu4(REFS, GOOD) == pytest.approx(1.0) and bleu4(REFS, BAD) < 1e-6
    assert 0.2 < bleu4(REFS, CLOSE) < 1.0


@pytest.mark.parametrize("tokenizer", [pytest.param("ptb", marks=needs_java), "simple"])
def test_tokenizers_ignore_case_and_punctuation(tokenizer):
    refs = {"a": ["A dog's ball, red!", "the ball is red"], "b": ["Two small cats; sleeping..."]}
    hyps = {"a": "a dog's ball red", "b": "two small cats sleeping"}
    scores = score_captions(refs, hyps, tokenizer=tokenizer, metrics=NO_JAVA)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)


def test_scores_are_deterministic():
    assert score_captions(REFS, CLOSE, tokenizer="simple", metrics=NO_JAVA) == \
        score_captions(REFS, CLOSE, tokenizer="simple", metrics=NO_JAVA)


def test_spice_gives_float_or_unavailable_in_time():
    start = time.monotonic()
    result = score_captions(REFS, CLOSE, tokenizer="simple", metrics=("SPICE",))
    assert time.monotonic() - start < 60
    assert list(result) == ["SPICE"]
    assert isinstance(result["SPICE"], float) or result["SPICE"].startswith("unavailable")


@pytest.mark.parametrize("child, expected", [
    ("import time; time.sleep(60)", "unavailable: timed out after 1 s"),
    ("import sys; sys.exit('spice exploded')", "unavailable: spice exploded"),
])
def test_spice_failures_are_reported_not_raised(monkeypatch, tmp_path, child, expected):
    jar = tmp_path / "corenlp.jar"
    jar.touch()
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(metrics, "_CORENLP_JAR", jar)
    monkeypatch.setattr(metrics, "_SPICE_CHILD", child)
    monkeypatch.setattr(metrics, "SPICE_TIMEOUT_S", 1.0)
    start = time.monotonic()
    assert score_captions(REFS, CLOSE, tokenizer="simple", metrics=("SPICE",)) == {"SPICE": expected}
    assert time.monotonic() - start < 10


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.raises(EdgecapError, match="Java is required for the PTB tokenizer .*apt-get install"):
        score_captions(REFS, CLOSE, metrics=("BLEU",))
    with pytest.raises(EdgecapError, match="Java is required for METEOR"):
        score_captions(REFS, CLOSE, tokenizer="simple")
    assert score_captions(REFS, CLOSE, tokenizer="simple", metrics=("SPICE",)) == {"SPICE": "unavailable: Java not found"}


@pytest.mark.parametrize("refs, hyps, message", [
    (REFS, {"1": "a dog", "99": "a cat"}, "have no references"),
    ({}, {"1": "a dog"}, "non-empty"),
    (REFS, {}, "non-empty"),
    ({"1": []}, {"1": "a dog"}, "empty reference list"),
])
def test_bad_inputs_raise_value_error(refs, hyps, message):
    with pytest.raises(ValueError, match=message):
        score_captions(refs, hyps, tokenizer="simple", metrics=NO_JAVA)
    with pytest.raises(ValueError, match=message):
        bleu4(refs, hyps)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="unknown metric 'CIDEr'"):
        score_captions(REFS, CLOSE, tokenizer="simple", metrics=("CIDEr",))
    with pytest.raises(ValueError, match="tokenizer must be"):
        score_captions(REFS, CLOSE, tokenizer="nltk", metrics=NO_JAVA)


def test_hypotheses_subset_is_scored_on_its_own_ids():
    subset = {"1": GOOD["1"], "2": GOOD["2"]}
    assert score_captions(REFS, subset, tokenizer="simple", metrics=("BLEU-4",))["BLEU-4"] == pytest.approx(1.0)


def test_corpus_stats_on_hand_made_example():
    stats = corpus_stats({"a": "A dog runs.", "b": "a dog runs", "c": "Two cats!"})
    assert stats == {"distinct_captions": 2, "distinct_ratio": pytest.approx(2 / 3),
                     "vocab_used": 5, "mean_length": pytest.approx(8 / 3), "dangling_share": 0.0}
    ends = corpus_stats({"a": "a dog runs in the", "b": "a man with a", "c": "the end", "d": "", "e": "and."})
    assert ends["dangling_share"] == pytest.approx(3 / 5)  # "the", "a", "and"; not "end" or the empty caption
    with pytest.raises(ValueError):
        corpus_stats({})
