"""`make demo`: the whole pipeline on the built-in synthetic task, on a CPU, with no download.

train both decoders (PyTorch) -> export each to a verified ONNX model folder with int8 graphs ->
caption held-out scenes with the torch-free runtime, next to their truth -> attention pictures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecap.export.exporter import ExportOptions, export_model
from edgecap.runtime.captioner import Captioner
from edgecap.runtime.cli import main as caption_run
from edgecap.runtime.console import run_main
from edgecap.runtime.render import save_rgb
from edgecap.train.synthetic import SyntheticSplit
from edgecap.train.trainer import TrainConfig, train

DEMO_MODEL = dict(data="synthetic", synthetic_train=2000, synthetic_dev=100, batch_size=32, min_freq=1,
                  embed_dim=64, hidden_dim=256, attention_dim=64, dropout=0.1, patience=3)
DEMO_EPOCHS = {"plain": 8, "attention": 8}


def _compare(model: Path, split: SyntheticSplit, precision: str) -> None:
    """Runtime captions of held-out scenes beside their truth."""
    cap = Captioner.load(model, precision=precision)
    results = cap.caption([split.image(i) for i in range(len(split))])
    right = 0
    for i, r in enumerate(results):
        truth = split.captions(i)[0]
        right += r.text == truth
        print(f"  {'✓' if r.text == truth else '✗'} {r.text:<48} | truth: {truth}")
    print(f"  {right}/{len(split)} held-out scenes captioned exactly ({precision}, beam {cap.options.num_beams})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgecap-demo", description=__doc__)
    p.add_argument("--output", default="demo-out", help="folder for runs, models and pictures")
    p.add_argument("--show", type=int, default=8, help="held-out scenes to caption")
    args = p.parse_args(argv)

    def body() -> int:
        out = Path(args.output)
        scenes = SyntheticSplit("test", args.show)
        (out / "scenes").mkdir(parents=True, exist_ok=True)
        for i in range(len(scenes)):
            save_rgb(out / "scenes" / f"scene{i}.png", scenes.image(i))
        for decoder, epochs in DEMO_EPOCHS.items():
            run = out / decoder
            print(f"\n== 1. train the {decoder} decoder on synthetic scenes ({epochs} epochs, PyTorch)")
            train(TrainConfig(**DEMO_MODEL, decoder=decoder, epochs=epochs, output=str(run)))
            print(f"\n== 2. export {run / 'best.pt'} to ONNX (fp32 + int8), verified against PyTorch")
            model = export_model(run / "best.pt", ExportOptions(output=run / "model", int8=True, force=True))
            print(f"\n== 3. {decoder}: held-out scenes through the torch-free runtime")
            for precision in ("fp32", "int8"):
                _compare(model, scenes, precision)
        print("\n== 4. caption-run on the scene folder, pictures with captions and attention maps")
        status = caption_run(["--model", str(out / "attention" / "model"), str(out / "scenes"),
                              "--save", str(out / "captioned"), "--attention"])
        print(f"\npictures in {out / 'captioned'}/ (captions drawn on; *.attention.png: each word's attention)")
        return status

    return run_main(body, "edgecap-demo")


if __name__ == "__main__":
    sys.exit(main())
