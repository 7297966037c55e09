"""Labels beside the caption: the tagger graph's logits -> the K most likely labels with probabilities."""

from __future__ import annotations

import numpy as np

Tags = list[tuple[str, float]]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_labels(logits: np.ndarray, labels: list[str], k: int) -> list[Tags]:
    """Per row of logits [N, L], the `k` most likely (label, probability), most likely first."""
    probs = softmax(logits.astype(np.float64))
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(labels[i], round(float(p[i]), 4)) for i in row] for p, row in zip(probs, best)]
