"""The one decode path, for every engine: encode -> prepare -> search.

The Captioner, evaluation, export verification and the benchmarks all caption through `decode`; batching
and timing are its parameters.
"""

from __future__ import annotations

import time

import numpy as np

from .engine import Arrays, Engine
from .search import Hypothesis, SearchOptions, search


def start(engine: Engine, images: np.ndarray) -> tuple[Arrays, Arrays]:
    """Preprocessed images [N, 3, S, S] -> the search's (state, context)."""
    return engine.prepare(engine.encode(images))


def decode(engine: Engine, images: np.ndarray | None, options: SearchOptions, *, features: Arrays | None = None,
           batch_size: int | None = None, timings: dict[str, float] | None = None) -> list[list[Hypothesis]]:
    """Per image, `options.num_return_sequences` hypotheses, best first.

    `images` are preprocessed [N, 3, S, S]; or pass encoder `features` ({"regions", "pooled"}, e.g. cached)
    and `images=None`. `batch_size` rows go through the engine at a time (default: all). When `timings` is
    given, "encoder_ms" and "decoder_ms" (prepare + search) are added to it.
    """
    if (images is None) == (features is None):
        raise ValueError("decode needs exactly one of images or features")
    n = len(images) if images is not None else len(next(iter(features.values())))
    step = batch_size or max(n, 1)
    out: list[list[Hypothesis]] = []
    for lo in range(0, n, step):
        t0 = time.perf_counter()
        feats = engine.encode(images[lo: lo + step]) if images is not None else \
            {k: v[lo: lo + step] for k, v in features.items()}
        t1 = time.perf_counter()
        state, context = engine.prepare(feats)
        out += search(engine, state, context, options)
        if timings is not None:
            timings["encoder_ms"] = timings.get("encoder_ms", 0.0) + (t1 - t0) * 1e3
            timings["decoder_ms"] = timings.get("decoder_ms", 0.0) + (time.perf_counter() - t1) * 1e3
    return out
