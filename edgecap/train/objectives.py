"""Training objectives, each a module the trainer's one loop calls: a batch -> (loss, statistics for the progress
bar and the log). `cross-entropy` (teacher forcing over every caption) or `scst` (self-critical, `scst.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.search import SearchOptions
from edgecap.runtime.vocab import Vocabulary

from .data import CaptionPairs, Split, SplitImages, collate
from .model import CaptionModel
from .scst import SelfCritical, training_reward

OBJECTIVES = ("cross-entropy", "scst")


def caption_loss(logits: Tensor, alphas: Tensor | None, targets: Tensor, att_reg: float) -> tuple[Tensor, Tensor]:
    """Cross-entropy over real words (+ λ·Σ_regions (1 − Σ_t α)² for attention). -> (total, ce)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=Vocabulary.pad_id)
    if alphas is None or att_reg == 0:
        return ce, ce
    mask = (targets != Vocabulary.pad_id).unsqueeze(2).to(alphas.dtype)  # [B, T, 1]
    reg = ((1.0 - (alphas * mask).sum(1)) ** 2).mean()
    return ce + att_reg * reg, ce


class CrossEntropy(nn.Module):
    """Teacher forcing: images (or cached regions), input words, target words -> (loss, {"ce"})."""

    def __init__(self, model: CaptionModel, cached: bool, att_reg: float):
        super().__init__()
        self.model, self.cached, self.att_reg = model, cached, att_reg

    def forward(self, x: Tensor, words: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        regions, pooled = (x, self.model.encoder.pool(x)) if self.cached else self.model.encoder(x)
        logits, alphas = self.model.decoder(regions, pooled, words)
        loss, ce = caption_loss(logits, alphas, targets, self.att_reg)
        return loss, {"ce": ce.item()}


def make_objective(name: str, model: CaptionModel, cached: bool, split: Split, vocab: Vocabulary,
                   pre: Preprocessing, features: torch.Tensor | None, *, att_reg: float, max_len: int,
                   augment: bool, samples: int) -> tuple[nn.Module, Dataset, Callable | None]:
    """The objective's module, the training set it reads, and that set's collate function (None: PyTorch's)."""
    if name == "scst":  # one row per image: its samples are scored against all its references
        reward = training_reward(split)
        return (SelfCritical(model, cached, reward, vocab, samples, SearchOptions()),
                SplitImages(split, pre, features, augment), None)
    return CrossEntropy(model, cached, att_reg), CaptionPairs(split, vocab, max_len, pre, features, augment), collate
