"""The encoder registry: rows build and load strictly, the EfficientNet-Lites see, preprocessing travels bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_FLICKR8K, dog_photos

from edgecap.runtime.errors import ModelError
from edgecap.runtime.preprocess import Preprocessing, read_rgb
from edgecap.runtime.search import SearchOptions
from edgecap.train.encoders import ENCODERS, file_sha256, pretrained_network, weights_file
from edgecap.train.model import CaptionModel, Encoder, ModelConfig
from edgecap.train.trainer import TrainConfig

IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151-268 are dog breeds
LITES = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_rows_build_and_give_a_grid(name):
    spec = ENCODERS[name]
    enc = Encoder(name, image_size=spec.preprocessing.size).eval()
    size = spec.preprocessing.size
    regions, pooled = enc(torch.randn(1, 3, size, size))
    side = -(-size // spec.stride)  # "same" padding rounds up: Lite1 at 240 gives 8x8, Lite2 at 260 9x9
    assert regions.shape == (1, side * side, spec.channels) and pooled.shape == (1, spec.channels)


@pytest.mark.parametrize("name", LITES)
def test_lites_load_strictly_from_their_packages_and_record_sha256(name):
    enc = Encoder(name)
    before = enc.body[1]._depthwise_conv.weight.clone()
    sha = enc.load_pretrained("imagenet")
    path = weights_file(name, "imagenet")
    assert sha == file_sha256(path) and len(sha) == 64
    assert sha.startswith(path.stem.rsplit("-", 1)[1])  # the file name carries its hash's first 8 digits
    assert not torch.equal(before, enc.body[1]._depthwise_conv.weight)
    net, _ = pretrained_network(name, "imagenet")
    size = ENCODERS[name].preprocessing.size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # the body is the network's own stem and blocks
        want = torch.nn.functional.relu6(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            want = block(want)
        assert torch.allclose(enc.eval()(x)[0], want.flatten(2).transpose(1, 2), atol=1e-5)


def test_resnet50_none_and_path_weights(tmp_path):
    enc = Encoder("resnet50")
    assert enc.load_pretrained("none") is None
    import torchvision
    net = torchvision.models.resnet50()
    torch.save(net.state_dict(), tmp_path / "r50.pth")
    assert enc.load_pretrained(str(tmp_path / "r50.pth")) == file_sha256(tmp_path / "r50.pth")
    assert torch.equal(enc.body[0].weight, net.conv1.weight)
    with pytest.raises(ModelError, match="not found"):
        enc.load_pretrained(str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": net.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(ModelError, match="does not fit the resnet50 architecture"):
        enc.load_pretrained(str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable"):
        enc.load_pretrained(str(tmp_path / "junk.pth"))


def test_finetune_blocks_per_backbone():
    enc = Encoder("resnet50", finetune_blocks=1)
    assert not enc.body[0].weight.requires_grad and enc.body[-1][0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="0-4 for resnet50"):
        ModelConfig(encoder="resnet50", finetune_blocks=5)
    with pytest.raises(ValueError, match="did you mean 'efficientnet-lite0'"):
        ModelConfig(encoder="efficientnet-lit0")


def test_lite0_stays_in_eval_mode_while_training():
    model = CaptionModel(ModelConfig(encoder="efficientnet-lite0", finetune_blocks=2, vocab_size=10,
                                     embed_dim=8, hidden_dim=8, attention_dim=8))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        evaluated = model.eval().encoder(x)[0]
        model.train()
        trained = model.encoder(x)[0]
    assert not any(m.training for m in model.encoder.body.modules())
    assert torch.equal(trained, evaluated)  # no drop-connect, no batch statistics: what eval mode computes
    assert model.decoder.training


def test_bad_model_settings_fail_before_data_is_read(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder"):
        TrainConfig.from_flat(data=str(tmp_path / "nowhere"), encoder="resnet5")
    with pytest.raises(ValueError, match="built for 224x224"):
        TrainConfig.from_flat(data=str(tmp_path / "nowhere"), encoder="efficientnet-lite0", image_size=160)
    with pytest.raises(ValueError, match="built for 260x260"):
        TrainConfig.from_flat(data=str(tmp_path / "nowhere"), encoder="efficientnet-lite2", image_size=224)
    with pytest.raises(ValueError, match="unknown decoder 'attn' \\(did you mean 'attention'\\?\\)"):
        TrainConfig.from_flat(data=str(tmp_path / "nowhere"), decoder="attn")


@pytest.mark.parametrize("name", list(ENCODERS))
def test_preprocessing_travels_bit_for_bit(name):
    """The training transform, written into a checkpoint and a manifest (JSON), is the runtime's transform."""
    cfg = TrainConfig.from_flat(data="synthetic", encoder=name)
    train_side = cfg.preprocessing()
    runtime_side = Preprocessing.from_dict(json.loads(json.dumps(train_side.to_dict())))
    rgb = np.random.default_rng(0).integers(0, 256, (240, 200, 3), dtype=np.uint8)
    assert np.array_equal(train_side(rgb), runtime_side(rgb))
    assert runtime_side == ENCODERS[name].preprocessing


@pytest.mark.parametrize("name, size", [("efficientnet-lite0", 224), ("efficientnet-lite1", 240),
                                        ("efficientnet-lite2", 260)])
def test_lite_preprocessing_is_the_tensorflow_scheme_at_its_own_size(name, size):
    pre = ENCODERS[name].preprocessing
    assert pre.size == size and TrainConfig.from_flat(data="synthetic", encoder=name).image_size == size
    rgb = np.resize(np.arange(256, dtype=np.uint8), (size, size, 3))
    want = (rgb.astype(np.float64).transpose(2, 0, 1) - 127) / 128
    assert np.abs(pre.batch([rgb])[0] - want).max() < 1e-6


@pytest.mark.skipif(not SHARED_FLICKR8K.is_dir(), reason="needs ../shared/flickr8k")
@pytest.mark.parametrize("name", LITES)  # measured: 11, 11 and 10 of the 12
def test_lites_see_dogs_in_flickr8k_photos(name):
    net, _ = pretrained_network(name, "imagenet")
    pre = ENCODERS[name].preprocessing
    photos = dog_photos(12)
    images = torch.from_numpy(pre.batch([read_rgb(SHARED_FLICKR8K / "images" / x) for x in photos]))
    with torch.no_grad():
        top1 = net(images).argmax(1).tolist()
    dogs = sum(c in IMAGENET_DOGS for c in top1)
    assert len(photos) == 12 and dogs >= 9, f"{name}: {dogs}/12 dog photos classified as dogs: {top1}"


def test_tiny_encoder_from_a_checkpoint_is_frozen_and_lets_the_plain_decoder_see(trained, tmp_path, capsys):
    """The demo's plain decoder reuses the attention run's tiny encoder: loaded strictly, frozen, recorded; on it
    the plain decoder captions far more held-out scenes exactly than when it trains its encoder from scratch."""
    from conftest import SMALL

    from edgecap.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgecap.train.engine import TorchEngine
    from edgecap.train.evaluate import caption_split, dev_scores
    from edgecap.train.synthetic import SyntheticSplit
    from edgecap.train.trainer import train

    source = trained("attention")
    want = {k: v for k, v in load_checkpoint(source)["model"].items() if k.startswith("encoder.body.")}
    train(TrainConfig.from_flat(**SMALL, epochs=4, decoder="plain", encoder_weights=str(source),
                                output=str(tmp_path / "run")))
    assert f"frozen encoder ({source})" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["encoder_weights_sha256"] == file_sha256(source)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in want.items())  # the body did not move
    model = CaptionModel(ModelConfig.from_dict(ckpt["model_config"]), 112)
    assert not any(p.requires_grad for p in model.encoder.body.parameters())
    assert all(p.requires_grad for p in model.encoder.pool.parameters()) and not model.encoder.frozen
    assert all(p.requires_grad for p in Encoder("tiny", learned_pool=True).body.parameters())  # from scratch

    def exact(path) -> float:
        net, vocab, pre = model_from_checkpoint(load_checkpoint(path))
        scenes = SyntheticSplit("test", 100, image_size=pre.size)
        hyps = caption_split(TorchEngine(net, torch.device("cpu")), scenes, pre, SearchOptions(num_beams=1))
        return dev_scores(hyps, scenes, vocab)["exact"]

    frozen, scratch = exact(tmp_path / "run" / "best.pt"), exact(trained("plain"))
    assert frozen >= 0.2 and frozen >= 3 * scratch, (frozen, scratch)  # measured: 0.37 against 0.03


def test_checkpoint_weights_must_be_an_edgecap_checkpoint_of_the_same_encoder(tmp_path):
    enc = Encoder("tiny")
    torch.save({"model_config": {"encoder": "resnet50"}, "model": {}}, tmp_path / "r50-run.pt")
    with pytest.raises(ModelError, match="checkpoint of the resnet50 encoder, not tiny"):
        enc.load_pretrained(str(tmp_path / "r50-run.pt"))
    torch.save(enc.body.state_dict(), tmp_path / "body.pth")
    with pytest.raises(ModelError, match="not an edgecap checkpoint, the only pretrained form of the tiny"):
        enc.load_pretrained(str(tmp_path / "body.pth"))
    with pytest.raises(ModelError, match="not found.*edgecap checkpoint"):
        enc.load_pretrained(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_lite_feature_cache_export_and_runtime_follow_its_size(name, tmp_path, capsys):
    """A tiny random decoder on the pretrained Lite1/Lite2: the feature cache encodes through ONNX Runtime at the
    row's size, the export writes that size into the manifest and its encoder graph, and the torch-free runtime
    resizes a photo of another size to it, captioning as PyTorch does."""
    from dataclasses import asdict

    from edgecap.export.exporter import ExportOptions, export_model
    from edgecap.runtime.captioner import Captioner
    from edgecap.runtime.decode import decode
    from edgecap.runtime.manifest import Manifest
    from edgecap.runtime.vocab import Vocabulary
    from edgecap.train.checkpoint import save_checkpoint
    from edgecap.train.engine import TorchEngine
    from edgecap.train.features import encode_split
    from edgecap.train.synthetic import SyntheticSplit

    torch.manual_seed(0)
    spec = ENCODERS[name]
    size, side = spec.preprocessing.size, -(-spec.preprocessing.size // spec.stride)
    cfg = TrainConfig.from_flat(data="synthetic", encoder=name, embed_dim=8, hidden_dim=16, attention_dim=8)
    vocab = Vocabulary.build(["a dog runs on the grass", "a man rides a red bike", "two girls sit on a bench"])
    model = CaptionModel(cfg.model_config(len(vocab)), cfg.image_size)
    sha = model.encoder.load_pretrained("imagenet")
    pre = cfg.preprocessing()
    assert pre.size == size

    cached = encode_split(model.encoder, SyntheticSplit("dev", 3, image_size=size), pre, torch.device("cpu"), None,
                          "encode dev")
    assert "3 images through ONNX Runtime" in capsys.readouterr().out and cached.shape == (3, side * side,
                                                                                          spec.channels)

    save_checkpoint(tmp_path / "tiny.pt", {
        "model_config": model.cfg.to_dict(), "train_config": asdict(cfg), "vocab": vocab.to_list(),
        "preprocessing": pre.to_dict(), "model": model.state_dict(), "encoder_weights_sha256": sha})
    folder = export_model(tmp_path / "tiny.pt", ExportOptions(output=tmp_path / "model", verify_count=2),
                          say=lambda _: None)
    manifest = Manifest.load(folder)
    assert manifest.preprocessing == spec.preprocessing and manifest.source.encoder == name
    assert manifest.source.encoder_weights_sha256 == sha == file_sha256(weights_file(name, "imagenet"))
    assert manifest.graphs["fp32"]["encoder"].inputs[0].shape[1:] == [3, size, size]

    captioner = Captioner.load(folder)
    photo = np.random.default_rng(1).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    assert captioner.preprocess.size == size
    got = captioner.caption(photo)
    want = decode(TorchEngine(model), pre.batch([photo]), captioner.options)[0][0]
    assert got.tokens == want.tokens and len(got.attention[0]) == side * side
