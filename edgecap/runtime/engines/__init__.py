"""The backend table: every engine's name, the class that runs it, its devices and its precisions.

This table alone drives `make_engine`, every command's --engine/--device/--precision choices and their
errors, the latency benchmark's variants and the tests. Adding an engine is one module with an `Engine`
subclass that has an `open` classmethod, and one row here. Engine classes are imported when first used,
so the runtime never imports torch unless the `torch` engine is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..console import choice_error
from ..engine import Engine
from ..errors import ModelError
from ..manifest import PRECISIONS

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@dataclass(frozen=True)
class Backend:
    """One engine: where its class lives, what it reads, and device -> ONNX Runtime providers (best first)."""

    engine_class: str                        # "module:Class"
    reads: str                               # "model folder" (export-onnx) or "checkpoint" (caption-train)
    devices: dict[str, tuple[str, ...]]      # the first device is the default
    precisions: tuple[str, ...]
    install: str                             # what to install when its class cannot be imported

    def load_class(self) -> type[Engine]:
        module, name = self.engine_class.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise ModelError(f"this engine needs {self.install} ({e})") from None


BACKENDS: dict[str, Backend] = {
    "ort": Backend("edgecap.runtime.engines.ort:OrtEngine", "model folder",
                   {"cpu": (CPU,), "cuda": (CUDA, CPU)}, PRECISIONS, "onnxruntime (or onnxruntime-gpu for CUDA)"),
    "trt": Backend("edgecap.runtime.engines.ort:OrtEngine", "model folder",
                   {"cuda": (TENSORRT, CUDA, CPU)}, PRECISIONS, "onnxruntime-gpu built with TensorRT"),
    "torch": Backend("edgecap.train.engine:TorchEngine", "checkpoint", {"cpu": (), "cuda": ()}, ("fp32",),
                     "PyTorch (pip install 'edgecap[train]')"),
}
RUNTIME_ENGINES = tuple(n for n, b in BACKENDS.items() if b.reads == "model folder")  # torch-free engines
DEVICES = tuple(dict.fromkeys(d for b in BACKENDS.values() for d in b.devices))


def check_choices(engine: str, device: str | None = None, precision: str | None = None,
                  engines: Sequence[str] = tuple(BACKENDS)) -> Backend:
    """One-line "did you mean" errors for an engine, device and precision the table does not pair."""
    if engine not in engines:
        raise choice_error("engine", engine, list(engines))
    b = BACKENDS[engine]
    if device is not None and device not in b.devices:
        raise choice_error(f"device for --engine {engine}", device, list(b.devices))
    if precision is not None and precision not in b.precisions:
        raise choice_error(f"precision for --engine {engine}", precision, list(b.precisions))
    return b


def make_engine(name: str, source: str | Path, precision: str = "fp32", device: str | None = None,
                threads: int | None = None, **options: object) -> Engine:
    """The named engine over a model folder or checkpoint (per its row), on `device` (default: the row's first)."""
    b = check_choices(name, device, precision)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive whole number, got {threads!r}")
    device = device or next(iter(b.devices))
    return b.load_class().open(Path(source), precision=precision, device=device, providers=b.devices[device],
                               threads=threads, **options)
