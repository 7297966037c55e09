"""Encoder (a backbone from the encoder registry) and the two LSTM decoders, with one single-step contract.

Every decoder exposes:
  init(features)                      -> (h, c, *context)          once per image
  step(word, h, c, *context)          -> (logprobs, h, c[, alpha])  once per word
`context_names` says which named arrays `step` reads after h and c; the exporter and every runtime
engine use exactly these two functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgecap.runtime.console import choice_error
from edgecap.runtime.errors import ModelError

from .encoders import build_body, encoder_spec, load_pretrained

DECODERS = ("plain", "attention")


@dataclass
class ModelConfig:
    """What a checkpoint's network is. The input size is not here: it lives in the preprocessing spec."""

    decoder: str = "attention"
    encoder: str | None = None          # registry name (None: the trainer picks tiny for synthetic data,
    encoder_weights: str | None = None  # efficientnet-lite0 otherwise); weights: imagenet | none | PATH
    finetune_blocks: int = 0            # trainable last stages of a pretrained backbone (tiny without weights:
                                        # all of it, from scratch)
    vocab_size: int = 0
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise choice_error("decoder", self.decoder, DECODERS)
        if self.encoder is not None:
            spec = encoder_spec(self.encoder)
            if not 0 <= self.finetune_blocks <= spec.stages:
                raise ValueError(f"finetune_blocks must be 0-{spec.stages} for {self.encoder}, "
                                 f"got {self.finetune_blocks}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k != "image_size"}  # checkpoints of edgecap 0.1 kept a copy here
        unknown = set(d) - names
        if unknown:
            raise ModelError(f"checkpoint has unknown model settings {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    """Image [B, 3, S, S] -> regions [B, R, D] and pooled [B, D]; the backbone is a row of the encoder registry.

    Built with random weights; `load_pretrained` (or a checkpoint) fills them in. A backbone with pretrained
    `weights` is frozen but for its last `finetune_blocks` stages; tiny without weights learns from scratch.
    """

    def __init__(self, name: str = "resnet50", finetune_blocks: int = 0, image_size: int | None = None,
                 learned_pool: bool = False, weights: str | None = None):
        super().__init__()
        self.spec = encoder_spec(name)
        image_size = image_size or self.spec.preprocessing.size
        self.spec.check_size(name, image_size)
        self.name = name
        self.body = build_body(name)
        self.dim = self.spec.channels
        self.pool: nn.Module = _MeanPool()
        if not (self.spec.trained and weights in (None, "none")):  # pretrained: frozen but the last stages
            trainable = list(self.body.children())[len(self.body) - finetune_blocks:] if finetune_blocks else []
            for p in self.body.parameters():
                p.requires_grad = False
            for block in trainable:
                for p in block.parameters():
                    p.requires_grad = True
        if self.spec.trained and learned_pool:  # a pooled vector that keeps where things are ("left of")
            side = -(-image_size // self.spec.stride)
            self.pool = nn.Sequential(nn.Flatten(), nn.Linear(side * side * self.dim, self.dim),
                                      nn.BatchNorm1d(self.dim))

    def load_pretrained(self, source: str) -> str | None:
        """Weights from a registry source (imagenet), a state dict PATH, or none; -> the file's sha256."""
        return load_pretrained(self.body, self.name, source)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> "Encoder":
        """Frozen layers keep their BatchNorm statistics: only trainable children switch to training; a
        backbone whose train mode differs (EfficientNet-Lite's drop-connect) stays in eval mode."""
        super().train(mode)
        if self.spec.always_eval:
            self.body.eval()
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

    def __init__(self, cfg: ModelConfig, image_size: int | None = None):
        super().__init__()
        if cfg.vocab_size < 5:
            raise ValueError("vocab_size must be set from the vocabulary")
        if cfg.encoder is None:
            raise ValueError("ModelConfig.encoder must be set")
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, cfg.finetune_blocks, image_size, learned_pool=cfg.decoder == "plain",
                               weights=cfg.encoder_weights)
        self.image_size = image_size or self.encoder.spec.preprocessing.size
        decoder_cls = AttentionDecoder if cfg.decoder == "attention" else PlainDecoder
        self.decoder = decoder_cls(cfg, self.encoder.dim)

    def forward(self, images: Tensor, words: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.decoder(*self.encoder(images), words)
