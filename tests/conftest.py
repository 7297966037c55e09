"""Shared fixtures: small models of both decoders trained once per test session on the synthetic task."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"

# Small but real: both decoders reach well-above-blind captions in about a minute on 2 cores.
# Show and Tell sees the image only once, so it needs more epochs than Show, Attend and Tell.
EPOCHS = {"plain": 8, "attention": 8}
SMALL = dict(data="synthetic", synthetic_train=2000, synthetic_dev=100, batch_size=32, min_freq=1,
             embed_dim=64, hidden_dim=256, attention_dim=64, dropout=0.1, patience=10, seed=0)


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
