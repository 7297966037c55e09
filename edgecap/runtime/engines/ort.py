"""ONNX Runtime engine: the CPU, CUDA and TensorRT execution providers (rows `ort` and `trt`) behind one Engine."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..console import choice_error
from ..engine import STATE_NAMES, Arrays, Engine, StepOutput
from ..errors import ModelError
from ..manifest import TAGGER, GraphSpec, Manifest, TensorSpec
from . import TENSORRT

log = logging.getLogger(__name__)
EXPORT_FLAG = {"fp32": "export-onnx without --drop-fp32", "fp16": "export-onnx --fp16", "int8": "export-onnx --int8"}

TRT_WORKSPACE = 2 << 30  # bytes TensorRT may use while it builds an engine
TRT_CACHE = ".trt-cache"  # engine and timing caches, in the model folder when it is writable

OPTIMIZATION = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _check_io(session: ort.InferenceSession, spec: GraphSpec) -> None:
    """A graph's inputs and outputs must be those its manifest entry names, in order, with the same ranks and
    fixed sizes (a graph of another model, with its hash written into the manifest, fails here and not mid-run)."""
    for kind, tensors, expected in (("inputs", session.get_inputs(), spec.inputs),
                                    ("outputs", session.get_outputs(), spec.outputs)):
        got, want = _signature(tensors), _signature(expected)
        if got != want:
            raise ModelError(f"{spec.file} is not the graph its manifest describes: {kind} {', '.join(got)}, "
                             f"expected {', '.join(want)} (a graph of another model?)")


def _signature(tensors: Sequence[TensorSpec | ort.NodeArg]) -> list[str]:
    """`name[?,512]` per tensor: named (batch) and unknown sizes are `?`."""
    return [f"{t.name}[{','.join(str(d) if isinstance(d, int) and d > 0 else '?' for d in t.shape)}]"
            for t in tensors]


def trt_cache_dir(folder: Path) -> Path:
    """Where TensorRT keeps the engines it built and its timing cache, so that a restart (minutes on a Jetson) is
    a load: `FOLDER/.trt-cache`, or, for a folder this user cannot write (an installed package's bundled model),
    `$XDG_CACHE_HOME/edgecap/trt/NAME-HASH` keyed by the folder's manifest."""
    if os.access(folder, os.W_OK):
        return folder / TRT_CACHE
    key = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgecap" / "trt" / f"{folder.name}-{key}"


def tensorrt_options(folder: Path, precision: str) -> dict[str, object]:
    """ONNX Runtime's TensorRT provider options: engine and timing caches (see `trt_cache_dir`), TensorRT's fp16
    or int8 kernels for those graphs (int8: the graphs' own Q/DQ scales, no calibration table), a workspace cap."""
    cache = str(trt_cache_dir(folder))
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
            "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8",
            "trt_max_workspace_size": TRT_WORKSPACE}


def provider_list(providers: Sequence[str], folder: Path, precision: str) -> list[str | tuple[str, dict]]:
    """The providers as ONNX Runtime takes them, TensorRT with its options."""
    return [(p, tensorrt_options(folder, precision)) if p == TENSORRT else p for p in providers]


def node_placement(subgraphs: Iterable) -> dict[str, int]:
    """Nodes per execution provider, from a session's `get_provider_graph_assignment_info()`."""
    placed: Counter[str] = Counter()
    for subgraph in subgraphs:
        placed[subgraph.ep_name] += len(subgraph.get_nodes())
    return dict(placed)


def fallback_note(graph: str, placed: dict[str, int], wanted: str) -> str | None:
    """`encoder.onnx: 3 of 120 nodes run on CUDAExecutionProvider, not TensorrtExecutionProvider`, or None."""
    others = {ep: n for ep, n in placed.items() if ep != wanted}
    if not others:
        return None
    where = ", ".join(f"{n} on {ep}" for ep, n in others.items())
    return f"{graph}: {sum(others.values())} of {sum(placed.values())} nodes run elsewhere than {wanted} ({where})"


class OrtEngine(Engine):
    """Runs a model folder's encoder, decoder_init and decoder_step graphs in ONNX Runtime sessions.

    On CUDA, IO binding keeps each batch's per-image context (regions, keys) on the device across all
    word steps instead of copying it in every call. Sessions are shared and ORT runs them from several
    threads at once; the bound context is per thread, so one engine serves concurrent callers.
    """

    @classmethod
    def open(cls, folder: Path, *, precision: str, device: str, providers: Sequence[str], threads: int | None,
             manifest: Manifest | None = None, optimization: str = "all") -> "OrtEngine":
        return cls(folder, manifest or Manifest.load(folder), precision, providers, threads, optimization)

    def __init__(self, folder: str | Path, manifest: Manifest, precision: str = "fp32",
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None,
                 optimization: str = "all"):
        if precision not in EXPORT_FLAG:
            raise choice_error("precision", precision, list(EXPORT_FLAG))
        if precision not in manifest.graphs:
            raise ModelError(f"model folder {folder} has no {precision} graphs; it has {', '.join(manifest.graphs)} "
                             f"(pass --precision {manifest.default_precision}, or export with {EXPORT_FLAG[precision]})")
        wanted = providers[0]
        if wanted not in ort.get_available_providers():
            raise ModelError(f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())}); "
                             "install onnxruntime-gpu for CUDA/TensorRT")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = OPTIMIZATION[optimization]
        if threads:
            opts.intra_op_num_threads = threads
        # Worker threads spin while a run lasts (a decoder step is ~30 short nodes; waking a sleeping worker for
        # each cost the bundled model 1 ms a caption) and stop when it ends: three sessions take turns, and threads
        # still spinning would steal the cores the next one needs. Measured on 2 cores, bundled model, greedy /
        # beam 3 / beam 5 ms: no spinning 8.95 / 12.34 / 13.73; spinning, stopped after each run 7.93 / 10.99 /
        # 12.07; spinning on after the run 18.2 / 29.1 / 33.1.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # -> self.placement
        opts.log_severity_level = 3
        self.graphs = manifest.graphs[precision]
        self.sessions = {}
        self.placement: dict[str, dict[str, int]] = {}  # role -> nodes per provider ORT assigned (ORT >= 1.24)
        for role, spec in self.graphs.items():
            try:
                self.sessions[role] = ort.InferenceSession(str(Path(folder) / spec.file), opts,
                                                           providers=provider_list(providers, Path(folder), precision))
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise ModelError(f"ONNX Runtime cannot load {spec.file}: {str(e).splitlines()[0][:200]}") from None
            _check_io(self.sessions[role], spec)
            if self.sessions[role].get_providers()[0] != wanted:
                raise ModelError(f"ONNX Runtime could not start {wanted} for {spec.file} "
                                 f"(it fell back to {self.sessions[role].get_providers()[0]})")
            if hasattr(self.sessions[role], "get_provider_graph_assignment_info"):  # ONNX Runtime 1.24 and later
                self.placement[role] = node_placement(self.sessions[role].get_provider_graph_assignment_info())
                if note := fallback_note(spec.file, self.placement[role], wanted):
                    log.info(note)  # recorded in `placement`; CUDA keeps shape nodes on the CPU by design
        self.context_names = tuple(manifest.context_names)
        self.provider = wanted
        self.io_binding = wanted != "CPUExecutionProvider"
        self._local = threading.local()  # per thread: (the context dict, its device OrtValues)
        log.info("onnxruntime %s with %s, IO binding %s", ort.__version__, wanted, "on" if self.io_binding else "off")

    def _run(self, role: str, feeds: Arrays) -> Arrays:
        sess = self.sessions[role]
        outs = sess.run(None, feeds)
        return dict(zip(self.graphs[role].output_names(), outs))

    def encode(self, images: np.ndarray) -> Arrays:
        return self._run("encoder", {"image": np.ascontiguousarray(images, np.float32)})

    def init(self, features: Arrays) -> Arrays:
        name = self.graphs["decoder_init"].input_names()[0]
        return self._run("decoder_init", {name: features[name]})

    def tag(self, regions: np.ndarray) -> np.ndarray:
        if TAGGER not in self.sessions:
            return super().tag(regions)
        return self._run(TAGGER, {"regions": regions})["logits"]

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
        bound = getattr(self._local, "bound", None)
        if bound is None or bound[0] is not context:
            bound = self._local.bound = (context, {
                n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(context[n]), "cuda", 0)
                for n in self.context_names})
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in bound[1].items():
            binding.bind_ortvalue_input(name, value)
        names = self.graphs["decoder_step"].output_names()
        for name in names:
            binding.bind_output(name)
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))
