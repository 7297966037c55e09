"""The PyTorch reference engine: the checkpoint's own modules behind the runtime's Engine interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edgecap.runtime.engine import Arrays, Engine, StepOutput
from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.vocab import Vocabulary

from .checkpoint import load_checkpoint, model_from_checkpoint
from .model import CaptionModel


class TorchEngine(Engine):
    """Runs a CaptionModel eagerly; the same search code as every deployed engine drives it."""

    def __init__(self, model: CaptionModel, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)
        self.context_names = model.decoder.context_names
        self.vocabulary: Vocabulary | None = None      # set by from_checkpoint
        self.preprocess: Preprocessing | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | dict, device: str = "cpu", threads: int | None = None
                        ) -> "TorchEngine":
        """The one way evaluation, export verification and benchmarks run a checkpoint (a path, or one that
        `load_checkpoint` has read)."""
        if threads:
            torch.set_num_threads(threads)
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        model, vocab, pre = model_from_checkpoint(ckpt)
        engine = cls(model.to(device), device)
        engine.vocabulary, engine.preprocess = vocab, pre
        return engine

    @classmethod
    def open(cls, path: Path, *, precision: str, device: str, providers: Sequence[str], threads: int | None
             ) -> "TorchEngine":
        """The backend table's entry point (row `torch`): PyTorch runs fp32 checkpoints."""
        return cls.from_checkpoint(path, device, threads)

    def _tensors(self, arrays) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> Arrays:
        regions, pooled = self.model.encoder(*self._tensors([images]))
        return {"regions": regions.float().cpu().numpy(), "pooled": pooled.float().cpu().numpy()}

    @torch.inference_mode()
    def init(self, features: Arrays) -> Arrays:
        dec = self.model.decoder
        outs = dec.init(*self._tensors([features[dec.init_input]]))
        return {name: t.cpu().numpy() for name, t in zip(dec.init_outputs, outs)}

    @torch.inference_mode()
    def step(self, words: np.ndarray, state: Arrays, context: Arrays) -> StepOutput:
        dec = self.model.decoder
        inputs = self._tensors([words, state["h"], state["c"], *(context[n] for n in self.context_names)])
        logprobs, h, c, *alpha = dec.step(*inputs)
        return StepOutput(logprobs.cpu().numpy(), {"h": h.cpu().numpy(), "c": c.cpu().numpy()},
                          alpha[0].cpu().numpy() if alpha else None)
