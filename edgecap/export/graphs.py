"""Split a CaptionModel into the three ONNX graphs the runtime runs: encoder, decoder_init, decoder_step."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from edgecap.runtime.manifest import GraphSpec, TensorSpec, sha256
from edgecap.train.model import CaptionModel

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.UINT8: "uint8"}


@dataclass(frozen=True)
class GraphIO:
    """One graph's module, tensor names and example inputs."""

    role: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]


class _Encoder(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, image):
        return self.encoder(image)


class _Init(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, features):
        return self.decoder.init(features)


class _Step(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, word, h, c, *context):
        return self.decoder.step(word, h, c, *context)


def graph_ios(model: CaptionModel) -> list[GraphIO]:
    """The three graphs with their I/O names (the step's state outputs are h_next, c_next)."""
    dec = model.decoder
    step_out = ["logprobs", "h_next", "c_next"] + (["alpha"] if model.cfg.decoder == "attention" else [])
    return [GraphIO("encoder", _Encoder(model), ["image"], ["regions", "pooled"]),
            GraphIO("decoder_init", _Init(model), [dec.init_input], list(dec.init_outputs)),
            GraphIO("decoder_step", _Step(model), ["word", "h", "c", *dec.context_names], step_out)]


def example_inputs(model: CaptionModel, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of every graph, computed by running the model on random images."""
    size = model.image_size
    with torch.no_grad():
        image = torch.randn(batch, 3, size, size)
        regions, pooled = model.encoder(image)
        feats = {"regions": regions, "pooled": pooled}
        init = dict(zip(model.decoder.init_outputs, model.decoder.init(feats[model.decoder.init_input])))
    word = torch.full((batch,), 1, dtype=torch.long)
    return {"image": image, **feats, **init, "word": word}


def export_graph(io: GraphIO, inputs: dict[str, torch.Tensor], path: Path, opset: int,
                 metadata: dict[str, str]) -> GraphSpec:
    """Export one graph with a dynamic batch axis, stamp metadata, check it; -> its manifest entry."""
    args = tuple(inputs[n] for n in io.inputs)
    axes = {n: {0: "batch"} for n in [*io.inputs, *io.outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(io.module.eval(), args, str(path), input_names=io.inputs, output_names=io.outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {**metadata, "edgecap.role": io.role})
    onnx.save(graph, str(path))
    return graph_spec(path)


def graph_spec(path: Path) -> GraphSpec:
    """A graph's manifest entry: file, sha256 and typed, shaped inputs/outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(v.name, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape)

    return GraphSpec(path.name, sha256(path), [spec(v) for v in graph.input], [spec(v) for v in graph.output])
