"""Image preprocessing defined once: training, export checks and every runtime engine call this.

Contract (also written into each model folder's manifest): read as BGR uint8 with OpenCV, convert to RGB,
resize to `size`x`size` with `cv2.INTER_AREA` (aspect ratio not kept), scale to [0, 1], subtract `mean`,
divide by `std`, lay out as float32 NCHW.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the encoder's input tensor."""

    size: int = 224
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    resize: str = "area"
    layout: str = "NCHW"
    color: str = "RGB"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {"size", "mean", "std", "resize", "layout", "color"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        pre = cls(**d)
        if (pre.resize, pre.layout, pre.color) != ("area", "NCHW", "RGB"):
            raise ValueError(f"unsupported preprocessing {pre.resize}/{pre.layout}/{pre.color}")
        return pre

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """One RGB uint8 HxWx3 image -> float32 3xSxS."""
        return self.batch([rgb])[0]

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 HxWx3 images -> float32 Nx3xSxS."""
        out = np.empty((len(images), 3, self.size, self.size), np.float32)
        scale = 1.0 / (255.0 * np.asarray(self.std, np.float32))
        shift = np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3:
                raise DataError(f"expected an HxWx3 image, got shape {img.shape}")
            if img.shape[:2] != (self.size, self.size):
                img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
            for channel in range(3):  # HWC -> CHW one plane at a time: 10x faster than a float HWC transpose
                np.multiply(img[:, :, channel], scale[channel], out=out[i, channel], casting="unsafe")
                out[i, channel] -= shift[channel]
        return out


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8; a missing or unreadable file raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
    return decode_image(data, str(path))


def decode_image(data: bytes | bytearray | memoryview | np.ndarray | BinaryIO, name: str = "image") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) or a binary file-like object -> RGB uint8; DataError when undecodable."""
    if hasattr(data, "read"):
        data = data.read()
    if not isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        raise DataError(f"{name}: expected encoded image bytes or a binary file, got {type(data).__name__}")
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise DataError(f"not a readable image: {name}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
