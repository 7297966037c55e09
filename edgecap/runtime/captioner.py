"""Python API: `Captioner.load(model_dir, engine=..., precision=...).caption(image_or_path_or_batch)`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .console import choice_error
from .engine import Engine
from .manifest import Manifest
from .preprocess import read_rgb
from .search import Hypothesis, SearchOptions, search

ENGINES = ("ort", "trt")


def model_dir(given: str | None) -> Path:
    """The model folder: the one given, else $EDGECAP_MODEL, else ./model."""
    return Path(given or os.environ.get("EDGECAP_MODEL") or "model")


@dataclass
class Caption:
    text: str
    tokens: list[int]
    words: list[str]
    score: float                        # length-normalised log-probability
    attention: np.ndarray | None        # [len(words), R] for attention models
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # n-best (text, score), best first
    timings: dict[str, float] = field(default_factory=dict)               # milliseconds, per batch


def make_engine(folder: Path, manifest: Manifest, engine: str, precision: str, device: str,
                threads: int | None) -> Engine:
    """The named backend over a model folder: `ort` (CPU/CUDA) or `trt` (ONNX Runtime's TensorRT EP)."""
    from .engines.ort import OrtEngine

    if engine == "ort":
        return OrtEngine(folder, manifest, precision, device, threads)
    if engine == "trt":
        return OrtEngine(folder, manifest, precision, "tensorrt", threads)
    raise choice_error("engine", engine, ENGINES)


class Captioner:
    """A model folder plus an engine plus search defaults."""

    def __init__(self, manifest: Manifest, engine: Engine, options: SearchOptions):
        self.manifest, self.engine, self.options = manifest, engine, options
        self.vocab = manifest.vocabulary
        self.preprocess = manifest.preprocess

    @classmethod
    def load(cls, model_dir: str | Path, engine: str = "ort", precision: str = "fp32", device: str = "cpu",
             threads: int | None = None, **search: object) -> "Captioner":
        folder = Path(model_dir)
        manifest = Manifest.load(folder)
        options = SearchOptions(**{**manifest.search, **search})
        return cls(manifest, make_engine(folder, manifest, engine, precision, device, threads), options)

    def caption(self, x, options: SearchOptions | None = None) -> Caption | list[Caption]:
        """An RGB array or a path -> Caption; a list of them -> list of Captions (one batch)."""
        if isinstance(x, (list, tuple)):
            return self.caption_batch([read_rgb(i) if isinstance(i, (str, Path)) else i for i in x], options)
        return self.caption_batch([read_rgb(x) if isinstance(x, (str, Path)) else x], options)[0]

    def caption_batch(self, images: list[np.ndarray], options: SearchOptions | None = None) -> list[Caption]:
        """Caption RGB uint8 images in one batch; each Caption carries the batch's stage timings."""
        opts = options or self.options
        t0 = time.perf_counter()
        tensor = self.preprocess.batch(images)
        t1 = time.perf_counter()
        features = self.engine.encode(tensor)
        t2 = time.perf_counter()
        state, context = self.engine.prepare(features)
        results = search(self.engine, state, context, opts)
        t3 = time.perf_counter()
        words = max(1, max(len(h[0].tokens) + 1 for h in results))
        timings = {"preprocess_ms": (t1 - t0) * 1e3, "encoder_ms": (t2 - t1) * 1e3, "decoder_ms": (t3 - t2) * 1e3,
                   "decoder_per_word_ms": (t3 - t2) * 1e3 / words, "total_ms": (t3 - t0) * 1e3}
        return [self._caption(hyps, timings) for hyps in results]

    def _caption(self, hyps: list[Hypothesis], timings: dict[str, float]) -> Caption:
        best = hyps[0]
        return Caption(self.vocab.decode(best.tokens), best.tokens, [self.vocab.words[t] for t in best.tokens],
                       best.score, best.attention, [(self.vocab.decode(h.tokens), h.score) for h in hyps],
                       dict(timings))
