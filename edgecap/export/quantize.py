"""Smaller, faster ONNX graphs with onnxruntime's own tools: static int8 encoder, weight-only int8 decoder, fp16.

Every path runs `quant_pre_process` (shape inference + ORT graph optimisation) first, as ORT recommends.
Static calibration ranges are kept in a JSON cache keyed by the fp32 model's sha256, so re-quantizing
(another format, another activation type) needs no calibration images.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorData,
    TensorsData,
    create_calibrator,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.onnx_model import ONNXModel
from onnxruntime.transformers.float16 import convert_float_to_float16

from ..runtime.console import choice_error
from ..runtime.manifest import sha256 as file_sha256

FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
_SHORT = {"uint8": "U8", "int8": "S8"}


@dataclass
class QuantReport:
    path: Path
    size_bytes: int
    fp32_size_bytes: int
    method: str  # e.g. "static QDQ U8S8 per-channel, MinMax, 64 images"


def _choose(kind: str, value: str, allowed: dict):
    """allowed[value], or a ValueError naming the allowed values."""
    if value not in allowed:
        raise choice_error(kind, value, list(allowed))
    return allowed[value]


def _report(out: Path, fp32: Path, method: str) -> QuantReport:
    return QuantReport(Path(out), Path(out).stat().st_size, Path(fp32).stat().st_size, method)


def _preprocess(fp32: Path, workdir: Path) -> Path:
    """ORT's quantization pre-processing (shape inference, optimisation) into a file under `workdir`."""
    pre = workdir / "preprocessed.onnx"
    quant_pre_process(str(fp32), str(pre))
    return pre


class _Batches(CalibrationDataReader):
    """Feeds float32 image batches to an ORT calibrator and counts the images."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str):
        self._batches, self._input_name, self.images = batches, input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def _calibrate(model: Path, calibration: Iterable[np.ndarray], input_name: str, method: CalibrationMethod,
               workdir: Path) -> tuple[dict[str, list[float]], int]:
    """Tensor name -> [low, high] over the calibration batches, and the number of images seen."""
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("no calibration images")
    reader = _Batches(itertools.chain([first], batches), input_name)
    calibrator = create_calibrator(model, augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=method)
    calibrator.collect_data(reader)
    ranges = {name: [np.asarray(v).item() for v in data.range_value]
              for name, data in calibrator.compute_data().items()}
    return ranges, reader.images


def _read_cache(cache: Path, sha256: str, method: str) -> dict | None:
    """The cache's content if it was computed for this exact fp32 model with this method, else None."""
    if not cache.is_file():
        return None
    content = json.loads(cache.read_text())
    return content if (content.get("model_sha256"), content.get("method")) == (sha256, method) else None


def quantize_encoder_static(fp32: Path, out: Path, calibration: Iterable[np.ndarray], *, cache: Path,
                            input_name: str = "image", quant_format: str = "qdq", activation_type: str = "uint8",
                            weight_type: str = "int8", per_channel: bool = True,
                            method: str = "minmax") -> QuantReport:
    """Static int8 encoder; defaults (QDQ, uint8 activations, per-channel int8 weights) are the fastest on x86.

    `calibration` yields preprocessed float32 batches [n,3,S,S]; it may be empty when `cache` holds ranges
    computed for this fp32 model (same sha256) with this `method`. Fresh ranges are written to `cache`.
    """
    fmt = _choose("quant_format", quant_format, FORMATS)
    activations = _choose("activation_type", activation_type, TYPES)
    weights = _choose("weight_type", weight_type, TYPES)
    calibrate_method = _choose("method", method, METHODS)
    fp32, out, cache = Path(fp32), Path(out), Path(cache)
    sha256 = file_sha256(fp32)
    with tempfile.TemporaryDirectory(prefix="edgecap-quant-") as tmp:
        workdir = Path(tmp)
        pre = _preprocess(fp32, workdir)
        content = _read_cache(cache, sha256, method)
        source = "cached ranges of {images} images" if content else "{images} images"
        if content is None:
            ranges, images = _calibrate(pre, calibration, input_name, calibrate_method, workdir)
            content = {"model_sha256": sha256, "method": method, "images": images, "ranges": ranges}
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(content, indent=1))
        # quantize_static (1.32) takes stored ranges only through its own calibration-cache file, read when no
        # data reader is given: write our ranges in that format (TensorsData JSON) and point it there.
        ort_cache = workdir / "ort_ranges.json"
        save_tensors_data(TensorsData(calibrate_method, {
            name: TensorData(lowest=np.float32(low), highest=np.float32(high))
            for name, (low, high) in content["ranges"].items()}), ort_cache)
        out.parent.mkdir(parents=True, exist_ok=True)
        # A BatchNormalization left unfused (the tiny plain encoder's pool) has a 1-D scale: its channels are
        # axis 0, not ORT's default axis 1 (which logs a warning and falls back to one scale). 7-bit weights
        # (reduce_range): without VNNI (AVX2 only) ORT's uint8 x int8 kernels saturate full 8-bit products; on an
        # AMD EPYC with AVX2 only the tiny plain model's int8 captions matched fp32 on 13/16 with 8 bits, 15/16 with 7.
        quantize_static(pre, out, None, quant_format=fmt, per_channel=per_channel, activation_type=activations,
                        weight_type=weights, calibrate_method=calibrate_method, calibration_cache_path=ort_cache,
                        extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}}, reduce_range=True)
    granularity = "per-channel" if per_channel else "per-tensor"
    return _report(out, fp32, f"static {fmt.name} {_SHORT[activation_type]}{_SHORT[weight_type]} {granularity}, "
                              f"{calibrate_method.name}, {source.format(images=content['images'])}")


def _nbits_quantizer():
    """ORT's MatMulNBits quantizer module. Its import calls logging.basicConfig(level=INFO), which would print
    every INFO line of every library in the process: put the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from onnxruntime.quantization import matmul_nbits_quantizer
    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


def _small_matmuls(model: ONNXModel, min_weights: int) -> list[str]:
    """MatMul nodes whose constant weight has fewer than `min_weights` elements."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.initializer()}
    return [n.name for n in model.nodes() if n.op_type == "MatMul" and sizes.get(n.input[1], min_weights) < min_weights]


def quantize_decoder_weights(fp32: Path, out: Path, *, block_size: int = 32, min_weights: int = 16384) -> QuantReport:
    """Weight-only int8 decoder: every MatMul/Gemm weight in blocks of `block_size` with its own scale.

    ORT's MatMulNBits (8 bits, accuracy level 4) keeps activations in float between nodes and quantizes them
    per block inside the int8 kernel. Measured on the Flickr8k attention decoder: half the per-word
    log-probability error of dynamic (per-tensor) quantization, as fast for one row, slower for several
    (benchmarks/README.md: decoder step against rows). Weights with fewer than
    `min_weights` elements stay float: on the attention score's 256x1 MatMulNBits took longer than the fp32
    MatMul. An ONNX LSTM node (the Show-and-Tell decoder) has no MatMul to rewrite; it gets ORT's
    DynamicQuantizeLSTM with 7-bit weights (reduce_range): on a CPU without VNNI (AVX2 only) ORT's uint8 x int8
    kernel saturates full 8-bit products, which changed a small LSTM's next word on 8% of rows (an AMD EPYC
    with AVX2 only) against under 5% with 7 bits.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, not {block_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecap-quant-") as tmp:
        model = ONNXModel(onnx.load(str(_preprocess(Path(fp32), Path(tmp)))))
        model.replace_gemm_with_matmul()  # MatMulNBits rewrites MatMul only
        nbits = _nbits_quantizer()
        quantizer = nbits.MatMulNBitsQuantizer(model.model, nodes_to_exclude=_small_matmuls(model, min_weights),
                                               algo_config=nbits.DefaultWeightOnlyQuantConfig(
                                                   block_size=block_size, is_symmetric=True, accuracy_level=4,
                                                   bits=8))
        quantizer.process()
        lstm = any(node.op_type == "LSTM" for node in quantizer.model.model.graph.node)
        if lstm:
            weights_only = Path(tmp) / "weights_only.onnx"
            quantizer.model.save_model_to_file(str(weights_only))
            quantize_dynamic(weights_only, out, op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8,
                             reduce_range=True)
        else:
            quantizer.model.save_model_to_file(str(out))
    return _report(out, fp32, f"weight-only int8 (MatMulNBits, blocks of {block_size}, int8 compute)"
                              + (", LSTM dynamic int8" if lstm else ""))


def convert_fp16(fp32: Path, out: Path) -> QuantReport:
    """float16 weights and compute; graph inputs and outputs stay float32 (keep_io_types)."""
    model = convert_float_to_float16(str(fp32), keep_io_types=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return _report(out, fp32, "float16 weights and compute, float32 inputs/outputs")
