"""Shared fixtures: small models of both decoders trained once per test session on the synthetic task."""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

SHARED_FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"

# Small but real: both decoders reach well-above-blind captions in about a minute on 2 cores.
# Show and Tell sees the image only once, so it needs more epochs than Show, Attend and Tell.
EPOCHS = {"plain": 8, "attention": 8}
SMALL = dict(data="synthetic", synthetic_train=2000, synthetic_dev=100, batch_size=32, min_freq=1,
             embed_dim=64, hidden_dim=256, attention_dim=64, dropout=0.1, patience=10, seed=0)


ROWS_PER_BLOCK = 512


def train_cut_after_first_epoch(config) -> None:
    """Train `config` and kill the run (an exception from its epoch hook) once its first epoch is checkpointed."""
    from edgecap.train.trainer import train

    class Killed(Exception):
        pass

    def kill_after_first(epoch: int, _) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train(config, on_epoch_end=kill_after_first)


def dog_photos(n: int) -> list[str]:
    """The first `n` Flickr8k test photos all five of whose captions mention a dog (file names)."""
    names = (SHARED_FLICKR8K / "Flickr_8k.testImages.txt").read_text().split()
    captions: dict[str, list[str]] = {}
    for line in (SHARED_FLICKR8K / "Flickr8k.token.txt").read_text().splitlines():
        key, caption = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(caption.lower())
    dogs = [x for x in names if len(captions.get(x, [])) == 5 and all(" dog" in c for c in captions[x])
            and (SHARED_FLICKR8K / "images" / x).is_file()]
    return dogs[:n]


@functools.cache
def black_png(width: int, height: int) -> bytes:
    """A 1-bit black PNG made without holding or compressing all its pixels: each block of rows is deflated
    once, flushed to a byte boundary with no back-references, and repeated (a 40000x40000 one, a decompression
    bomb: 0.2 MB in a second)."""
    def deflated(rows: int) -> tuple[bytes, bytes]:
        raw = (b"\x00" * (1 + (width + 7) // 8)) * rows  # a filter byte, then the row's packed pixels
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        return raw, packer.compress(raw) + packer.flush(zlib.Z_FULL_FLUSH)

    (raw, block), (rest_raw, rest) = deflated(ROWS_PER_BLOCK), deflated(height % ROWS_PER_BLOCK)
    checksum = 1
    for _ in range(height // ROWS_PER_BLOCK):
        checksum = zlib.adler32(raw, checksum)
    checksum = zlib.adler32(rest_raw, checksum)
    stream = (b"\x78\xda" + block * (height // ROWS_PER_BLOCK) + rest + b"\x03\x00"  # + an empty final block
              + struct.pack(">I", checksum))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def write_scenes(folder: Path, count: int) -> Path:
    """`count` synthetic scenes (112x112) as JPEG files scene000.jpg, ... in `folder`."""
    import cv2

    from edgecap.train.synthetic import SyntheticSplit

    split = SyntheticSplit("test", count, image_size=112)
    for i in range(count):
        cv2.imwrite(str(folder / f"scene{i:03d}.jpg"), cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))
    return folder


def drawn_scenes() -> list[np.ndarray]:
    """Beach, night, snow, grass (224x224, BGR): dissimilar for the bundled model's features, each far from the
    next in this order."""
    beach = np.full((224, 224, 3), (230, 170, 120), np.uint8)
    beach[120:] = (150, 200, 220)                                          # sky over sand
    night = (np.random.default_rng(0).random((224, 224, 3)) * 40).astype(np.uint8)  # dark noise
    snow = np.full((224, 224, 3), (245, 240, 235), np.uint8)
    snow[:60] = (220, 180, 150)                                            # a strip of sky over a snowfield
    grass = np.full((224, 224, 3), (50, 140, 60), np.uint8)
    grass[80:150, 60:170] = (30, 30, 30)                                   # a black shape on grass
    return [beach, night, snow, grass]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """decoder name -> path of its best.pt, trained on first use."""
    from edgecap.train.trainer import TrainConfig, train

    cache: dict[str, Path] = {}

    def get(decoder: str) -> Path:
        if decoder not in cache:
            out = tmp_path_factory.mktemp(f"run-{decoder}")
            train(TrainConfig.from_flat(**SMALL, decoder=decoder, epochs=EPOCHS[decoder], output=str(out)))
            cache[decoder] = out / "best.pt"
        return cache[decoder]

    return get


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """decoder -> model folder with fp32, fp16 and int8 graphs of the trained checkpoint."""
    from edgecap.export.exporter import ExportOptions, export_model

    class Folders(dict):
        def __missing__(self, decoder: str) -> Path:
            folder = tmp_path_factory.mktemp(f"onnx-{decoder}") / "model"
            export_model(trained(decoder), ExportOptions(output=folder, int8=True, fp16=True, calib_count=32))
            self[decoder] = folder
            return folder

    return Folders()
