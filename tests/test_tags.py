"""Tags: the tagger graph (EfficientNet-Lite's ImageNet head over the encoder's regions) in the bundled model, its
export (`export-onnx --add-tagger`), `caption-run --tags`, `Caption.to_dict` with tags and attention, and a model
folder without a tagger."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import SHARED_FLICKR8K, dog_photos, drawn_scenes

from edgecap.export import cli as export_cli
from edgecap.runtime.captioner import BUNDLED, Captioner
from edgecap.runtime.errors import ModelError
from edgecap.runtime.manifest import TAGGER, Manifest
from edgecap.train.encoders import imagenet_labels, pretrained_head

IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151-268 are dog breeds


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(threads=1, tags=5)


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    for i, rgb in enumerate(drawn_scenes()):
        cv2.imwrite(str(folder / f"scene{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def test_the_head_over_regions_is_the_networks_own_classifier():
    """LiteHead (BN folded into a linear map per region, then the mean) gives the logits of the full EfficientNet."""
    from edgecap.train.encoders import LiteHead, pretrained_network
    from edgecap.train.model import Encoder

    net, _ = pretrained_network("efficientnet-lite0", "imagenet")
    encoder = Encoder("efficientnet-lite0")
    encoder.load_pretrained("imagenet")
    images = torch.from_numpy(encoder.spec.preprocessing.batch(drawn_scenes()))
    with torch.inference_mode():
        want, got = net(images), LiteHead(net)(encoder.eval()(images)[0])
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_bundled_tagger_equals_the_pytorch_head(captioner):
    manifest = captioner.manifest
    assert manifest.labels == imagenet_labels() and len(manifest.labels) == 1000
    head, labels = pretrained_head(manifest.source.encoder, manifest.source.encoder_weights_sha256)
    regions = captioner.encode(drawn_scenes())[0]["regions"]
    got = captioner.engine.tag(regions)
    with torch.inference_mode():
        want = head(torch.from_numpy(regions)).numpy()
    assert got.shape == want.shape == (4, 1000)
    # the shipped tagger is weight-only int8: close to fp32 PyTorch, the same best labels
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.skipif(not (SHARED_FLICKR8K / "images").is_dir(), reason=f"no Flickr8k at {SHARED_FLICKR8K}")
def test_bundled_tags_see_dogs_in_flickr8k_dog_photos(captioner):
    photos = dog_photos(12)
    results = captioner.caption([SHARED_FLICKR8K / "images" / x for x in photos], tags=1)
    top1 = [captioner.manifest.labels.index(r.tags[0][0]) for r in results]
    dogs = sum(c in IMAGENET_DOGS for c in top1)
    assert len(photos) == 12 and dogs >= 9, f"{dogs}/12 dog photos tagged as dogs: {top1}"


def test_tags_and_attention_in_the_caption_record(captioner):
    image = drawn_scenes()[0]
    result = captioner.caption(image)
    assert len(result.tags) == 5 and [p for _, p in result.tags] == sorted((p for _, p in result.tags), reverse=True)
    assert all(0 < p <= 1 for _, p in result.tags) and sum(p for _, p in result.tags) <= 1.0001
    assert [t for t, _ in captioner.caption(image, tags=2).tags] == [t for t, _ in result.tags[:2]]
    assert captioner.caption(image, tags=0).tags == [] and result.timings["tagger_ms"] > 0
    assert result.text == captioner.caption(image, tags=0).text  # tags never change the caption
    record = result.to_dict(attention=True)
    assert record["tags"] == [{"label": t, "probability": p} for t, p in result.tags]
    grid = record["attention"]
    assert grid["grid"] == [8, 8] and len(grid["words"]) == len(record["words"])  # Lite1 at 240 px
    for word in grid["words"]:
        assert len(word) == 8 and all(len(row) == 8 for row in word)
        assert abs(sum(map(sum, word)) - 1) < 4e-3  # rounded to 4 places: 64 errors of at most 5e-5
    assert "attention" not in result.to_dict() and "tags" not in captioner.caption(image, tags=0).to_dict()


def test_an_images_tags_do_not_depend_on_its_batch(captioner):
    scenes = drawn_scenes()
    batched = captioner.caption(scenes, tags=5)
    for scene, together in zip(scenes, batched):
        alone = captioner.caption(scene, tags=5)
        assert [t for t, _ in together.tags] == [t for t, _ in alone.tags]
        assert max(abs(p - q) for (_, p), (_, q) in zip(together.tags, alone.tags)) <= 2e-4


def test_caption_run_tags_text_and_json(scene_files, captioner):
    run = [sys.executable, "-m", "edgecap.runtime.cli", "--threads", "1", "--quiet", str(scene_files / "scene0.png")]
    text = subprocess.run(run + ["--tags", "2"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    want = captioner.caption(scene_files / "scene0.png", tags=2)
    assert text.stdout.rstrip("\n").split("\t")[1:] == [want.text, *(f"{t} {p:.2f}" for t, p in want.tags)]
    record = json.loads(subprocess.run(run + ["--tags", "3", "--json"], capture_output=True, text=True,
                                       timeout=120).stdout)
    assert [t["label"] for t in record["tags"]] == [t for t, _ in captioner.caption(scene_files / "scene0.png",
                                                                                      tags=3).tags]


def test_a_folder_without_a_tagger_says_so_in_one_line(exported, scene_files):
    folder = exported["attention"]  # the tiny encoder has no classifier head: export-onnx made no tagger
    assert not any(TAGGER in roles for roles in Manifest.load(folder).graphs.values())
    proc = subprocess.run([sys.executable, "-m", "edgecap.runtime.cli", "--model", str(folder), "--tags", "3",
                           str(scene_files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no tagger graph" in proc.stderr and "--add-tagger" in proc.stderr
    with pytest.raises(ModelError, match="no tagger graph"):
        Captioner.load(folder, tags=1)
    assert Captioner.load(folder).caption(drawn_scenes()[0], tags=0).tags == []


def test_add_tagger_rebuilds_the_bundled_tagger_exactly(tmp_path, scene_files, capsys):
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    shipped = raw["graphs"]["int8"].pop(TAGGER)
    raw["precision_notes"]["int8"].pop(TAGGER)
    raw["labels"], raw["format_version"] = [], 1
    (folder / "manifest.json").write_text(json.dumps(raw))
    (folder / shipped["file"]).unlink()
    with pytest.raises(ModelError, match="no tagger graph"):
        Captioner.load(folder, tags=1)
    assert export_cli.main([str(folder), "--add-tagger"]) == 2  # verification photos are required
    assert "--verify-images" in capsys.readouterr().err
    assert export_cli.main([str(folder), "--add-tagger", "--verify-images", str(scene_files)]) == 0
    out = capsys.readouterr().out
    assert "✓ tagger" in out and "logits" in out
    manifest = Manifest.load(folder)
    assert manifest.graphs["int8"][TAGGER].sha256 == shipped["sha256"]  # the same graph, byte for byte
    assert manifest.labels == imagenet_labels() and manifest.format_version == 2
    assert not (folder / f"{TAGGER}.onnx").exists()  # the fp32 reference is not kept in an int8-only folder
    image = drawn_scenes()[1]
    ours, bundled = Captioner.load(folder, tags=3).caption(image), Captioner.load(tags=3).caption(image)
    assert (ours.text, ours.tags) == (bundled.text, bundled.tags)
