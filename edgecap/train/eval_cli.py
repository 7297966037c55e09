"""`caption-eval`: COCO caption metrics of a checkpoint or a model folder on a data set split.

Greedy and beam search side by side, with what a weak model needs beside BLEU: CIDEr-D, the number of
distinct captions, and an image-shuffle check (the same captions scored against other images' references).
`--baseline` compares with an earlier report (e.g. int8 against fp32): identical captions and score changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from edgecap.runtime.console import choice_error, run_main
from edgecap.runtime.engines import DEVICES, RUNTIME_ENGINES, check_choices, make_engine
from edgecap.runtime.manifest import PRECISIONS, Manifest
from edgecap.runtime.search import SearchOptions, check_limits
from edgecap.runtime.vocab import Vocabulary, tokenize

from .data import open_splits
from .engine import TorchEngine
from .evaluate import caption_split
from .metrics import corpus_stats, java_available, score_captions

HEADLINE_METRICS = ("BLEU-4", "CIDEr-D")  # the shuffle check's and the baseline line's
SPLITS = ("dev", "test")
OOV_WARNING = 0.5  # warn when more of the references' words than this are unknown to the model


def _engine(model: Path, engine: str, precision: str | None, device: str | None):
    """A checkpoint runs through PyTorch, a model folder through the named runtime engine;
    -> (engine, vocabulary, preprocessing, search defaults, engine name, precision)."""
    if model.is_file():
        torch_engine = TorchEngine.from_checkpoint(model, device or "cpu")
        return torch_engine, torch_engine.vocabulary, torch_engine.preprocess, SearchOptions(), "torch", "fp32"
    engine = engine or RUNTIME_ENGINES[0]
    manifest = Manifest.load(model)
    precision = precision or manifest.default_precision
    return (make_engine(engine, model, precision, device, manifest=manifest), manifest.vocabulary,
            manifest.preprocessing, manifest.search, engine, precision)


def check_model_flags(args: argparse.Namespace) -> None:
    """--engine/--precision/--device as the model can honour them: a model folder through a runtime engine; a
    checkpoint only in PyTorch fp32, on a device this PyTorch has. Refused in one line before any work."""
    if not Path(args.model).is_file():
        check_choices(args.engine or RUNTIME_ENGINES[0], args.device, args.precision, RUNTIME_ENGINES)
        return
    if args.engine is not None:
        raise ValueError(f"--engine {args.engine} runs a model folder; {args.model} is a checkpoint, which runs in "
                         f"PyTorch (export it first: export-onnx {args.model})")
    if args.precision not in (None, "fp32"):
        raise ValueError(f"--precision {args.precision} needs a model folder with {args.precision} graphs; a "
                         f"checkpoint runs in fp32 (export-onnx {args.model} --{args.precision})")
    check_choices("torch", args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch sees no CUDA device (torch.cuda.is_available() is False)")


def unknown_word_share(refs: dict[str, list[str]], vocab: Vocabulary) -> float:
    """The share of the references' words (tokens, with repeats) that the model's vocabulary lacks."""
    words = [w for captions in refs.values() for c in captions for w in tokenize(c)]
    known = set(vocab.words)
    return sum(w not in known for w in words) / max(1, len(words))


def evaluate(args: argparse.Namespace) -> dict:
    engine, vocab, pre, defaults, engine_name, precision = _engine(Path(args.model), args.engine, args.precision,
                                                                   args.device)
    splits, desc = open_splits(args.data, layout=args.layout, on_missing="skip", image_size=pre.size)
    split = splits[args.split]
    n = min(args.limit or len(split), len(split))
    refs = {split.key(i): split.captions(i) for i in range(n)}
    tokenizer = "ptb" if java_available() and not args.no_java else "simple"
    metrics = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D") if tokenizer == "ptb" else ("BLEU", "ROUGE-L", "CIDEr-D")
    metrics += ("SPICE",) if args.spice else ()
    unknown = unknown_word_share(refs, vocab)
    if unknown > OOV_WARNING:
        print(f"caption-eval: warning: {unknown:.0%} of the reference words are outside the model's vocabulary "
              "(another data set or language?): expect scores near 0", file=sys.stderr)
    length_penalty = defaults.length_penalty if args.length_penalty is None else args.length_penalty
    report = {"model": str(args.model), "engine": engine_name, "precision": precision, "data": desc,
              "split": args.split, "images": n, "tokenizer": tokenizer, "reference_words_unknown": unknown,
              "length_penalty": length_penalty,
              "results": {}, "captions": {}}
    rng = np.random.default_rng(0)
    keys = list(refs)
    shuffled_keys = [keys[j] for j in rng.permutation(len(keys))]
    beam_widths = args.beams or sorted({1, defaults.num_beams})
    for beams in beam_widths:
        opts = dataclasses.replace(defaults, num_beams=beams, num_return_sequences=1,
                                   max_length=args.max_length or defaults.max_length, length_penalty=length_penalty)
        name = opts.name
        hyps = caption_split(engine, split, pre, opts, n, progress=True)
        texts = {k: vocab.decode(h.tokens) for k, h in hyps.items()}
        shuffled = {k: texts[s] for k, s in zip(keys, shuffled_keys)}
        report["results"][name] = {
            "scores": score_captions(refs, texts, tokenizer=tokenizer, metrics=metrics),
            "shuffled": score_captions(refs, shuffled, tokenizer=tokenizer, metrics=HEADLINE_METRICS),
            "stats": corpus_stats(texts)}
        report["captions"][name] = texts
    return report


def read_baseline(path: Path) -> dict:
    """An earlier caption-eval JSON report, checked for the fields a comparison reads."""
    try:
        baseline = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"baseline {path} is not a caption-eval JSON report: {e}") from None
    if not isinstance(baseline, dict) or not {"split", "results", "captions", "model", "precision"} <= set(baseline):
        raise ValueError(f"baseline {path} is not a caption-eval JSON report (run caption-eval --json first)")
    return baseline


def compare(report: dict, baseline: dict) -> dict:
    """Per search in both reports: captions identical to the baseline's on the same images, score changes."""
    if report["split"] != baseline["split"]:
        raise ValueError(f"baseline scored the {baseline['split']} split, this run the {report['split']} split")
    out = {}
    for name in [n for n in report["captions"] if n in baseline["captions"]]:
        ours, theirs = report["captions"][name], baseline["captions"][name]
        if ours.keys() != theirs.keys():
            raise ValueError(f"baseline {name} captions are for other images ({len(theirs)} images, "
                             f"{len(ours.keys() & theirs.keys())} in common with this run's {len(ours)})")
        before, after = baseline["results"][name]["scores"], report["results"][name]["scores"]
        out[name] = {"identical": sum(ours[k] == theirs[k] for k in ours), "images": len(ours),
                     "score_change": {m: after[m] - before[m] for m in after if m in before}}
    if not out:
        raise ValueError(f"baseline has no search in common with this run ({', '.join(baseline['captions'])})")
    return {"model": baseline["model"], "engine": baseline.get("engine", "?"), "precision": baseline["precision"],
            "searches": out}


def markdown(report: dict) -> str:
    """A short table: one row per search setting."""
    names = [m for m in next(iter(report["results"].values()))["scores"]]
    head = ["search", *names, "distinct", "dangling ends", "shuffled BLEU-4", "shuffled CIDEr-D"]
    lines = [f"{report['model']} ({report['engine']} {report['precision']}) on {report['split']}, "
             f"{report['images']} images, {report['tokenizer']} tokenizer", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["results"].items():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r["scores"].values()]
        cells += [str(r["stats"]["distinct_captions"]), f"{r['stats']['dangling_share']:.1%}",
                  f"{r['shuffled']['BLEU-4']:.3f}",
                  f"{r['shuffled']['CIDEr-D']:.3f}"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    if "baseline" in report:
        b = report["baseline"]
        lines += ["", f"Against {b['model']} ({b['engine']} {b['precision']}):"]
        for name, c in b["searches"].items():
            change = ", ".join(f"{m} {round(v, 3) or 0.0:+.3f}" for m, v in c["score_change"].items()
                               if m in HEADLINE_METRICS)
            lines.append(f"- {name}: {c['identical']}/{c['images']} captions identical "
                         f"({c['identical'] / c['images']:.1%}); {change}")
    return "\n".join(lines)


def beam_widths(text: str) -> list[int]:
    """`1,3,5` -> [1, 3, 5] (--beams); argparse names the flag when this fails."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caption-eval", description=__doc__)
    p.add_argument("--model", required=True, help="a checkpoint (.pt) or a model folder")
    p.add_argument("--data", required=True, help="data set folder/file, or synthetic")
    p.add_argument("--layout", help="force a data layout")
    p.add_argument("--split", default="test", metavar="{dev,test}", help="(default: test)")
    p.add_argument("--engine", metavar="{" + ",".join(RUNTIME_ENGINES) + "}",
                   help=f"runtime engine for a model folder (default: {RUNTIME_ENGINES[0]}; a checkpoint runs in "
                        "PyTorch, fp32)")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="graphs of a model folder (default: the folder's best, fp32 where it has it)")
    p.add_argument("--device", metavar="{" + ",".join(DEVICES) + "}", help="(default: the engine's first, cpu)")
    p.add_argument("--beams", metavar="K[,K...]", type=beam_widths,
                   help="comma-separated beam widths, 1 = greedy (default: 1 and the model's own)")
    p.add_argument("--max-length", type=int, help="most words per caption (default: the model's)")
    p.add_argument("--length-penalty", metavar="X", type=float,
                   help="beam search: a caption's score is its summed log-probability / length ** X "
                        "(default: the model's, 1.0 from export-onnx)")
    p.add_argument("--limit", metavar="N", type=int, help="first N images of the split (default: all)")
    p.add_argument("--spice", action="store_true", help="also try SPICE (needs Stanford CoreNLP models)")
    p.add_argument("--no-java", action="store_true", help="simple tokenizer, no METEOR (no Java needed)")
    p.add_argument("--json", type=Path, help="write scores and captions here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--baseline", type=Path,
                   help="an earlier --json report to compare with (identical captions, score changes)")
    args = p.parse_args(argv)

    def body() -> None:
        if args.split not in SPLITS:
            raise choice_error("split", args.split, SPLITS)
        check_model_flags(args)
        for beams in args.beams or [None]:
            check_limits(beams, args.max_length)
        if args.length_penalty is not None and not math.isfinite(args.length_penalty):
            raise ValueError(f"--length-penalty must be a finite number, got {args.length_penalty}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        for flag, out in (("--json", args.json), ("--markdown", args.markdown)):
            if out is not None and not out.parent.is_dir():
                raise ValueError(f"could not write {flag} {out}: no folder {out.parent}")  # said before, not after
        baseline = read_baseline(args.baseline) if args.baseline else None
        report = evaluate(args)
        if baseline is not None:
            report["baseline"] = compare(report, baseline)
        table = markdown(report)
        print(table)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(table + "\n")

    return run_main(body, "caption-eval")


if __name__ == "__main__":
    sys.exit(main())
