"""The PyTorch reference engine: the checkpoint's own modules behind the runtime's Engine interface."""

from __future__ import annotations

import numpy as np
import torch

from edgecap.runtime.engine import Arrays, Engine, StepOutput

from .model import CaptionModel


class TorchEngine(Engine):
    """Runs a CaptionModel eagerly; the same search code as every deployed engine drives it."""

    def __init__(self, model: CaptionModel, device: str | torch.device = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.context_names = model.decoder.context_names

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
