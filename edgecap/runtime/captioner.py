"""Python API: `Captioner.load(model_dir, engine=..., precision=...).caption(image_or_path_or_batch)`.

A Captioner holds no per-call state: one instance may caption from several threads at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import decode
from .engine import Arrays, Engine
from .engines import RUNTIME_ENGINES, check_choices, make_engine
from .errors import DataError
from .manifest import Manifest
from .preprocess import MAX_PIXELS, check_size, decode_image, read_rgb
from .search import Hypothesis, SearchOptions

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA
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

    def to_dict(self, batch: int = 1) -> dict:
        """The JSON record of a caption (caption-run --json, serving): timings per image of a `batch`."""
        record = {"caption": self.text, "words": self.words, "score": self.score}
        if len(self.alternatives) > 1:
            record["alternatives"] = [{"caption": text, "score": s} for text, s in self.alternatives]
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
                 max_pixels: int = MAX_PIXELS):
        self.manifest, self.engine, self.options, self.precision = manifest, engine, options, precision
        self.max_pixels = max_pixels  # images over it are refused before decoding (ImageTooLarge)
        self.vocab = manifest.vocabulary
        self.preprocess = manifest.preprocessing

    @classmethod
    def load(cls, folder: str | Path | None = None, engine: str = "ort", precision: str | None = None,
             device: str | None = None, threads: int | None = None, max_pixels: int = MAX_PIXELS,
             **search: object) -> "Captioner":
        """A model folder (default: `model_dir(None)`, i.e. the bundled model when nothing else is set) on a
        runtime engine at `precision` (default: the folder's best, fp32 where it has it); encoded images over
        `max_pixels` are refused before decoding."""
        check_choices(engine, device, precision, RUNTIME_ENGINES)
        if max_pixels < 1:
            raise DataError(f"--max-pixels must be at least 1, got {max_pixels}")
        folder = model_dir(folder)
        manifest = Manifest.load(folder)
        options = SearchOptions.from_dict({**manifest.search.to_dict(), **search})
        precision = precision or manifest.default_precision
        return cls(manifest, make_engine(engine, folder, precision, device, threads, manifest=manifest), options,
                   precision, max_pixels)

    def caption(self, x, options: SearchOptions | None = None) -> Caption | list[Caption]:
        """An image (see `as_rgb`) -> Caption; a list of them -> list of Captions (one batch)."""
        if isinstance(x, (list, tuple)):
            if not x:
                raise DataError("caption() got an empty list of images")
            return self.caption_batch([as_rgb(i, self.max_pixels) for i in x], options)
        return self.caption_batch([as_rgb(x, self.max_pixels)], options)[0]

    def caption_batch(self, images: list[np.ndarray], options: SearchOptions | None = None) -> list[Caption]:
        """Caption RGB uint8 images in one batch; each Caption carries the batch's stage timings."""
        started = time.perf_counter()
        features, timings = self.encode(images)
        return self.describe(features, timings, options, started)

    def encode(self, images: list[np.ndarray]) -> tuple[Arrays, dict[str, float]]:
        """RGB uint8 images -> the encoder's features ({"regions", "pooled"}) and the stage timings so far."""
        t0 = time.perf_counter()
        tensor = self.preprocess.batch(images)
        t1 = time.perf_counter()
        features = self.engine.encode(tensor)
        return features, {"preprocess_ms": (t1 - t0) * 1e3, "encoder_ms": (time.perf_counter() - t1) * 1e3}

    def describe(self, features: Arrays, timings: dict[str, float] | None = None,
                 options: SearchOptions | None = None, started: float | None = None) -> list[Caption]:
        """Encoder features (`encode`) -> Captions, with `timings` and the decoder's; `total_ms` runs from
        `started` (a `time.perf_counter()`; default: the sum of the stages)."""
        timings = {"preprocess_ms": 0.0, "encoder_ms": 0.0, **(timings or {})}
        results = decode(self.engine, None, options or self.options, features=features, timings=timings)
        words = max(1, max(len(h[0].tokens) + 1 for h in results))
        timings["decoder_per_word_ms"] = timings["decoder_ms"] / words
        timings["total_ms"] = ((time.perf_counter() - started) * 1e3 if started is not None else
                               timings["preprocess_ms"] + timings["encoder_ms"] + timings["decoder_ms"])
        return [self._caption(hyps, timings) for hyps in results]

    def _caption(self, hyps: list[Hypothesis], timings: dict[str, float]) -> Caption:
        best = hyps[0]
        return Caption(self.vocab.decode(best.tokens), best.tokens, [self.vocab.words[t] for t in best.tokens],
                       best.score, best.attention, [(self.vocab.decode(h.tokens), h.score) for h in hyps],
                       dict(timings))
