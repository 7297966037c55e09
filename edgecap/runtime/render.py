"""Pictures with OpenCV only: a caption drawn on a frame, and the Show-Attend-Tell attention figure."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np


def draw_caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """A copy of the image with the caption on a dark band along the bottom."""
    img = np.ascontiguousarray(rgb).copy()
    h, w = img.shape[:2]
    scale = max(0.4, w / 900)
    thickness = max(1, round(scale * 2))
    (_, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    band = th + base + 10
    img[h - band:] = (img[h - band:] * 0.35).astype(np.uint8)
    cv2.putText(img, text, (6, h - base - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return img


def attention_overlay(rgb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The image blended with one word's attention [R] (a square grid), upsampled smoothly."""
    side = math.isqrt(weights.size)
    if side * side != weights.size:
        raise ValueError(f"attention over {weights.size} regions is not a square grid")
    h, w = rgb.shape[:2]
    grid = weights.reshape(side, side).astype(np.float32)
    grid = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)
    heat = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    color = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (0.5 * rgb + 0.5 * color).astype(np.uint8)


def attention_figure(rgb: np.ndarray, words: list[str], attention: np.ndarray, tile: int = 160,
                     columns: int = 5) -> np.ndarray:
    """The classic figure: the image, then one tile per word with its attention map and the word."""
    base = cv2.resize(rgb, (tile, tile), interpolation=cv2.INTER_AREA)
    tiles = [_label(base, "(image)")]
    tiles += [_label(attention_overlay(base, a), word) for word, a in zip(words, attention)]
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * (tile + 24), columns * tile, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet[r * (tile + 24): (r + 1) * (tile + 24), c * tile: (c + 1) * tile] = t
    return sheet


def _label(img: np.ndarray, word: str) -> np.ndarray:
    """Tile with a white strip below it holding `word`."""
    strip = np.full((24, img.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, word, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, strip], 0)


def save_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB image in the format its extension names; OSError saying why when it cannot."""
    path = Path(path)
    try:
        ok, data = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"could not write image {path}: no image format has the extension {path.suffix!r}")
    try:
        path.write_bytes(data.tobytes())
    except OSError as e:
        raise OSError(f"could not write image {path}: {e.strerror}") from None
