"""Vocabulary and the shared tokenisation."""

import pytest

from edgecap.runtime.errors import ModelError
from edgecap.runtime.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize():
    assert tokenize("A dog's ball, RED!  (2 times)") == ["a", "dog's", "ball", "red", "2", "times"]


def test_build_encode_decode():
    v = Vocabulary.build(["a red dog", "a blue dog", "a cat"], min_freq=2)
    assert v.words == [*SPECIALS, "a", "dog"]
    assert v.encode("A red dog") == [4, v.unk_id, 5]
    assert v.decode([4, 5, v.end_id, 4]) == "a dog"
    assert Vocabulary(v.to_list()).words == v.words


def test_errors():
    with pytest.raises(ValueError, match="empty vocabulary"):
        Vocabulary.build(["a b"], min_freq=5)
    with pytest.raises(ModelError):
        Vocabulary(["a", "b"])
