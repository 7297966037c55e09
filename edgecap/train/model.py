"""Encoder (ResNet50 or a tiny CNN) and the two LSTM decoders, with one single-step contract.

Every decoder exposes:
  init(features)                      -> (h, c, *context)          once per image
  step(word, h, c, *context)          -> (logprobs, h, c[, alpha])  once per word
`context_names` says which named arrays `step` reads after h and c; the exporter and every runtime
engine use exactly these two functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from edgecap.runtime.errors import ModelError

ENCODERS = ("resnet50", "tiny")
DECODERS = ("plain", "attention")


@dataclass
class ModelConfig:
    decoder: str = "attention"
    encoder: str = "resnet50"
    encoder_weights: str = "none"    # imagenet | none | PATH to a state dict
    finetune_blocks: int = 0         # resnet50: trainable last stages (0-4); tiny is always trained
    image_size: int = 224
    vocab_size: int = 0
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose from {DECODERS}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose from {ENCODERS}")
        if not 0 <= self.finetune_blocks <= 4:
            raise ValueError(f"finetune_blocks must be 0-4 (ResNet50 stages), got {self.finetune_blocks}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelError(f"checkpoint has unknown model settings {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    """Image [B, 3, S, S] -> regions [B, R, D] and pooled [B, D] (R = 7x7 at 224 for ResNet50)."""

    def __init__(self, name: str = "resnet50", weights: str = "none", finetune_blocks: int = 0,
                 image_size: int = 224, learned_pool: bool = False):
        super().__init__()
        self.pool: nn.Module = _MeanPool()
        if name == "resnet50":
            net = torchvision.models.resnet50(weights=None)
            if weights != "none":
                net.load_state_dict(_resnet50_weights(weights))
            self.body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
            self.dim = 2048
            trainable = list(self.body.children())[len(self.body) - finetune_blocks:] if finetune_blocks else []
            for p in self.body.parameters():
                p.requires_grad = False
            for block in trainable:
                for p in block.parameters():
                    p.requires_grad = True
        else:  # a small CNN for tests, the demo and quick experiments: stride 16, 7x7 at 112
            widths = (3, 32, 64, 96, 128)
            self.body = nn.Sequential(*(Conv2dNormActivation(i, o, 3, stride=2)
                                        for i, o in zip(widths[:-1], widths[1:])))
            self.dim = widths[-1]
            side = -(-image_size // 16)
            if learned_pool:  # a pooled vector that keeps where things are (a mean would lose "left of")
                self.pool = nn.Sequential(nn.Flatten(), nn.Linear(side * side * self.dim, self.dim),
                                          nn.BatchNorm1d(self.dim))

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> "Encoder":
        """Frozen layers keep their BatchNorm statistics: only trainable children switch to training."""
        super().train(mode)
        for child in self.body.children():
            if not any(p.requires_grad for p in child.parameters()):
                child.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.body(images)                      # [B, D, h, w]
        regions = grid.flatten(2).transpose(1, 2)     # [B, h*w, D]
        return regions, self.pool(regions)            # [B, R, D], [B, D]


class _MeanPool(nn.Module):
    def forward(self, regions: Tensor) -> Tensor:
        return regions.mean(1)                        # [B, R, D] -> [B, D]


def _resnet50_weights(spec: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights (`imagenet`) or a local state dict file."""
    if spec == "imagenet":
        try:
            return torchvision.models.ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)
        except Exception as e:  # no network and no cached file
            raise ModelError(f"could not load torchvision's ImageNet ResNet50 weights ({type(e).__name__}); "
                             "download them where a network exists or pass --encoder-weights PATH") from None
    state = load_torch_file(spec, "encoder weights file (imagenet, none or a state dict)")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ModelError(f"{spec} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_torch_file(path: str | Path, what: str) -> Any:
    """torch.load(weights_only=True) of a file a user names: never runs pickled code; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = "holds objects other than weights" if "Unsupported global" in str(e) else type(e).__name__
        raise ModelError(f"{path} is not a readable {what} (truncated or corrupt?): {reason}") from None


class PlainDecoder(nn.Module):
    """Show and Tell: the projected pooled image vector is the LSTM's first input, then the words.

    The initial state is also computed from the image (as in Show, Attend and Tell); on the synthetic task
    this is what lets the plain model learn from scratch within a minute.
    """

    init_input = "pooled"
    init_outputs = ("h", "c")
    context_names: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, feature_dim: int):
        super().__init__()
        self.image_proj = nn.Sequential(nn.Linear(feature_dim, cfg.embed_dim), nn.LayerNorm(cfg.embed_dim))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.init_state = nn.Linear(feature_dim, 2 * cfg.hidden_dim)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def _state0(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        h, c = torch.tanh(self.init_state(pooled)).chunk(2, 1)   # [B, H] each
        return h[None].contiguous(), c[None].contiguous()        # [1, B, H]

    def init(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        _, (h, c) = self.lstm(self.image_proj(pooled)[:, None], self._state0(pooled))   # [1, B, H]
        return h[0], c[0]

    def step(self, word: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, (h, c) = self.lstm(self.embed(word)[:, None], (h[None], c[None]))  # out [B, 1, H]
        return F.log_softmax(self.fc(out[:, 0]), -1), h[0], c[0]

    def forward(self, regions: Tensor, pooled: Tensor, words: Tensor) -> tuple[Tensor, None]:
        """Teacher forcing: words [B, T] (<start> first) -> logits [B, T, V]."""
        x = torch.cat([self.image_proj(pooled)[:, None], self.embed(words)], 1)  # [B, 1+T, E]
        out, _ = self.lstm(x, self._state0(pooled))                              # [B, 1+T, H]
        return self.fc(self.dropout(out[:, 1:])), None


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell: soft attention over the regions, gated context, LSTMCell."""

    init_input = "regions"
    init_outputs = ("h", "c", "keys")
    context_names = ("regions", "keys")

    def __init__(self, cfg: ModelConfig, feature_dim: int):
        super().__init__()
        self.key_proj = nn.Linear(feature_dim, cfg.attention_dim)
        self.query_proj = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
        self.score = nn.Linear(cfg.attention_dim, 1)
        self.init_h = nn.Linear(feature_dim, cfg.hidden_dim)
        self.init_c = nn.Linear(feature_dim, cfg.hidden_dim)
        self.gate = nn.Linear(cfg.hidden_dim, feature_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.cell = nn.LSTMCell(cfg.embed_dim + feature_dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def init(self, regions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = regions.mean(1)                                       # [B, D]
        keys = self.key_proj(regions)                                # [B, R, A], once per image
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), keys

    def _advance(self, word: Tensor, h: Tensor, c: Tensor, regions: Tensor, keys: Tensor):
        energy = self.score(torch.tanh(keys + self.query_proj(h)[:, None])).squeeze(2)  # [B, R]
        alpha = energy.softmax(1)                                                        # [B, R]
        context = torch.bmm(alpha[:, None], regions).squeeze(1)                          # [B, D]
        gated = torch.sigmoid(self.gate(h)) * context
        h, c = self.cell(torch.cat([self.embed(word), gated], 1), (h, c))                # [B, H]
        return h, c, alpha

    def step(self, word: Tensor, h: Tensor, c: Tensor, regions: Tensor, keys: Tensor):
        h, c, alpha = self._advance(word, h, c, regions, keys)
        return F.log_softmax(self.fc(h), -1), h, c, alpha

    def forward(self, regions: Tensor, pooled: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: words [B, T] (<start> first) -> logits [B, T, V], alphas [B, T, R]."""
        h, c, keys = self.init(regions)
        logits, alphas = [], []
        for t in range(words.shape[1]):
            h, c, alpha = self._advance(words[:, t], h, c, regions, keys)
            logits.append(self.fc(self.dropout(h)))
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


class CaptionModel(nn.Module):
    """Encoder plus decoder; `forward` is teacher-forced training, `encoder`/`decoder` serve inference."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 5:
            raise ValueError("vocab_size must be set from the vocabulary")
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, cfg.encoder_weights, cfg.finetune_blocks, cfg.image_size,
                               learned_pool=cfg.decoder == "plain")
        decoder_cls = AttentionDecoder if cfg.decoder == "attention" else PlainDecoder
        self.decoder = decoder_cls(cfg, self.encoder.dim)

    def forward(self, images: Tensor, words: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.decoder(*self.encoder(images), words)
