"""Training data: splits of (image, captions) from files or the synthetic task, as PyTorch datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from edgecap.runtime.preprocess import Preprocessing, read_rgb
from edgecap.runtime.vocab import Vocabulary

from .datasets import ImageCaptions, load_corpus
from .synthetic import SyntheticSplit


class Split(Protocol):
    """A list of images with their reference captions."""

    name: str

    def __len__(self) -> int: ...
    def image(self, i: int) -> np.ndarray: ...
    def captions(self, i: int) -> list[str]: ...
    def key(self, i: int) -> str: ...


class FileSplit:
    """Images on disk with captions from a loaded corpus."""

    def __init__(self, name: str, items: list[ImageCaptions], root: Path):
        self.name, self.items, self.root = name, items, root

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        return read_rgb(self.items[i].image)

    def captions(self, i: int) -> list[str]:
        return self.items[i].captions

    def key(self, i: int) -> str:
        """The image's path relative to the data set (unique where file names repeat across folders)."""
        return os.path.relpath(self.items[i].image, self.root)


class Head:
    """The first `n` images of a split (quick experiments on a slice of a big data set)."""

    def __init__(self, split: Split, n: int):
        self.split, self.n, self.name = split, min(n, len(split)), split.name

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> np.ndarray:
        return self.split.image(i)

    def captions(self, i: int) -> list[str]:
        return self.split.captions(i)

    def key(self, i: int) -> str:
        return self.split.key(i)


def open_splits(data: str, *, layout: str | None = None, on_missing: str = "error", seed: int = 0,
                image_size: int | None = None, synthetic_sizes: dict[str, int] | None = None
                ) -> tuple[dict[str, Split], str]:
    """`synthetic` or a data set path -> ({"train", "dev", "test"}: Split, one-line description)."""
    if data == "synthetic":
        sizes = synthetic_sizes or {}
        splits = {s: SyntheticSplit(s, sizes.get(s), seed, image_size) for s in ("train", "dev", "test")}
        desc = "synthetic shapes: " + ", ".join(f"{len(v)} {k}" for k, v in splits.items())
        return splits, desc
    corpus = load_corpus(Path(data), layout=layout, on_missing=on_missing)
    name = Path(data).name
    return ({s: FileSplit(f"{name}/{s}", items, corpus.root) for s, items in corpus.splits.items()},
            corpus.summary())


def caption_ids(vocab: Vocabulary, caption: str, max_len: int) -> list[int]:
    """Word ids of a caption, cut to `max_len` words, followed by <end>."""
    return vocab.encode(caption)[:max_len] + [vocab.end_id]


class SplitImages(Dataset):
    """Each image of a split with its index; the image side is a cached feature row or a fresh image."""

    def __init__(self, split: Split, preprocess: Preprocessing, features: torch.Tensor | None = None,
                 augment: bool = False):
        self.split, self.preprocess, self.features = split, preprocess, features
        self.augment = v2.Compose([
            v2.RandomResizedCrop(preprocess.size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.ColorJitter(0.2, 0.2, 0.2),
        ]) if augment and features is None else None

    def __len__(self) -> int:
        return len(self.split)

    def input(self, i: int) -> torch.Tensor:
        """Image i's cached regions [R, D] or preprocessed pixels [3, S, S]."""
        if self.features is not None:
            return self.features[i].float()
        rgb = self.split.image(i)
        if self.augment is not None:
            rgb = self.augment(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        return torch.from_numpy(self.preprocess(rgb))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.input(i), i


class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split, the image side as `SplitImages` gives it."""

    def __init__(self, split: Split, vocab: Vocabulary, max_len: int, preprocess: Preprocessing,
                 features: torch.Tensor | None = None, augment: bool = False):
        self.images = SplitImages(split, preprocess, features, augment)
        self.pairs = [(i, caption_ids(vocab, cap, max_len)) for i in range(len(split)) for cap in split.captions(i)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, list[int]]:
        i, ids = self.pairs[k]
        return self.images.input(i), ids


def collate(batch: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> inputs [B, ...], words [B, T] (<start> + caption), targets [B, T] (caption + <end>, 0-padded)."""
    x = torch.stack([b[0] for b in batch])
    t = max(len(b[1]) for b in batch)
    words = torch.zeros(len(batch), t, dtype=torch.long)
    targets = torch.zeros(len(batch), t, dtype=torch.long)
    for row, (_, ids) in enumerate(batch):
        targets[row, : len(ids)] = torch.tensor(ids)
        words[row, 0] = Vocabulary.start_id
        words[row, 1: len(ids)] = torch.tensor(ids[:-1])
    return x, words, targets
