"""Python API: `Captioner.load(model_dir, engine=..., precision=...).caption(image_or_path_or_batch)`.

A Captioner holds no per-call state: one instance may caption from several threads at once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import decode
from .engine import Arrays, Engine
from .engines import RUNTIME_ENGINES, check_choices, make_engine
from .errors import DataError, ModelError
from .manifest import TAGGER, Manifest
from .preprocess import MAX_PIXELS, check_size, decode_image, read_rgb
from .search import Hypothesis, SearchOptions
from .tags import Tags, top_labels

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "flickr8k-lite1"


def model_dir(given: str | Path | None, say: Callable[[str], None] | None = None) -> Path:
    """The model folder: the one given, else $EDGECAP_MODEL, else ./model, else the model shipped with edgecap
    (EfficientNet-Lite1 + soft attention trained on Flickr8k), announced once through `say`."""
    if given or os.environ.get("EDGECAP_MODEL"):
        return Path(given or os.environ["EDGECAP_MODEL"])
    if Path("model").is_dir() or not (BUNDLED / "manifest.json").is_file():
        return Path("model")
    if say is not None:
        say(f"using the bundled model {BUNDLED.name} (Flickr8k, EfficientNet-Lite1 + attention); "
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
    tags: Tags = field(default_factory=list)    # the tagger's best (label, probability), when asked for

    def to_dict(self, batch: int = 1, attention: bool = False) -> dict:
        """The JSON record of a caption (caption-run --json, serving): timings per image of a `batch`; with
        `attention`, each word's attention over the encoder's grid (rows of the grid, rounded to 4 places)."""
        record = {"caption": self.text, "words": self.words, "score": self.score}
        if len(self.alternatives) > 1:
            record["alternatives"] = [{"caption": text, "score": s} for text, s in self.alternatives]
        if self.tags:
            record["tags"] = [{"label": label, "probability": p} for label, p in self.tags]
        if attention and self.attention is not None:
            side = math.isqrt(self.attention.shape[1])
            record["attention"] = {"grid": [side, side], "words": np.round(
                self.attention[:len(self.words)].reshape(-1, side, side).astype(np.float64), 4).tolist()}
        record["timings"] = {k: round(ms / batch, 3) for k, ms in self.timings.items()}
        return record


def as_rgb(x: object, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """What `caption` accepts, as RGB uint8 HxWx3: a path, encoded bytes or a binary file, or an array. Encoded
    images over `max_pixels` are refused before decoding, any image with a side under 16 px after (`check_size`).

    An array is RGB HxWx3, grey HxW or HxWx1, or RGBA HxWx4 (alpha dropped). uint8 values are used as they are,
    uint16 ones scaled to 8 bits (the high byte); float arrays whose values all lie within [0, 1] are scaled by
    255, those within [0, 255] rounded as they are, and any others (or NaN, infinity) are refused. Other dtypes
    (bool, int32, ...) are refused too: every refusal is a DataError.
    """
    if isinstance(x, (str, Path)):
        return read_rgb(x, max_pixels)
    if isinstance(x, (bytes, bytearray, memoryview)) or hasattr(x, "read"):
        return decode_image(x, max_pixels=max_pixels)
    if not isinstance(x, np.ndarray):
        raise DataError(f"expected an image path, encoded bytes or an RGB array, got {type(x).__name__}")
    if 0 in x.shape or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in CHANNELS):
        raise DataError(f"expected an RGB HxWx3 array (or grey HxW, HxWx1, RGBA HxWx4), got shape {x.shape}")
    check_size(x.shape[1], x.shape[0], f"the {x.shape[0]}x{x.shape[1]} image array", max_pixels)
    x = _as_uint8(x)
    if x.ndim == 2 or x.shape[2] == 1:
        return np.repeat(x.reshape(*x.shape[:2], 1), 3, axis=2)
    return np.ascontiguousarray(x[:, :, :3])


def tag_count(manifest: Manifest, precision: str, k: int) -> int:
    """How many labels `k` asks of this model: a one-line error when it is not a count or the model has no
    tagger graph at `precision`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise DataError(f"tags must be a whole number >= 0, got {k!r}")
    if k and not manifest.has_tagger(precision):
        raise ModelError(f"this model has no {TAGGER} graph ({precision}), so it gives no tags: export it again "
                         "from an EfficientNet-Lite checkpoint, or add one with `export-onnx --add-tagger MODEL_DIR "
                         "--verify-images IMAGES`")
    return min(k, len(manifest.labels))


def _as_uint8(x: np.ndarray) -> np.ndarray:
    """Image values as uint8 by the rule in `as_rgb`."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return (x >> 8).astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"image arrays must be uint8, uint16 or float, got {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError("the image array holds NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        raise DataError(f"float image values must lie within [0, 1] or [0, 255], got {low:g} to {high:g}")
    return np.rint(x.astype(np.float32) * (255 if high <= 1 else 1)).astype(np.uint8)


class Captioner:
    """A model folder plus an engine plus search defaults."""

    def __init__(self, manifest: Manifest, engine: Engine, options: SearchOptions, precision: str = "fp32",
                 max_pixels: int = MAX_PIXELS, tags: int = 0):
        self.manifest, self.engine, self.options, self.precision = manifest, engine, options, precision
        self.max_pixels = max_pixels  # images over it are refused before decoding (ImageTooLarge)
        self.vocab = manifest.vocabulary
        self.preprocess = manifest.preprocessing
        self.tags = tag_count(manifest, precision, tags)  # labels per caption unless a call says otherwise

    @classmethod
    def load(cls, folder: str | Path | None = None, engine: str = "ort", precision: str | None = None,
             device: str | None = None, threads: int | None = None, max_pixels: int = MAX_PIXELS, tags: int = 0,
             **search: object) -> "Captioner":
        """A model folder (default: `model_dir(None)`, i.e. the bundled model when nothing else is set) on a
        runtime engine at `precision` (default: the folder's best, fp32 where it has it); encoded images over
        `max_pixels` are refused before decoding; `tags`: the tagger's K best labels with every caption."""
        check_choices(engine, device, precision, RUNTIME_ENGINES)
        if max_pixels < 1:
            raise DataError(f"--max-pixels must be at least 1, got {max_pixels}")
        folder = model_dir(folder)
        manifest = Manifest.load(folder)
        options = SearchOptions.from_dict({**manifest.search.to_dict(), **search})
        precision = precision or manifest.default_precision
        tag_count(manifest, precision, tags)  # before the sessions load
        return cls(manifest, make_engine(engine, folder, precision, device, threads, manifest=manifest), options,
                   precision, max_pixels, tags)

    def caption(self, x, options: SearchOptions | None = None, tags: int | None = None) -> Caption | list[Caption]:
        """An image (see `as_rgb`) -> Caption; a list of them -> list of Captions (one batch). `tags`: labels
        per caption (default: the captioner's)."""
        if isinstance(x, (list, tuple)):
            if not x:
                raise DataError("caption() got an empty list of images")
            return self.caption_batch([as_rgb(i, self.max_pixels) for i in x], options, tags)
        return self.caption_batch([as_rgb(x, self.max_pixels)], options, tags)[0]

    def caption_batch(self, images: list[np.ndarray], options: SearchOptions | None = None,
                      tags: int | None = None) -> list[Caption]:
        """Caption RGB uint8 images in one batch; each Caption carries the batch's stage timings."""
        started = time.perf_counter()
        features, timings = self.encode(images)
        return self.describe(features, timings, options, started, tags)

    def encode(self, images: list[np.ndarray]) -> tuple[Arrays, dict[str, float]]:
        """RGB uint8 images -> the encoder's features ({"regions", "pooled"}) and the stage timings so far."""
        t0 = time.perf_counter()
        tensor = self.preprocess.batch(images)
        t1 = time.perf_counter()
        features = self.engine.encode(tensor)
        return features, {"preprocess_ms": (t1 - t0) * 1e3, "encoder_ms": (time.perf_counter() - t1) * 1e3}

    def describe(self, features: Arrays, timings: dict[str, float] | None = None,
                 options: SearchOptions | None = None, started: float | None = None,
                 tags: int | None = None) -> list[Caption]:
        """Encoder features (`encode`) -> Captions, with `timings` and the decoder's (and the tagger's, with
        `tags`); `total_ms` runs from `started` (a `time.perf_counter()`; default: the sum of the stages)."""
        k = self.tags if tags is None else tag_count(self.manifest, self.precision, tags)
        timings = {"preprocess_ms": 0.0, "encoder_ms": 0.0, **(timings or {})}
        labels: list[Tags] = [[] for _ in features["regions"]]
        if k:
            t0 = time.perf_counter()
            labels = top_labels(self.engine.tag(features["regions"]), self.manifest.labels, k)
            timings["tagger_ms"] = (time.perf_counter() - t0) * 1e3
        results = decode(self.engine, None, options or self.options, features=features, timings=timings)
        words = max(1, max(len(h[0].tokens) + 1 for h in results))
        timings["decoder_per_word_ms"] = timings["decoder_ms"] / words
        stages = ("preprocess_ms", "encoder_ms", "tagger_ms", "decoder_ms")
        timings["total_ms"] = ((time.perf_counter() - started) * 1e3 if started is not None else
                               sum(timings.get(s, 0.0) for s in stages))
        return [self._caption(hyps, timings, tags) for hyps, tags in zip(results, labels)]

    def _caption(self, hyps: list[Hypothesis], timings: dict[str, float], tags: Tags) -> Caption:
        best = hyps[0]
        return Caption(self.vocab.decode(best.tokens), best.tokens, [self.vocab.words[t] for t in best.tokens],
                       best.score, best.attention, [(self.vocab.decode(h.tokens), h.score) for h in hyps],
                       dict(timings), tags)
