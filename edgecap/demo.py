"""`make demo`: the whole pipeline on the built-in synthetic task, on a CPU, with no download.

Trains a small model of each decoder, shows held-out captions next to their truth, and saves the
attention figure of the attention model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecap.runtime.console import run_main
from edgecap.runtime.render import attention_figure, save_rgb
from edgecap.runtime.search import SearchOptions
from edgecap.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgecap.train.engine import TorchEngine
from edgecap.train.evaluate import caption_split
from edgecap.train.synthetic import SyntheticSplit
from edgecap.train.trainer import TrainConfig, train

DEMO_MODEL = dict(data="synthetic", synthetic_train=3000, synthetic_dev=100, batch_size=32, min_freq=1,
                  embed_dim=64, hidden_dim=256, attention_dim=64, dropout=0.1, patience=3)
DEMO_EPOCHS = {"plain": 10, "attention": 5}


def _show(ckpt: Path, out: Path, n: int) -> None:
    model, vocab, pre = model_from_checkpoint(load_checkpoint(ckpt))
    split = SyntheticSplit("test", n, image_size=pre.size)
    hyps = caption_split(TorchEngine(model), split, pre, SearchOptions(num_beams=3))
    right = 0
    for i in range(n):
        said, truth = vocab.decode(hyps[split.key(i)].tokens), split.captions(i)[0]
        right += said == truth
        print(f"  {'✓' if said == truth else '✗'} {said:<50} | truth: {truth}")
    print(f"  {right}/{n} held-out scenes captioned exactly")
    first = hyps[split.key(0)]
    if first.attention is not None:
        words = [vocab.words[t] for t in first.tokens]
        save_rgb(out / "attention.png", attention_figure(split.image(0), words, first.attention))
        print(f"  attention figure: {out / 'attention.png'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgecap-demo", description=__doc__)
    p.add_argument("--output", default="demo-out", help="folder for runs and pictures")
    p.add_argument("--show", type=int, default=10, help="held-out scenes to caption")
    args = p.parse_args(argv)

    def body() -> None:
        out = Path(args.output)
        for decoder, epochs in DEMO_EPOCHS.items():
            print(f"== training the {decoder} decoder on synthetic scenes ({epochs} epochs)")
            run = out / decoder
            train(TrainConfig(**DEMO_MODEL, decoder=decoder, epochs=epochs, output=str(run)))
            print(f"== {decoder}: held-out scenes, beam 3")
            _show(run / "best.pt", out, args.show)

    return run_main(body, "edgecap-demo")


if __name__ == "__main__":
    sys.exit(main())
