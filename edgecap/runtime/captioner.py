"""Python API: `Captioner.load(model_dir, engine=..., precision=...).caption(image_or_path_or_batch)`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .console import choice_error
from .engine import Engine
from .manifest import Manifest
from .preprocess import read_rgb
from .search import Hypothesis, SearchOptions, search

ENGINES = ("ort", "trt")


BUNDLED = Path(__file__).resolve().parent.parent / "models" / "flickr8k-lite0"


def model_dir(given: str | Path | None, say: Callable[[str], None] | None = None) -> Path:
    """The model folder: the one given, else $EDGECAP_MODEL, else ./model, else the model shipped with edgecap
    (EfficientNet-Lite0 + soft attention trained on Flickr8k), announced once through `say`."""
    if given or os.environ.get("EDGECAP_MODEL"):
        return Path(given or os.environ["EDGECAP_MODEL"])
    if Path("model").is_dir() or not (BUNDLED / "manifest.json").is_file():
        return Path("model")
    if say is not None:
        say(f"using the bundled model {BUNDLED.name} (Flickr8k, EfficientNet-Lite0 + attention); "
            "pass --model DIR or set $EDGECAP_MODEL for your own")
    return BUNDLED


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

    def __init__(self, manifest: Manifest, engine: Engine, options: SearchOptions, precision: str = "fp32"):
        self.manifest, self.engine, self.options, self.precision = manifest, engine, options, precision
        self.vocab = manifest.vocabulary
        self.preprocess = manifest.preprocess

    @classmethod
    def load(cls, folder: str | Path | None = None, engine: str = "ort", precision: str | None = None,
             device: str = "cpu", threads: int | None = None, **search: object) -> "Captioner":
        """A model folder (default: `model_dir(None)`, i.e. the bundled model when nothing else is set) at
        `precision` (default: the folder's best, fp32 where it has it)."""
        folder = model_dir(folder)
        manifest = Manifest.load(folder)
        options = SearchOptions(**{**manifest.search, **search})
        precision = precision or manifest.default_precision
        return cls(manifest, make_engine(folder, manifest, engine, precision, device, threads), options, precision)

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
