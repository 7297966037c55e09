"""GPU paths made as honest as they can be without a GPU: the exact TensorRT options handed to ONNX Runtime, the
nodes each provider was actually given, one-line refusals where a provider is absent, and CUDA = CPU captions
where CUDA exists (issue 23, item 4)."""

from __future__ import annotations

from types import SimpleNamespace

import onnxruntime as ort
import pytest

from edgecap.runtime.captioner import BUNDLED, Captioner
from edgecap.runtime.cli import main as run_main
from edgecap.runtime.engines import CPU, CUDA, TENSORRT, ort as ort_engine
from edgecap.runtime.engines.ort import OrtEngine, fallback_note, node_placement
from edgecap.runtime.manifest import Manifest


class Handed(Exception):
    """Raised by the fake session once it has seen what ONNX Runtime would be given."""


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_gets_its_caches_precision_and_workspace(exported, monkeypatch, tmp_path, precision):
    folder = exported["attention"]
    seen = {}

    def session(path, options, providers):
        seen["providers"] = providers
        raise Handed

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(Exception):
        OrtEngine(folder, Manifest.load(folder), precision, providers=(TENSORRT, CUDA, CPU))
    cache = str(folder / ".trt-cache")
    assert seen["providers"] == [
        (TENSORRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                    "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8",
                    "trt_max_workspace_size": 2 << 30}),
        CUDA, CPU]


def test_tensorrt_caches_of_a_read_only_folder_go_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(ort_engine.os, "access", lambda path, mode: False)
    cache = ort_engine.trt_cache_dir(BUNDLED)
    assert cache.parent == tmp_path / "edgecap" / "trt" and cache.name.startswith(BUNDLED.name + "-")


def test_sessions_record_where_their_nodes_run():
    engine = Captioner.load(BUNDLED, threads=1).engine
    assert set(engine.placement) == {"encoder", "decoder_init", "decoder_step", "tagger"}
    for role, placed in engine.placement.items():
        assert list(placed) == [CPU] and placed[CPU] > 0, role
    subgraphs = [SimpleNamespace(ep_name=ep, get_nodes=lambda n=n: [None] * n)
                 for ep, n in ((TENSORRT, 100), (CUDA, 3), (TENSORRT, 17), (CPU, 1))]
    placed = node_placement(subgraphs)
    assert placed == {TENSORRT: 117, CUDA: 3, CPU: 1}
    assert fallback_note("encoder.onnx", placed, TENSORRT) == (
        f"encoder.onnx: 4 of 121 nodes run elsewhere than {TENSORRT} (3 on {CUDA}, 1 on {CPU})")
    assert fallback_note("encoder.onnx", {TENSORRT: 5}, TENSORRT) is None


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this ONNX Runtime has CUDA")
@pytest.mark.parametrize("flags, missing", [(["--device", "cuda"], CUDA), (["--engine", "trt"], TENSORRT)])
def test_absent_gpu_providers_refuse_in_one_line(flags, missing, tmp_path, capsys):
    image = tmp_path / "sky.png"
    image.write_bytes(b"")
    assert run_main([*flags, "--model", str(BUNDLED), "--quiet", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"ONNX Runtime here has no {missing}" in err


@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="no CUDA execution provider here")
def test_cuda_captions_equal_cpu_captions(exported):
    from edgecap.train.synthetic import SyntheticSplit

    images = [SyntheticSplit("test", 8, image_size=112).image(i) for i in range(8)]
    cpu = [c.text for c in Captioner.load(exported["attention"]).caption(images)]
    cuda = [c.text for c in Captioner.load(exported["attention"], device="cuda").caption(images)]
    assert cuda == cpu
