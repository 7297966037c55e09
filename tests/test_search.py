"""Greedy and beam search on hand-built step functions whose best sequences are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgecap.runtime.engine import Engine, StepOutput
from edgecap.runtime.search import NEG_INF, SearchOptions, _top, search

END, A, B, C, D = 2, 4, 5, 6, 7
V = 8


class MarkovEngine(Engine):
    """Next-word probabilities depend on the previous word; the state `h` carries the word before it.

    Each image selects its own table through its context, and the attention output points at the word in
    `h`, so a state row that beam reordering got wrong shows up in the attention history.
    """

    context_names = ("table",)

    def __init__(self, tables: list[dict[int, dict[int, float]]]):
        self.tables = tables
        self.calls = 0

    def encode(self, images):
        return {"table": np.arange(len(images))}

    def init(self, features):
        n = len(features["table"])
        return {"h": np.full((n, 1), 1.0), "c": np.zeros((n, 1))}  # previous word: <start>

    def step(self, words, state, context):
        self.calls += 1
        logprobs = np.full((len(words), V), -np.inf, np.float32)
        for row, (t, p) in enumerate(zip(context["table"], words)):
            for word, prob in self.tables[t].get(p, {END: 1.0}).items():
                logprobs[row, word] = math.log(prob)
        attention = np.eye(V, dtype=np.float32)[state["h"][:, 0].astype(int)]  # "looks at" the word in h
        return StepOutput(logprobs, {"h": words[:, None].astype(float), "c": state["c"]}, attention)


def run(tables, **opts):
    engine = MarkovEngine(tables)
    state, context = engine.prepare(engine.encode(np.zeros((len(tables), 1))))
    return search(engine, state, context, SearchOptions(**opts)), engine


# Greedy takes A (0.6) but every continuation of A is poor; B (0.4) then <end> (0.9) is best.
GARDEN_PATH = {1: {A: 0.6, B: 0.4}, A: {A: 0.34, C: 0.33, D: 0.33}, B: {END: 0.9, C: 0.1},
               C: {END: 1.0}, D: {END: 1.0}}


def test_greedy_is_wrong_and_beam_is_right():
    (greedy,), _ = run([GARDEN_PATH], num_beams=1, max_length=5)
    (beam,), _ = run([GARDEN_PATH], num_beams=3, max_length=5, length_penalty=0.0)
    assert greedy[0].tokens[0] == A
    assert beam[0].tokens == [B]
    assert beam[0].logprob == pytest.approx(math.log(0.4 * 0.9), abs=1e-5)
    assert beam[0].finished


@pytest.mark.parametrize("beams", [1, 3])
def test_min_length_holds_back_an_end_that_is_more_likely(beams):
    # <end> is the likeliest word at every step: only min_length keeps a caption going
    table = {1: {END: 0.7, A: 0.3}, A: {END: 0.9, B: 0.1}, B: {END: 0.8, C: 0.2}, C: {END: 1.0}}
    lengths = {}
    for min_length in (0, 1, 2, 3):
        (hyps,), _ = run([table], num_beams=beams, max_length=6, min_length=min_length, length_penalty=0.0)
        lengths[min_length] = hyps[0].tokens
    assert lengths == {0: [], 1: [A], 2: [A, B], 3: [A, B, C]}


def test_length_penalty_chooses_between_short_and_long():
    # short: S -> <end>, total log 0.3 ; long: L L L L -> <end>, each 0.9 after a 0.7 start
    table = {1: {A: 0.3, B: 0.7}, A: {END: 1.0}, B: {C: 1.0}, C: {D: 1.0}, D: {END: 0.1, C: 0.9}}
    short = [A]
    (raw,), _ = run([table], num_beams=4, max_length=12, length_penalty=0.0)
    (normed,), _ = run([table], num_beams=4, max_length=12, length_penalty=2.0)
    assert raw[0].tokens == short
    assert len(normed[0].tokens) > 1 and normed[0].tokens[0] == B


def test_nbest_sorted_with_scores_and_attention_history():
    (hyps,), _ = run([GARDEN_PATH], num_beams=4, num_return_sequences=3, max_length=6, length_penalty=1.0)
    assert len(hyps) == 3 and len({tuple(h.tokens) for h in hyps}) == 3
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for h in hyps:
        assert h.score == pytest.approx(h.logprob / (len(h.tokens) + 1))
        two_back = ([1, 1] + h.tokens)[: len(h.tokens)]
        assert h.attention.argmax(1).tolist() == two_back  # state and history reordered with the beam


class PlainMarkovEngine(MarkovEngine):
    """The same tables through a decoder without attention (Show and Tell): no attention output."""

    def step(self, words, state, context):
        out = super().step(words, state, context)
        return StepOutput(out.logprobs, out.state, None)


@pytest.mark.parametrize("beams", [1, 3, 4])
def test_decoder_without_attention_gives_the_same_hypotheses(beams):
    tables = [GARDEN_PATH, {1: {C: 0.9, D: 0.1}, C: {D: 0.8, END: 0.2}, D: {END: 1.0}}]
    opts = SearchOptions(num_beams=beams, num_return_sequences=min(beams, 3), max_length=6)
    got = {}
    for engine in (MarkovEngine(tables), PlainMarkovEngine(tables)):
        state, context = engine.prepare(engine.encode(np.zeros((len(tables), 1))))
        got[type(engine)] = search(engine, state, context, opts)
    for with_attention, without in zip(got[MarkovEngine], got[PlainMarkovEngine]):
        assert [(h.tokens, h.score) for h in with_attention] == [(h.tokens, h.score) for h in without]
        assert all(h.attention is None for h in without) and all(h.attention is not None for h in with_attention)


def test_batched_images_one_step_call_per_word():
    other = {1: {C: 0.9, D: 0.1}, C: {D: 0.8, END: 0.2}, D: {END: 1.0}}
    results, engine = run([GARDEN_PATH, other, GARDEN_PATH], num_beams=3, max_length=6, length_penalty=0.0)
    assert [r[0].tokens for r in results] == [[B], [C, D], [B]]
    assert engine.calls <= 6


def test_min_length_and_no_repeat_ngram():
    loop = {1: {A: 1.0}, A: {A: 0.6, END: 0.4}}
    (h,), _ = run([loop], num_beams=1, max_length=8, min_length=3)
    assert len(h[0].tokens) >= 3
    (h,), _ = run([{1: {A: 1.0}, A: {A: 0.7, B: 0.2, END: 0.1}, B: {A: 0.7, END: 0.3}}],
                  num_beams=2, max_length=8, no_repeat_ngram_size=2)
    toks = h[0].tokens
    bigrams = list(zip(toks, toks[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_max_length_cuts_unfinished():
    (h,), _ = run([{1: {A: 1.0}, A: {A: 1.0}}], num_beams=2, max_length=4)
    assert h[0].tokens == [A] * 4 and not h[0].finished


def test_special_tokens_blocked():
    (h,), _ = run([{1: {3: 0.9, A: 0.1}, A: {END: 1.0}}], num_beams=1, max_length=4)
    assert h[0].tokens == [A]  # <unk> blocked although likelier


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(num_beams=2, num_return_sequences=3),
                                 dict(min_length=5, max_length=5), dict(no_repeat_ngram_size=-1)])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        SearchOptions(**bad)


def test_state_follows_its_beam_when_beams_swap():
    # no <end>: every beam runs to max_length; ranks change between steps, so rows are permuted
    table = {1: {A: 0.6, B: 0.4}, A: {B: 0.5, C: 0.5}, B: {A: 0.9, C: 0.1}, C: {A: 0.5, B: 0.5}}
    (hyps,), _ = run([table], num_beams=3, num_return_sequences=3, max_length=6)
    assert len(hyps) == 3
    for h in hyps:
        assert not h.finished and len(h.tokens) == 6
        assert h.attention.argmax(1).tolist() == ([1, 1] + h.tokens)[:6]


@pytest.mark.parametrize("width, n", [(6, 6), (50, 10), (8220, 10), (3000, 4)])
def test_top_matches_a_full_stable_sort(width, n):
    """The filtered top-n equals a full sort, ties by lower index, when the filter columns hold -inf too."""
    rng = np.random.default_rng(width)
    scores = np.round(rng.standard_normal((4, width)), 1)  # many ties
    scores[1, : width // 2] = NEG_INF
    scores[2] = NEG_INF
    scores[3, -n:] = 9.0  # the best entries sit past the filter's columns
    want = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    assert (_top(scores, n) == want).all()
