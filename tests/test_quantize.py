"""edgecap.export.quantize on tiny real torch exports: static int8 encoder, weight-only int8 decoder, fp16."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgecap.export.quantize import convert_fp16, quantize_decoder_weights, quantize_encoder_static  # noqa: E402

nn, F = torch.nn, torch.nn.functional
VOCAB, EMBED, HIDDEN = 50, 16, 32


class TinyEncoder(nn.Module):
    """Four stride-2 Conv+BN+ReLU: [N,3,64,64] -> regions [N,16,C], pooled [N,C]."""

    def __init__(self, channels: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (16, 32, channels, channels):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)

    def forward(self, image):
        regions = self.body(image).flatten(2).transpose(1, 2)
        return regions, regions.mean(1)


class TinyStep(nn.Module):
    """Embedding + LSTMCell (or a one-step nn.LSTM) + Linear + log_softmax."""

    def __init__(self, cell: str):
        super().__init__()
        self.embed, self.out = nn.Embedding(VOCAB, EMBED), nn.Linear(HIDDEN, VOCAB)
        self.rnn = nn.LSTMCell(EMBED, HIDDEN) if cell == "lstmcell" else nn.LSTM(EMBED, HIDDEN)

    def forward(self, word, h, c):
        x = self.embed(word)
        if isinstance(self.rnn, nn.LSTMCell):
            h, c = self.rnn(x, (h, c))
        else:
            _, (h, c) = self.rnn(x[None], (h[None], c[None]))
            h, c = h[0], c[0]
        return F.log_softmax(self.out(h), -1), h, c


def export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path, seed: int = 0):
    torch.manual_seed(seed)
    for m in module.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs})
    return path


def make_encoder(path, seed: int = 0):
    torch.manual_seed(seed)
    return export(TinyEncoder(), (torch.randn(2, 3, 64, 64),), ["image"], ["regions", "pooled"], path, seed)


def images(n_batches: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 3, 64, 64)).astype(np.float32) for _ in range(n_batches)]


def run(path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("enc") / "encoder.onnx")


@pytest.mark.parametrize("fmt, activations, marker", [("qdq", "uint8", "DequantizeLinear"),
                                                      ("qoperator", "uint8", "QLinearConv"),
                                                      ("qdq", "int8", "DequantizeLinear")])
def test_static_encoder_is_smaller_and_close(encoder, tmp_path, fmt, activations, marker):
    report = quantize_encoder_static(encoder, tmp_path / "q.onnx", images(4, seed=1), cache=tmp_path / "c.json",
                                     quant_format=fmt, activation_type=activations)
    print(f"\n{report.method}: {report.fp32_size_bytes} -> {report.size_bytes} bytes")
    assert report.size_bytes == report.path.stat().st_size < 0.5 * report.fp32_size_bytes
    assert {marker, "QuantizeLinear"} <= op_types(report.path) and "images" in report.method
    feed = {"image": images(1, seed=2)[0]}  # unseen images from the calibration distribution
    for want, got in zip(run(encoder, feed), run(report.path, feed)):
        assert got.shape == want.shape and cosine(want, got) > 0.98


def test_calibration_cache_is_written_reused_and_rejected_for_another_model(encoder, tmp_path):
    cache = tmp_path / "ranges.json"
    first = quantize_encoder_static(encoder, tmp_path / "a.onnx", images(2, seed=1), cache=cache)
    content = json.loads(cache.read_text())
    assert content["model_sha256"] == hashlib.sha256(encoder.read_bytes()).hexdigest()
    assert content["method"] == "minmax" and content["images"] == 8
    low, high = content["ranges"]["regions"]
    assert low <= 0 < high
    again = quantize_encoder_static(encoder, tmp_path / "b.onnx", [], cache=cache)
    assert again.path.read_bytes() == first.path.read_bytes() and "cached" in again.method
    with pytest.raises(ValueError, match="no calibration images"):  # cached ranges were computed with minmax
        quantize_encoder_static(encoder, tmp_path / "c.onnx", [], cache=cache, method="entropy")
    other = make_encoder(tmp_path / "other.onnx", seed=1)
    with pytest.raises(ValueError, match="no calibration images"):
        quantize_encoder_static(other, tmp_path / "d.onnx", iter(()), cache=cache)
    quantize_encoder_static(other, tmp_path / "d.onnx", images(1, seed=1), cache=cache)
    assert json.loads(cache.read_text())["model_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


@pytest.mark.parametrize("cell, quantized_ops", [("lstmcell", {"MatMulNBits"}),
                                                 ("lstm", {"MatMulNBits", "DynamicQuantizeLSTM"})])
def test_weight_only_decoder_is_smaller_and_agrees(tmp_path, cell, quantized_ops):
    torch.manual_seed(0)
    zeros = torch.zeros(2, HIDDEN)
    fp32 = export(TinyStep(cell), (torch.zeros(2, dtype=torch.long), zeros, zeros), ["word", "h", "c"],
                  ["logprobs", "h_next", "c_next"], tmp_path / "step.onnx")
    assert "MatMulNBits" not in op_types(quantize_decoder_weights(fp32, tmp_path / "small.onnx").path)  # all < 16384
    report = quantize_decoder_weights(fp32, tmp_path / "step.int8.onnx", block_size=16, min_weights=256)
    print(f"\n{cell}: {report.method}: {report.fp32_size_bytes} -> {report.size_bytes} bytes")
    assert report.size_bytes < 0.6 * report.fp32_size_bytes
    ops = op_types(report.path)
    assert quantized_ops <= ops and not ops & {"Gemm", "MatMul", "LSTM"}
    rng = np.random.default_rng(0)
    feed = {"word": rng.integers(0, VOCAB, 64), "h": rng.standard_normal((64, HIDDEN)).astype(np.float32),
            "c": rng.standard_normal((64, HIDDEN)).astype(np.float32)}
    (want, *want_state), (got, *got_state) = run(fp32, feed), run(report.path, feed)
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.95
    assert all(np.abs(w - g).max() < 0.05 for w, g in zip(want_state, got_state))


def test_fp16_keeps_float32_io_and_runs_on_cpu(encoder, tmp_path):
    report = convert_fp16(encoder, tmp_path / "encoder.fp16.onnx")
    assert report.size_bytes < 0.6 * report.fp32_size_bytes
    model = onnx.load(str(report.path))
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # ORT 1.32's CPU EP has no fp16 Conv kernel on x86: its InsertCastTransformer runs such nodes in float32.
    feed = {"image": images(1, seed=2)[0]}
    for want, got in zip(run(encoder, feed), run(report.path, feed)):
        assert got.dtype == np.float32 and np.abs(want - got).max() < 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("option, value", [("quant_format", "qlinear"), ("activation_type", "fp8"),
                                           ("weight_type", "int4"), ("method", "kl")])
def test_bad_options_name_the_allowed_values(encoder, tmp_path, option, value):
    with pytest.raises(ValueError, match=f"unknown {option} '{value}'.*choose from"):
        quantize_encoder_static(encoder, tmp_path / "q.onnx", images(1, seed=1), cache=tmp_path / "c.json",
                                **{option: value})
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("block_size", [8, 48])
def test_decoder_block_size_must_be_a_power_of_two(tmp_path, block_size):
    with pytest.raises(ValueError, match="power of two"):
        quantize_decoder_weights(tmp_path / "missing.onnx", tmp_path / "d.onnx", block_size=block_size)


def test_weight_only_quantizer_leaves_logging_alone(tmp_path):
    """ORT's MatMulNBits module calls logging.basicConfig(INFO) on import; a fresh process must stay quiet."""
    zeros = torch.zeros(2, HIDDEN)
    fp32 = export(TinyStep("lstmcell"), (torch.zeros(2, dtype=torch.long), zeros, zeros), ["word", "h", "c"],
                  ["logprobs", "h_next", "c_next"], tmp_path / "step.onnx")
    code = ("import logging, sys; from edgecap.export.quantize import quantize_decoder_weights; "
            "quantize_decoder_weights(sys.argv[1], sys.argv[2]); logging.getLogger('x').info('loud'); "
            "assert logging.getLogger().level == logging.WARNING")
    run_ = subprocess.run([sys.executable, "-c", code, str(fp32), str(tmp_path / "q.onnx")], capture_output=True,
                          text=True, timeout=120)
    assert run_.returncode == 0 and "INFO" not in run_.stderr and "loud" not in run_.stderr, run_.stderr[-2000:]


class PooledHead(nn.Module):
    """The tiny plain encoder's learned pool: Flatten -> Linear -> BatchNorm1d, left unfused in the graph."""

    def __init__(self):
        super().__init__()
        self.body, self.pool = TinyEncoder(), nn.Sequential(nn.Flatten(), nn.Linear(16 * 32, 32), nn.BatchNorm1d(32))

    def forward(self, image):
        regions, _ = self.body(image)
        return regions, self.pool(regions)


def test_batchnorm_scale_is_quantized_per_channel_without_a_warning(tmp_path, caplog):
    path = export(PooledHead(), (torch.randn(2, 3, 64, 64),), ["image"], ["regions", "pooled"], tmp_path / "e.onnx")
    assert "BatchNormalization" in op_types(path)
    with caplog.at_level("WARNING"):
        report = quantize_encoder_static(path, tmp_path / "q.onnx", images(2, seed=1), cache=tmp_path / "c.json")
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    graph = onnx.load(str(report.path)).graph
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    scale_dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == bn.input[1])
    assert {a.name: a.i for a in scale_dq.attribute}.get("axis") == 0  # one scale per channel
