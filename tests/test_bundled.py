"""The model that ships inside the package: present, intact, torch-free, found by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgecap.runtime.captioner import BUNDLED, Captioner, model_dir
from edgecap.runtime.errors import ModelError
from edgecap.runtime.manifest import Manifest

MAX_BYTES = 30_000_000  # everything under edgecap/models/

DRAW_AND_CAPTION = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError('torch is blocked: ' + name)
sys.meta_path.insert(0, Block())
import cv2, numpy as np
from edgecap.runtime.captioner import Captioner
image = np.full((240, 320, 3), (90, 160, 220), np.uint8)           # sky
image[150:] = (70, 140, 60)                                          # grass
cv2.circle(image, (160, 120), 40, (200, 40, 40), -1)                 # a red ball
cap = Captioner.load()
result = cap.caption(image)
assert all(w in cap.vocab.words for w in result.words)
print(cap.precision, '|', result.text)
"""


def test_bundled_manifest_and_hashes_hold():
    manifest = Manifest.load(BUNDLED)  # checks every graph file's sha256
    assert manifest.decoder == "attention" and "int8" in manifest.graphs
    assert manifest.source.encoder == "efficientnet-lite0" and len(manifest.source.encoder_weights_sha256) == 64
    assert manifest.preprocessing.size == 224 and manifest.preprocessing.mean == (127 / 255,) * 3
    total = sum(p.stat().st_size for p in BUNDLED.parent.rglob("*") if p.is_file())
    assert total < MAX_BYTES


def test_bundled_model_captions_a_drawn_image_without_torch():
    proc = subprocess.run([sys.executable, "-c", DRAW_AND_CAPTION], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    precision, text = proc.stdout.strip().split(" | ")
    assert precision == Manifest.load(BUNDLED).default_precision and len(text.split()) >= 3


def test_resolution_order(tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.delenv("EDGECAP_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert model_dir(None, said.append) == BUNDLED and len(said) == 1 and BUNDLED.name in said[0]
    (tmp_path / "model").mkdir()
    assert model_dir(None, said.append) == Path("model")
    monkeypatch.setenv("EDGECAP_MODEL", str(tmp_path / "env"))
    assert model_dir(None, said.append) == tmp_path / "env"
    assert model_dir(tmp_path / "given", said.append) == tmp_path / "given"
    assert len(said) == 1


def test_missing_precision_names_what_the_folder_has():
    missing = next(p for p in ("fp32", "fp16") if p not in Manifest.load(BUNDLED).graphs)
    with pytest.raises(ModelError, match=r"has no \w+ graphs; it has int8 \(pass --precision int8"):
        Captioner.load(BUNDLED, precision=missing)
