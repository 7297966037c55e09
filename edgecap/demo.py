"""`make demo`: the whole pipeline on the built-in synthetic task, on a CPU, with no download; then the model
that ships with edgecap on real photos.

train both decoders (PyTorch) -> export each to a verified ONNX model folder with int8 graphs ->
caption held-out scenes with the torch-free runtime, next to their truth -> attention pictures ->
the bundled Flickr8k model on a few Flickr8k test photos (where ../shared/flickr8k exists), with one
caption-attend figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edgecap.export.exporter import ExportOptions, export_model
from edgecap.runtime.attend import main as caption_attend
from edgecap.runtime.captioner import BUNDLED, Captioner
from edgecap.runtime.cli import main as caption_run
from edgecap.runtime.console import run_main
from edgecap.runtime.files import atomic_write
from edgecap.runtime.render import save_rgb
from edgecap.train.synthetic import SyntheticSplit
from edgecap.train.trainer import TrainConfig, train

DEMO_MODEL = dict(data="synthetic", synthetic_dev=100, batch_size=64, min_freq=1, embed_dim=64, hidden_dim=256,
                  attention_dim=64, dropout=0.1, patience=3,
                  att_reg=0.0)  # no doubly stochastic regulariser: it spreads attention off the two shapes
# The attention decoder trains the tiny encoder from scratch. The plain one then reuses that encoder, frozen, as
# the shipped models share a frozen pretrained one: trained from scratch behind the plain decoder, whose one
# pooled vector gives the encoder a weak signal, the encoder stayed nearly blind (measured on 200 held-out
# scenes: 2-8% exact over 2,000-4,000 scenes and 8-12 epochs, against 75% on the frozen encoder with these settings).
DEMO_RUNS = {"attention": {"synthetic_train": 4000, "epochs": 8, "lr": 2e-3},
             "plain": {"synthetic_train": 4000, "epochs": 12, "lr": 3e-3,
                       "encoder_weights": "{output}/attention/best.pt"}}


RESULTS = "results.json"  # in the output folder: what the README's demo numbers come from


def write_results(path: Path, results: dict[str, Any]) -> None:
    """The demo's numbers as JSON (atomically: a killed demo leaves the previous file or this one)."""
    atomic_write(path, lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))


def _compare(model: Path, split: SyntheticSplit, precision: str) -> dict[str, int]:
    """Runtime captions of held-out scenes beside their truth; -> exact matches, scenes and beam width."""
    cap = Captioner.load(model, precision=precision)
    results = cap.caption([split.image(i) for i in range(len(split))])
    right = 0
    for i, r in enumerate(results):
        truth = split.captions(i)[0]
        right += r.text == truth
        print(f"  {'✓' if r.text == truth else '✗'} {r.text:<48} | truth: {truth}")
    print(f"  {right}/{len(split)} held-out scenes captioned exactly ({precision}, beam {cap.options.num_beams})")
    return {"exact": right, "scenes": len(split), "beams": cap.options.num_beams}


def _bundled_on_photos(out: Path, flickr8k: Path, count: int) -> int:
    """The shipped model on the first Flickr8k test photos: one reference beside each caption, one figure."""
    from edgecap.train.datasets import load_corpus

    test = load_corpus(flickr8k, on_missing="skip").splits["test"][:count]
    cap = Captioner.load(BUNDLED)
    print(f"bundled model {BUNDLED.name} ({cap.precision}, beam {cap.options.num_beams}) "
          f"on {len(test)} Flickr8k test photos:")
    for item, result in zip(test, cap.caption([item.image for item in test])):
        print(f"  {Path(item.image).name}: {result.text}\n  {'':<{len(Path(item.image).name)}}  "
              f"a reference: {item.captions[0]}")
    return caption_attend([str(test[0].image), "--model", str(BUNDLED), "-o", str(out / "flickr8k-attention.png")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgecap-demo", description=__doc__)
    p.add_argument("--output", default="demo-out", help="folder for runs, models and pictures")
    p.add_argument("--show", type=int, default=16, help="held-out scenes to caption")
    p.add_argument("--flickr8k", type=Path, default=Path("../shared/flickr8k"),
                   help="Flickr8k folder for the bundled model's part (skipped where it is missing)")
    p.add_argument("--photos", type=int, default=5, help="Flickr8k test photos for the bundled model")
    args = p.parse_args(argv)

    def body() -> int:
        out = Path(args.output)
        start = time.perf_counter()
        results: dict[str, Any] = {"decoders": {}}
        scenes = SyntheticSplit("test", args.show)
        (out / "scenes").mkdir(parents=True, exist_ok=True)
        for i in range(len(scenes)):
            save_rgb(out / "scenes" / f"scene{i}.png", scenes.image(i))
        for decoder, run_settings in DEMO_RUNS.items():
            run = out / decoder
            print(f"\n== 1. train the {decoder} decoder on synthetic scenes ({run_settings['epochs']} epochs, PyTorch)")
            settings = {k: v.format(output=out) if isinstance(v, str) else v for k, v in run_settings.items()}
            started = time.perf_counter()
            train(TrainConfig.from_flat(**DEMO_MODEL, **settings, decoder=decoder, output=str(run), force=True))
            trained = time.perf_counter()
            print(f"\n== 2. export {run / 'best.pt'} to ONNX (fp32 + int8), verified against PyTorch")
            model = export_model(run / "best.pt", ExportOptions(output=run / "model", int8=True, force=True))
            exported = time.perf_counter()
            print(f"\n== 3. {decoder}: held-out scenes through the torch-free runtime")
            results["decoders"][decoder] = {
                "train_s": round(trained - started, 1), "export_s": round(exported - trained, 1),
                **{precision: _compare(model, scenes, precision) for precision in ("fp32", "int8")}}
            write_results(out / RESULTS, results)
            if decoder == "plain":
                print("  (Show and Tell, on the encoder the attention run trained, frozen: one vector for the whole "
                      "image has to\n   hold both shapes and their order; Show, Attend and Tell looks again at the "
                      "7x7 grid for each word)")
        print("\n== 4. caption-run on the scene folder, pictures with captions and attention maps")
        status = caption_run(["--model", str(out / "attention" / "model"), str(out / "scenes"),
                              "--save", str(out / "captioned"), "--attention"])
        print(f"\npictures in {out / 'captioned'}/ (captions drawn on; *.attention.png: each word's attention)")
        results["synthetic_s"] = round(time.perf_counter() - start, 1)
        write_results(out / RESULTS, results)
        print(f"results in {out / RESULTS}")
        print("\n== 5. the model that ships with edgecap, on real photos")
        if not args.flickr8k.is_dir():
            print(f"  skipped: no Flickr8k at {args.flickr8k} (pass --flickr8k DIR)")
            return status
        return _bundled_on_photos(out, args.flickr8k, args.photos) or status

    return run_main(body, "edgecap-demo")


if __name__ == "__main__":
    sys.exit(main())
