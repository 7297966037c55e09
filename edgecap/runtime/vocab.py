"""Vocabulary and the one tokenisation shared by training, decoding and evaluation.

Tokenisation (written down once): lowercase; every character that is not a letter, a digit or an
apostrophe (Unicode letters included, underscore excluded) becomes a space; split on whitespace.
So "A dog's ball, red!" -> ["a", "dog's", "ball", "red"].
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from .errors import ModelError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_NON_WORD = re.compile(r"[^\w']+|_")


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens (see the module docstring)."""
    return _NON_WORD.sub(" ", text.lower()).split()


class Vocabulary:
    """Maps words to ids; ids 0-3 are always <pad>, <start>, <end>, <unk>."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ModelError(f"vocabulary must start with {SPECIALS}, got {tuple(words[:4])}")
        if len(set(words)) != len(words):
            raise ModelError("vocabulary has duplicate words")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1) -> "Vocabulary":
        """Collect words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for cap in captions for tok in tokenize(cap))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        if not kept:
            raise ValueError(f"empty vocabulary: no word occurs at least {min_freq} time(s)")
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str) -> list[int]:
        """Token ids of a caption, without <start>/<end>."""
        return [self.index.get(tok, self.unk_id) for tok in tokenize(caption)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, stopping at <end> and dropping other special tokens."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i >= len(SPECIALS):
                out.append(self.words[i])
        return " ".join(out)

    def to_list(self) -> list[str]:
        return list(self.words)
