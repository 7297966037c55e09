"""Checkpoints: one file with weights, config, vocabulary, optimizer state and metrics.

Written atomically (temporary file, fsync, rename), read with `torch.load(weights_only=True)`. A killed
write's temporary file is removed by the next write of the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import edgecap
from edgecap.runtime.errors import ModelError
from edgecap.runtime.files import atomic_write
from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.vocab import Vocabulary

from .model import CaptionModel, ModelConfig
from .safe_load import load_torch_file

FORMAT = "edgecap-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus format tags) so that a kill at any moment leaves the old file or the new one."""
    atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION,
                 "versions": {"edgecap": edgecap.__version__, "torch": str(torch.__version__)}, **payload}, path)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file, fsync and rename: a kill leaves the old file or the new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a one-line ModelError."""
    path = Path(path)
    ckpt = load_torch_file(path, "edgecap checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{path} is not an edgecap checkpoint")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{path} has checkpoint format {version}; this edgecap reads up to {FORMAT_VERSION} "
                         "(upgrade edgecap)")
    for key in ("model_config", "vocab", "preprocessing", "model"):
        if key not in ckpt:
            raise ModelError(f"{path} lacks {key!r}")
    return ckpt


def checkpoint_model_config(ckpt: dict[str, Any]) -> ModelConfig:
    """The model settings a checkpoint was trained with, as recorded (building a model never loads weights:
    they come from the checkpoint itself)."""
    return ModelConfig.from_dict(ckpt["model_config"])


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[CaptionModel, Vocabulary, Preprocessing]:
    """Rebuild the model (in eval mode), vocabulary and preprocessing a checkpoint describes."""
    cfg = checkpoint_model_config(ckpt)
    vocab = Vocabulary(ckpt["vocab"])
    if cfg.vocab_size != len(vocab):
        raise ModelError(f"checkpoint vocabulary has {len(vocab)} words but the model expects {cfg.vocab_size}")
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    model = CaptionModel(cfg, pre.size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ModelError(f"checkpoint weights do not fit its model config: {str(e).splitlines()[0]}") from None
    return model.eval(), vocab, pre
