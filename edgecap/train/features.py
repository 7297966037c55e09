"""Frozen-encoder feature cache: every image of a split encoded once, kept on disk (OUTPUT/cache or --cache-dir).

Encoding runs through ONNX Runtime (the encoder exported to a temporary graph), which is several times faster
than PyTorch eager on a CPU (EfficientNet-Lite0, 1 thread: ~9 ms against ~30 ms per image); the first batch is
checked against PyTorch, and PyTorch does the work where the export or that check fails.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from edgecap.runtime.preprocess import Preprocessing

from .checkpoint import atomic_save
from .data import Split
from .model import Encoder

BATCH = 32
ORT_TOLERANCE = 1e-3  # max |ORT - PyTorch| relative to the features' magnitude on the first batch


def _torch_encoder(encoder: Encoder, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return encoder(torch.from_numpy(images).to(device))[0].float().cpu().numpy()
    return run


def _ort_encoder(encoder: Encoder, size: int, workdir: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The encoder's regions output as an ONNX Runtime session (exported with a dynamic batch axis)."""
    path = workdir / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(encoder.eval(), (torch.zeros(1, 3, size, size),), str(path), input_names=["image"],
                          output_names=["regions", "pooled"], dynamic_axes={"image": {0: "batch"}},
                          opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["regions"], {"image": images})[0]


def _encoder_fn(encoder: Encoder, pre: Preprocessing, device: torch.device, first: np.ndarray,
                workdir: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """ONNX Runtime on a CPU when it agrees with PyTorch on `first`, else PyTorch; -> (encode, its name)."""
    reference = _torch_encoder(encoder, device)
    if device.type != "cpu":
        return reference, "PyTorch"
    try:
        fast = _ort_encoder(encoder, pre.size, workdir, torch.get_num_threads())
        want, got = reference(first), fast(first)
        diff = float(np.abs(want - got).max()) / max(1.0, float(np.abs(want).max()))
    except Exception as e:  # an export or ORT failure only costs speed
        print(f"feature cache: ONNX Runtime unavailable ({type(e).__name__}: {str(e)[:120]}); using PyTorch",
              file=sys.stderr)
        return reference, "PyTorch"
    if diff > ORT_TOLERANCE:
        print(f"feature cache: ONNX Runtime differs from PyTorch by {diff:.1e}; using PyTorch", file=sys.stderr)
        return reference, "PyTorch"
    return fast, "ONNX Runtime"


def encode_split(encoder: Encoder, split: Split, pre: Preprocessing, device: torch.device,
                 limit: int | None, desc: str) -> torch.Tensor:
    """Regions of the first `limit` images (all by default), float16 [N, R, D], with a progress bar."""
    n = len(split) if limit is None else min(limit, len(split))
    encoder.eval()
    with tempfile.TemporaryDirectory(prefix="edgecap-features-") as tmp:
        run, name = None, ""
        rows = []
        for lo in tqdm(range(0, n, BATCH), desc=desc, unit="batch", disable=None, leave=False):
            images = pre.batch([split.image(i) for i in range(lo, min(lo + BATCH, n))])
            if run is None:
                run, name = _encoder_fn(encoder, pre, device, images, Path(tmp))
                print(f"{desc}: {n} images through {name}", flush=True)
            rows.append(torch.from_numpy(run(images)).half())
    return torch.cat(rows)


def cached_features(encoder: Encoder, split: Split, pre: Preprocessing, device: torch.device, main: bool,
                    cache_dir: Path, source: str, limit: int | None = None) -> Path:
    """The path of a split's cached features, computing them first (on the main process) when missing.

    The file name holds a digest of the data (`source`: where it came from and its seed; the split's image
    keys), the preprocessing and the encoder's weights, so runs may share a cache folder and a changed encoder
    or data set never reuses stale features.
    """
    n = len(split) if limit is None else min(limit, len(split))
    digest = hashlib.sha1(json.dumps([source, split.name, n, pre.to_dict(),
                                      [split.key(i) for i in range(n)]]).encode())
    for name, t in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.cpu().numpy().tobytes())
    path = cache_dir / f"{split.name.replace('/', '_')}-{digest.hexdigest()[:12]}.pt"
    if main and not path.exists():
        atomic_save(encode_split(encoder, split, pre, device, limit, f"encode {split.name}"), path)
    return path
