"""A built-in captioning task generated from a seed: two coloured shapes at known places.

Every scene shows two shapes in different cells of a 7x7 grid (the encoder's region grid at the default
image size); its one caption comes from a small grammar, e.g. "a small red circle left of a large blue
square". The left shape is named first ("left of"); if both share a column, the upper one ("above").
Colours, shapes, sizes and places are drawn independently, so a model that does not look scores ~0.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

GRID = 7
SCENE_SIZE = 112  # pixels per side: the tiny encoder's input (its registry row reads it from here)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.45}  # radius as a fraction of a cell
SPLIT_SEEDS = {"train": 0, "dev": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "dev": 200, "test": 200}


@dataclass(frozen=True)
class Shape:
    size: str
    color: str
    shape: str
    row: int
    col: int

    @property
    def cell(self) -> int:
        """Index of the shape's region in the row-major GRID x GRID feature grid."""
        return self.row * GRID + self.col

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


class SyntheticSplit:
    """One split of synthetic scenes; scene i is a pure function of (seed, split, i)."""

    def __init__(self, split: str, n: int | None = None, seed: int = 0, image_size: int | None = None):
        """Scenes drawn at `image_size` pixels (default: SCENE_SIZE)."""
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}")
        self.name = f"synthetic/{split}"
        self.n = DEFAULT_SIZES[split] if n is None else n
        self.seed = (seed, SPLIT_SEEDS[split])
        self.image_size = image_size or SCENE_SIZE

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def scene(self, i: int) -> tuple[Shape, Shape]:
        """The two shapes of scene i, in caption order."""
        rng = np.random.default_rng([*self.seed, i])
        a, b = rng.choice(GRID * GRID, 2, replace=False)
        shapes = [Shape(str(rng.choice(list(SIZES))), str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                        int(cell // GRID), int(cell % GRID)) for cell in (a, b)]
        return tuple(sorted(shapes, key=lambda s: (s.col, s.row)))  # left first; same column: upper first

    def captions(self, i: int) -> list[str]:
        first, second = self.scene(i)
        relation = "left of" if first.col != second.col else "above"
        return [f"{first.phrase()} {relation} {second.phrase()}"]

    def image(self, i: int) -> np.ndarray:
        """RGB uint8 [S, S, 3]: a noisy grey background with the scene's two shapes."""
        rng = np.random.default_rng([*self.seed, i, 1])
        s = self.image_size
        img = rng.integers(100, 140, (s, s, 3), dtype=np.uint8)
        cell = s / GRID
        for shape in self.scene(i):
            cx, cy = (shape.col + 0.5) * cell, (shape.row + 0.5) * cell
            r = SIZES[shape.size] * cell
            color = COLORS[shape.color]
            if shape.shape == "circle":
                cv2.circle(img, (round(cx), round(cy)), round(r), color, -1, cv2.LINE_AA)
            elif shape.shape == "square":
                cv2.rectangle(img, (round(cx - r), round(cy - r)), (round(cx + r), round(cy + r)), color, -1)
            else:
                pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]]).round().astype(np.int32)
                cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
        return img
