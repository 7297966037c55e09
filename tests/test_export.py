"""export-onnx: graphs, manifest, verification, precision variants and errors."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgecap.export.cli import main as export_main
from edgecap.export.exporter import verify_against_torch, verify_searches
from edgecap.runtime.captioner import Captioner
from edgecap.runtime.engines.ort import OrtEngine
from edgecap.runtime.errors import ModelError
from edgecap.runtime.manifest import MANIFEST, Manifest, sha256
from edgecap.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgecap.train.engine import TorchEngine
from edgecap.train.synthetic import SyntheticSplit


@pytest.mark.parametrize("decoder", ["plain", "attention"])
def test_export_writes_verified_folder(exported, decoder):
    folder = exported[decoder]
    m = Manifest.load(folder)
    assert m.decoder == decoder and set(m.graphs) == {"fp32", "fp16", "int8"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST, "calibration.json"] + [g.file for roles in m.graphs.values() for g in roles.values()])
    step = m.graphs["fp32"]["decoder_step"]
    assert step.inputs[0].shape == ["batch"] and step.outputs[0].shape == ["batch", len(m.vocab)]
    assert ("alpha" in step.output_names()) == (decoder == "attention")
    props = {p.key: p.value for p in onnx.load(folder / step.file).metadata_props}
    assert props["edgecap.role"] == "decoder_step" and props["edgecap.decoder"] == decoder
    for precision in ("int8", "fp16"):  # the fixture gives 16/16 on both searches
        agreement = m.precision_notes[precision]["agreement"]
        assert set(agreement) == {"greedy", "beam3"}, precision
        for search, counts in agreement.items():
            assert counts["images"] == 16 and counts["identical"] >= 15, (precision, search, counts)


def test_manifest_round_trip(exported, tmp_path):
    m = Manifest.load(exported["attention"])
    shutil.copytree(exported["attention"], tmp_path / "copy")
    m.save(tmp_path / "copy")
    assert Manifest.load(tmp_path / "copy").to_dict() == m.to_dict()


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_corrupt_manifest_and_files_are_refused(exported, tmp_path):
    folder = _copy(exported["plain"], tmp_path)
    raw = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(ModelError, match="unknown key"):
        Manifest.load(folder)
    (folder / MANIFEST).write_text(json.dumps({**raw, "vocab": raw["vocab"][:-1]}))
    with pytest.raises(ModelError, match="vocabulary"):
        Manifest.load(folder)
    (folder / MANIFEST).write_text(json.dumps(raw))
    step = folder / raw["graphs"]["fp32"]["decoder_step"]["file"]
    step.write_bytes(step.read_bytes()[:-100])
    with pytest.raises(ModelError, match="hash"):
        Manifest.load(folder)


def test_tampered_graph_fails_verification(exported, trained, tmp_path):
    folder = _copy(exported["attention"], tmp_path)
    m = Manifest.load(folder)
    path = folder / m.graphs["fp32"]["decoder_step"].file
    graph = onnx.load(path)
    init = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight
    w = numpy_helper.to_array(init).copy()
    w.flat[: w.size // 10] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(graph, path)
    m.graphs["fp32"]["decoder_step"].sha256 = sha256(path)
    model, _, pre = model_from_checkpoint(load_checkpoint(trained("attention")))
    split = SyntheticSplit("test", 8, image_size=pre.size)
    images = pre.batch([split.image(i) for i in range(8)])
    with pytest.raises(ModelError, match="differ"):
        verify_against_torch(TorchEngine(model), OrtEngine(folder, m), images, len(m.vocab), pre, say=print,
                             searches=verify_searches(m))


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_precision_variants_caption(exported, precision):
    cap = Captioner.load(exported["attention"], precision=precision)
    split = SyntheticSplit("test", 4, image_size=cap.preprocess.size)
    results = cap.caption([split.image(i) for i in range(4)])
    assert len(results) == 4 and all(r.words and r.attention.shape == (len(r.words), 49) for r in results)


def test_int8_is_smaller(exported):
    m = Manifest.load(exported["attention"])
    for role, note in m.precision_notes["int8"]["graphs"].items():
        assert note["bytes"] < note["fp32_bytes"], role


def test_export_errors(trained, tmp_path, capsys):
    ckpt = trained("plain")
    out = tmp_path / "m"
    out.mkdir()
    assert export_main([str(ckpt), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert export_main([str(ckpt), "-o", str(tmp_path / "x"), "--opset", "99"]) == 2
    assert "opset 99" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert export_main([str(tmp_path / "junk.pt"), "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export-onnx: error:") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "m"]  # nothing half-written


def test_export_default_folder_and_force(trained, tmp_path):
    ckpt = tmp_path / "best.pt"
    shutil.copy(trained("plain"), ckpt)
    mask = os.umask(0o022)
    try:
        assert export_main([str(ckpt), "--verify-count", "4"]) == 0
    finally:
        os.umask(mask)
    assert Manifest.load(tmp_path / "best-onnx").decoder == "plain"
    assert (tmp_path / "best-onnx").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700: a team can read it
    folder = tmp_path / "best-onnx"
    (folder / "stale.onnx").write_bytes(b"left from another export")
    assert Manifest.load(folder).search.num_beams == 3
    assert export_main([str(ckpt), "--force", "--no-verify", "--beams", "4", "--max-length", "12"]) == 0
    after = Manifest.load(folder)  # the replaced folder: its own files only, the search defaults asked for
    assert not (folder / "stale.onnx").exists() and after.decoder == "plain"
    assert (after.search.num_beams, after.search.max_length) == (4, 12)
    assert Captioner.load(folder).options.num_beams == 4


def test_the_shipped_recipe_and_the_image_flags(trained, exported, tmp_path):
    """The bundled folder's recipe (`--int8 --keep-fp32 encoder --drop-fp32`), --verify-images and --calib."""
    ckpt = trained("plain")
    split = SyntheticSplit("test", 6, image_size=112)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(len(split)):
        cv2.imwrite(str(photos / f"scene{i}.png"), cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))
    shipped = tmp_path / "shipped"
    assert export_main([str(ckpt), "-o", str(shipped), "--int8", "--keep-fp32", "encoder", "--drop-fp32",
                        "--verify-images", str(photos)]) == 0
    m = Manifest.load(shipped)
    files = {role: g.file for role, g in m.graphs["int8"].items()}
    assert set(m.graphs) == {"int8"} and files == {"encoder": "encoder.onnx", "decoder_init": "decoder_init.int8.onnx",
                                                   "decoder_step": "decoder_step.int8.onnx"}
    assert sorted(p.name for p in shipped.iterdir()) == sorted([MANIFEST, *files.values()])
    assert {s: a["images"] for s, a in m.precision_notes["int8"]["agreement"].items()} == {"greedy": 6, "beam3": 6}
    images = [split.image(i) for i in range(len(split))]
    fp32 = [c.text for c in Captioner.load(exported["plain"], precision="fp32").caption(images)]
    assert sum(a == c.text for a, c in zip(fp32, Captioner.load(shipped).caption(images))) >= 5

    calibrated = tmp_path / "calibrated"
    assert export_main([str(ckpt), "-o", str(calibrated), "--int8", "--calib", str(photos), "--no-verify"]) == 0
    assert json.loads((calibrated / "calibration.json").read_text())["images"] == 6  # not the 64 train scenes
