"""The one interface every engine implements; the search code runs over it unchanged.

A captioning model is three graphs: `encode` (images -> features), `init` (features -> initial recurrent
state plus per-image context the step needs) and `step` (previous words, state, context -> log-probabilities,
next state, attention). Engines differ only in how they run these graphs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .errors import ModelError

Arrays = dict[str, np.ndarray]
STATE_NAMES = ("h", "c")


@dataclass
class StepOutput:
    logprobs: np.ndarray          # [N, V] float32
    state: Arrays                 # "h", "c": [N, H]
    attention: np.ndarray | None  # [N, R] for attention decoders, else None


class Engine(ABC):
    """Runs a captioning model's three graphs on numpy arrays."""

    #: names of the per-image arrays (from `encode` or `init`) that `step` reads besides words and state
    context_names: tuple[str, ...] = ()

    @abstractmethod
    def encode(self, images: np.ndarray) -> Arrays:
        """Preprocessed images [N, 3, S, S] -> {"regions": [N, R, D], "pooled": [N, D]}."""

    @abstractmethod
    def init(self, features: Arrays) -> Arrays:
        """Encoder features -> {"h", "c"} plus any per-image context named in `context_names`."""

    @abstractmethod
    def step(self, words: np.ndarray, state: Arrays, context: Arrays) -> StepOutput:
        """One word for every row: words [N] int64, state and context rows aligned with words."""

    def tag(self, regions: np.ndarray) -> np.ndarray:
        """Regions [N, R, D] -> the tagger graph's logits [N, L], for models that have one."""
        raise ModelError(f"the {type(self).__name__} engine has no tagger graph")

    def prepare(self, features: Arrays) -> tuple[Arrays, Arrays]:
        """Encoder features -> (state, context) ready for search."""
        init = self.init(features)
        state = {k: init[k] for k in STATE_NAMES}
        merged = {**features, **init}
        context = {k: merged[k] for k in self.context_names}
        return state, context
