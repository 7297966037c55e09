"""Greedy and beam search over any Engine: one implementation for PyTorch, ONNX Runtime and TensorRT.

Options are named as ONNX Runtime GenAI names them. Beam search is batched: one `step` call per word
serves every image and every beam; recurrent state is reordered by beam index after each word.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .console import choice_error
from .engine import Arrays, Engine
from .vocab import Vocabulary

NEG_INF = -np.inf
WHAT = {bool: "true or false", int: "a whole number", float: "a finite number"}


@dataclass(frozen=True)
class SearchOptions:
    """How captions are searched; these defaults are the ones `export-onnx` writes into a manifest."""

    num_beams: int = 3              # 1: greedy
    max_length: int = 20            # words generated, <end> included
    min_length: int = 1             # words before <end> may be chosen
    length_penalty: float = 1.0     # score = sum log p / length ** length_penalty
    no_repeat_ngram_size: int = 0   # 0: off
    num_return_sequences: int = 1
    early_stopping: bool = True     # stop an image once num_beams hypotheses have ended
    block_unk: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (isinstance(value, bool) if kind is bool else
                    numeric and isinstance(value, int) if kind is int else numeric and math.isfinite(value)):
                raise ValueError(f"{f.name} must be {WHAT[kind]}, got {value!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"n-best (num_return_sequences={self.num_return_sequences}) must be between 1 and "
                             f"the beam width (num_beams={self.num_beams})")
        if not 0 <= self.min_length < self.max_length:
            raise ValueError(f"need 0 <= min_length < max_length, got {self.min_length}, {self.max_length}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    @property
    def name(self) -> str:
        """How reports name this search: "greedy" or "beamK"."""
        return "greedy" if self.num_beams == 1 else f"beam{self.num_beams}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "search options") -> "SearchOptions":
        """Options from a manifest or request; an unknown key is a one-line error naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise choice_error(f"key in {where}", unknown[0], sorted(known))
        return cls(**d)


@dataclass
class Hypothesis:
    tokens: list[int]                # word ids, without <start>/<end>
    logprob: float                   # sum of the chosen words' log-probabilities (<end> included)
    score: float                     # logprob / length ** length_penalty
    attention: np.ndarray | None     # [len(tokens), R]: attention while choosing each word
    finished: bool                   # False when max_length cut it


def _mask(logprobs: np.ndarray, seqs: np.ndarray, opts: SearchOptions) -> np.ndarray:
    """Forbid special tokens, early <end> and repeated n-grams. seqs: [N, t] words chosen so far."""
    lp = logprobs.astype(np.float32, copy=True)
    lp[:, [Vocabulary.pad_id, Vocabulary.start_id]] = NEG_INF
    if opts.block_unk:
        lp[:, Vocabulary.unk_id] = NEG_INF
    t = seqs.shape[1]
    if t < opts.min_length:
        lp[:, Vocabulary.end_id] = NEG_INF
    n = opts.no_repeat_ngram_size
    if n and t >= n:
        for row, seq in enumerate(seqs.tolist()):
            prefix = seq[t - n + 1:] if n > 1 else []
            banned = [seq[i + n - 1] for i in range(t - n + 1) if seq[i:i + n - 1] == prefix]
            lp[row, banned] = NEG_INF
    return lp


def search(engine: Engine, state: Arrays, context: Arrays, opts: SearchOptions) -> list[list[Hypothesis]]:
    """Decode every image of a started batch; -> per image, `num_return_sequences` hypotheses, best first."""
    if opts.num_beams == 1:
        return [[h] for h in _greedy(engine, state, context, opts)]
    return _beam(engine, state, context, opts)


def _greedy(engine: Engine, state: Arrays, context: Arrays, opts: SearchOptions) -> list[Hypothesis]:
    n = len(state["h"])
    words = np.full(n, Vocabulary.start_id, np.int64)
    seqs = np.zeros((n, 0), np.int64)
    logprob = np.zeros(n, np.float64)
    ended_at = np.full(n, -1)
    alphas: list[np.ndarray] = []
    for t in range(opts.max_length):
        out = engine.step(words, state, context)
        lp = _mask(out.logprobs, seqs, opts)
        words = lp.argmax(1)
        running = ended_at < 0
        logprob[running] += lp[np.arange(n), words][running]
        ended_at[running & (words == Vocabulary.end_id)] = t
        seqs = np.concatenate([seqs, words[:, None]], 1)
        if out.attention is not None:
            alphas.append(out.attention)
        state = out.state
        if (ended_at >= 0).all():
            break
    attention = np.stack(alphas, 1) if alphas else None  # [N, T, R]
    hyps = []
    for i in range(n):
        finished = ended_at[i] >= 0
        length = int(ended_at[i]) if finished else seqs.shape[1]
        norm = (length + finished) ** opts.length_penalty
        hyps.append(Hypothesis(seqs[i, :length].tolist(), float(logprob[i]), float(logprob[i] / norm),
                               None if attention is None else attention[i, :length], bool(finished)))
    return hyps


def _beam(engine: Engine, state: Arrays, context: Arrays, opts: SearchOptions) -> list[list[Hypothesis]]:
    b, k = len(state["h"]), opts.num_beams
    scores = np.zeros((b, 1), np.float64)  # one live beam per image until the first word: no duplicate rows
    words = np.full(b, Vocabulary.start_id, np.int64)
    seqs = np.zeros((b, 0), np.int64)
    attn: np.ndarray | None = None                                                # [rows, t, R]
    ended: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for t in range(opts.max_length):
        out = engine.step(words, state, context)
        lp = _mask(out.logprobs, seqs, opts)
        live, vocab = scores.shape[1], lp.shape[1]
        cand = (scores.reshape(-1, 1) + lp).reshape(b, live * vocab)              # [B, live*V]
        top = _top(cand, min(2 * k, live * vocab))                                # [B, n], best first
        image = np.arange(b)[:, None]
        total = cand[image, top]
        rows, word = image * live + top // vocab, top % vocab                     # candidate's parent row
        usable = np.isfinite(total) & ~done[:, None]
        is_end = word == Vocabulary.end_id
        # <end> among an image's k best candidates ends a hypothesis; its k best other candidates go on
        for i, j in zip(*np.nonzero(usable & is_end & (np.arange(top.shape[1]) < k))):
            a = None if out.attention is None else _history(attn, rows[i, j], out.attention.shape[1])
            ended[i].append(Hypothesis(seqs[rows[i, j]].tolist(), float(total[i, j]),
                                       float(total[i, j] / (t + 1) ** opts.length_penalty), a, True))
        going = usable & ~is_end
        going &= np.cumsum(going, 1) <= k
        slot = np.argsort(~going, axis=1, kind="stable")[:, :k]                  # going candidates first
        filled = going[image, slot]                                               # [B, K]
        src = np.where(filled, rows[image, slot], image * live)
        new_words = np.where(filled, word[image, slot], Vocabulary.end_id)
        new_scores = np.where(filled, total[image, slot], NEG_INF)
        for i in np.flatnonzero(~done):
            done[i] = not filled[i, 0] or _is_done(ended[i], new_scores[i, 0], t + 1, opts)
        idx = src.reshape(-1)
        state = {name: a[idx] for name, a in out.state.items()}                   # reorder by beam index
        if live == 1:
            context = {name: a[idx] for name, a in context.items()}               # one row per beam from now
        seqs = np.concatenate([seqs[idx], new_words.reshape(-1, 1)], 1)
        if out.attention is not None:
            step_attn = out.attention[idx][:, None]
            attn = step_attn if attn is None else np.concatenate([attn[idx], step_attn], 1)
        scores, words = new_scores, new_words.reshape(-1)
        if done.all():
            break
    for i in np.flatnonzero(~done):  # cut by max_length: the alive beams compete as they are
        for j in range(k):
            row, total = i * k + j, scores[i, j]
            if np.isfinite(total):
                ended[i].append(Hypothesis(seqs[row].tolist(), float(total),
                                           float(total / seqs.shape[1] ** opts.length_penalty),
                                           None if attn is None else attn[row], False))
    return [sorted(h, key=lambda x: -x.score)[: opts.num_return_sequences] for h in ended]


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Column indices of each row's n best scores, best first (ties: lower index first).

    The n-th best of any n entries bounds the row's n-th best from below, so partitioning the first columns
    filters the row before a small sort. In beam search those are the best beam's most frequent words (a
    vocabulary is sorted by frequency), a tight bound: measured 8x faster than an argpartition of the whole
    row at beam 5 over 1,644 words.
    """
    head = min(scores.shape[1], max(n, 256))
    out = np.empty((len(scores), n), np.int64)
    for i, row in enumerate(scores):
        floor = np.partition(row[:head], head - n)[head - n]
        idx = np.flatnonzero(row >= floor)
        out[i] = idx[np.argsort(-row[idx], kind="stable")[:n]]
    return out


def _history(attn: np.ndarray | None, row: int, regions: int) -> np.ndarray:
    """Attention while choosing each of a beam's words so far: [t, R]."""
    return np.zeros((0, regions), np.float32) if attn is None else attn[row].copy()


def _is_done(ended: list[Hypothesis], best_alive: float, length: int, opts: SearchOptions) -> bool:
    """An image is done when num_beams hypotheses ended and (unless early stopping) no alive beam can win."""
    if len(ended) < opts.num_beams:
        return False
    if opts.early_stopping:
        return True
    worst = sorted(h.score for h in ended)[-opts.num_beams]
    return best_alive / length ** opts.length_penalty <= worst
