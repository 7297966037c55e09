"""Greedy and beam search over any Engine: one implementation for PyTorch, ONNX Runtime and TensorRT.

Options are named as ONNX Runtime GenAI names them. Beam search is batched: one `step` call per word
serves every image and every beam; recurrent state is reordered by beam index after each word.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .engine import Arrays, Engine
from .vocab import Vocabulary

NEG_INF = -np.inf


@dataclass(frozen=True)
class SearchOptions:
    num_beams: int = 1
    max_length: int = 20            # words generated, <end> included
    min_length: int = 1             # words before <end> may be chosen
    length_penalty: float = 1.0     # score = sum log p / length ** length_penalty
    no_repeat_ngram_size: int = 0   # 0: off
    num_return_sequences: int = 1
    early_stopping: bool = True     # stop an image once num_beams hypotheses have ended
    block_unk: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"n-best (num_return_sequences={self.num_return_sequences}) must be between 1 and "
                             f"the beam width (num_beams={self.num_beams})")
        if not 0 <= self.min_length < self.max_length:
            raise ValueError(f"need 0 <= min_length < max_length, got {self.min_length}, {self.max_length}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    def to_dict(self) -> dict:
        return asdict(self)


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
    state = {name: np.repeat(a, k, axis=0) for name, a in state.items()}        # [B*K, H]
    context = {name: np.repeat(a, k, axis=0) for name, a in context.items()}    # [B*K, ...]
    scores = np.zeros((b, k), np.float64)
    scores[:, 1:] = NEG_INF  # all beams start identical: keep one alive
    words = np.full(b * k, Vocabulary.start_id, np.int64)
    seqs = np.zeros((b * k, 0), np.int64)
    attn: np.ndarray | None = None                                                # [B*K, t, R]
    ended: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for t in range(opts.max_length):
        out = engine.step(words, state, context)
        lp = _mask(out.logprobs, seqs, opts)
        vocab = lp.shape[1]
        cand = (scores.reshape(-1, 1) + lp).reshape(b, k * vocab)                 # [B, K*V]
        top = _top(cand, 2 * k)                                                   # [B, 2K]
        src = np.zeros((b, k), np.int64)
        new_words = np.full((b, k), Vocabulary.end_id, np.int64)
        new_scores = np.full((b, k), NEG_INF)
        for i in range(b):
            if done[i]:
                src[i] = i * k
                continue
            filled = 0
            for rank, flat in enumerate(top[i]):
                total, beam, word = cand[i, flat], flat // vocab, flat % vocab
                if not np.isfinite(total):
                    break
                row = i * k + beam
                if word == Vocabulary.end_id:
                    if rank < k:
                        a = None if out.attention is None else _history(attn, row, out.attention.shape[1])
                        ended[i].append(Hypothesis(seqs[row].tolist(), float(total),
                                                   float(total / (t + 1) ** opts.length_penalty), a, True))
                    continue
                src[i, filled], new_words[i, filled], new_scores[i, filled] = row, word, total
                filled += 1
                if filled == k:
                    break
            done[i] = _is_done(ended[i], new_scores[i, 0], t + 1, opts) or filled == 0
        rows = src.reshape(-1)
        state = {name: a[rows] for name, a in out.state.items()}                  # reorder by beam index
        seqs = np.concatenate([seqs[rows], new_words.reshape(-1, 1)], 1)
        if out.attention is not None:
            step_attn = out.attention[rows][:, None]
            attn = step_attn if attn is None else np.concatenate([attn[rows], step_attn], 1)
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
    """Column indices of each row's n best scores, best first (ties: lower index first)."""
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]                        # unordered n best
    vals = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -vals), axis=1)                                    # by score, then index
    return np.take_along_axis(part, order, 1)


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
