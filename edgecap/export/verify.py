"""Export must prove itself: graph checks, per-output differences against PyTorch, and whole captions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgecap.runtime.decode import decode
from edgecap.runtime.engine import Engine
from edgecap.runtime.errors import ModelError
from edgecap.runtime.search import SearchOptions


@dataclass
class OutputCheck:
    """One output of one graph on one input set, as the validation report prints it."""

    graph: str
    output: str
    inputs: str
    shape: tuple[int, ...]
    max_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        return (f"  {mark} {self.graph:<13} {self.output:<9} {self.inputs:<7} shape {str(self.shape):<16} "
                f"max |diff| {self.max_diff:.2e} (tolerance {self.tolerance:.0e})")


def check_graph(path: Path) -> None:
    """onnx.checker full check (with strict shape inference); failure is a ModelError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"{path.name} fails the ONNX checker: {str(e).strip().splitlines()[0][:200]}") from None


def compare_graphs(ref: Engine, test: Engine, images: np.ndarray, label: str, atol: float,
                   vocab_size: int, seed: int = 0) -> list[OutputCheck]:
    """Feed both engines the same inputs graph by graph; tolerance scales with each output's magnitude."""
    rows: list[OutputCheck] = []

    def add(graph: str, want: dict, got: dict) -> None:
        for name, a in want.items():
            if a is None:
                continue
            b = got[name]
            diff = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("inf")
            rows.append(OutputCheck(graph, name, label, tuple(b.shape), diff, atol * max(1.0, float(np.abs(a).max()))))

    feats = ref.encode(images)
    add("encoder", feats, test.encode(images))
    add("decoder_init", ref.init(feats), test.init(feats))
    state, context = ref.prepare(feats)
    words = np.random.default_rng(seed).integers(4, vocab_size, len(images))
    want, got = ref.step(words, state, context), test.step(words, state, context)
    add("decoder_step", {"logprobs": want.logprobs, **want.state, "alpha": want.attention},
        {"logprobs": got.logprobs, **got.state, "alpha": got.attention})
    return rows


def compare_captions(a: Engine, b: Engine, images: np.ndarray, opts: SearchOptions
                     ) -> tuple[list[list[int]], list[list[int]], int]:
    """Both engines' best captions and how many of them are token-identical."""
    want, got = caption_tokens(a, images, opts), caption_tokens(b, images, opts)
    return want, got, sum(x == y for x, y in zip(want, got))


def caption_tokens(engine: Engine, images: np.ndarray, opts: SearchOptions, batch: int = 16) -> list[list[int]]:
    """Best caption's tokens for every image."""
    return [h[0].tokens for h in decode(engine, images, opts, batch_size=batch)]
