"""ONNX Runtime engine: CPU, CUDA and TensorRT execution providers behind one Engine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..engine import STATE_NAMES, Arrays, Engine, StepOutput
from ..errors import ModelError
from ..manifest import Manifest

log = logging.getLogger(__name__)
EXPORT_FLAG = {"fp32": "export-onnx without --drop-fp32", "fp16": "export-onnx --fp16", "int8": "export-onnx --int8"}

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
OPTIMIZATION = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class OrtEngine(Engine):
    """Runs a model folder's encoder, decoder_init and decoder_step graphs in ONNX Runtime sessions.

    On CUDA, IO binding keeps each batch's per-image context (regions, keys) on the device across all
    word steps instead of copying it in every call.
    """

    def __init__(self, folder: str | Path, manifest: Manifest, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, optimization: str = "all"):
        if precision not in manifest.graphs:
            raise ModelError(f"model folder {folder} has no {precision} graphs; it has {', '.join(manifest.graphs)} "
                             f"(pass --precision {manifest.default_precision}, or export with {EXPORT_FLAG[precision]})")
        if device not in PROVIDERS:
            raise ValueError(f"unknown device {device!r}; choose from {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[device][0]
        if wanted not in ort.get_available_providers():
            raise ModelError(f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())}); "
                             "install onnxruntime-gpu for CUDA/TensorRT")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = OPTIMIZATION[optimization]
        if threads:
            opts.intra_op_num_threads = threads
        # Three sessions take turns; threads that spin after their session's run would steal the cores
        # the next session needs (measured: fp32 encoder 78 ms with spinning vs 43 ms without, 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.graphs = manifest.graphs[precision]
        self.sessions = {}
        for role, spec in self.graphs.items():
            try:
                self.sessions[role] = ort.InferenceSession(str(Path(folder) / spec.file), opts,
                                                           providers=PROVIDERS[device])
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise ModelError(f"ONNX Runtime cannot load {spec.file}: {str(e).splitlines()[0][:200]}") from None
            if self.sessions[role].get_providers()[0] != wanted:
                raise ModelError(f"ONNX Runtime could not start {wanted} for {spec.file} "
                                 f"(it fell back to {self.sessions[role].get_providers()[0]})")
        self.context_names = tuple(manifest.context_names)
        self.device = device
        self.io_binding = device != "cpu"
        self._bound: tuple[Arrays, dict] | None = None  # (the context dict, its device OrtValues)
        log.info("onnxruntime %s on %s (%s), IO binding %s", ort.__version__, device,
                 self.sessions["encoder"].get_providers()[0], "on" if self.io_binding else "off")

    def _run(self, role: str, feeds: Arrays) -> Arrays:
        sess = self.sessions[role]
        outs = sess.run(None, feeds)
        return dict(zip(self.graphs[role].output_names(), outs))

    def encode(self, images: np.ndarray) -> Arrays:
        return self._run("encoder", {"image": np.ascontiguousarray(images, np.float32)})

    def init(self, features: Arrays) -> Arrays:
        name = self.graphs["decoder_init"].input_names()[0]
        return self._run("decoder_init", {name: features[name]})

    def step(self, words: np.ndarray, state: Arrays, context: Arrays) -> StepOutput:
        feeds = {"word": words.astype(np.int64, copy=False), "h": state["h"], "c": state["c"]}
        if self.io_binding:
            out = self._step_bound(feeds, context)
        else:
            out = self._run("decoder_step", {**feeds, **{n: context[n] for n in self.context_names}})
        return StepOutput(out["logprobs"], {s: out[f"{s}_next"] for s in STATE_NAMES}, out.get("alpha"))

    def _step_bound(self, feeds: Arrays, context: Arrays) -> Arrays:
        """One step with the per-image context bound once per batch as device-resident OrtValues."""
        sess = self.sessions["decoder_step"]
        if self._bound is None or self._bound[0] is not context:
            self._bound = (context, {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(context[n]),
                                                                              "cuda", 0)
                                         for n in self.context_names})
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in self._bound[1].items():
            binding.bind_ortvalue_input(name, value)
        names = self.graphs["decoder_step"].output_names()
        for name in names:
            binding.bind_output(name)
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))
