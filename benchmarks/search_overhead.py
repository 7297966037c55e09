#!/usr/bin/env python
"""The search's own cost per caption (greedy and beam bookkeeping), without the graphs (torch-free).

Each image is captioned once through the model's step graph while every step's output is recorded; the timed
rounds then replay those outputs in order, so only `search` itself (masking, top-k, beam bookkeeping,
reordering of state) is timed, on the real log-probabilities of a real model. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from decoder_step import load_images, run_report
from edgecap.runtime.decode import start
from edgecap.runtime.engine import Arrays, Engine, StepOutput
from edgecap.runtime.engines import make_engine
from edgecap.runtime.manifest import Manifest
from edgecap.runtime.search import SearchOptions, search


class Recorder:
    """Runs the real step and keeps its outputs (search calls nothing but `step`)."""

    def __init__(self, engine: Engine):
        self.engine, self.outputs = engine, []

    def step(self, words: np.ndarray, state: Arrays, context: Arrays) -> StepOutput:
        self.outputs.append(self.engine.step(words, state, context))
        return self.outputs[-1]


class Replay:
    """Answers each step with the next recorded output (a fresh copy of its log-probabilities, as a graph gives)."""

    def __init__(self, outputs: list[StepOutput]):
        self.outputs, self.calls = outputs, 0

    def step(self, words: np.ndarray, state: Arrays, context: Arrays) -> StepOutput:
        out = self.outputs[self.calls]
        self.calls += 1
        return StepOutput(out.logprobs.copy(), out.state, out.attention)


def measure(args: argparse.Namespace) -> dict:
    manifest = Manifest.load(args.model)
    pre = manifest.preprocessing
    engine = make_engine("ort", args.model, args.precision, threads=args.threads, manifest=manifest)
    images = pre.batch(load_images(args.images, args.count, pre.size))
    starts = [start(engine, images[i: i + 1]) for i in range(len(images))]
    report = {}
    for beams in args.beams:
        opts = SearchOptions(**{**manifest.search.to_dict(), "num_beams": beams, "num_return_sequences": 1})
        recorded = []
        for state, context in starts:
            recorder = Recorder(engine)
            search(recorder, state, context, opts)
            recorded.append(recorder.outputs)
        rounds = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            replays = [Replay(outputs) for outputs in recorded]
            for (state, context), replay in zip(starts, replays):
                search(replay, state, context, opts)
            rounds.append((time.perf_counter() - t) / len(starts))
            if any(r.calls != len(r.outputs) for r in replays):
                raise RuntimeError("a replayed search took other steps than the recorded one")
        words = sum(map(len, recorded)) / len(recorded)
        ms = float(np.median(rounds)) * 1e3
        report[opts.name] = {"ms_per_caption": ms, "steps_per_caption": words, "us_per_step": ms * 1e3 / words}
    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "model": str(args.model),
            "precision": args.precision, "images": len(starts), "rounds": args.rounds, "search": report}


def markdown(report: dict) -> str:
    lines = ["| search | ms per caption | steps per caption | µs per step |", "|---|---|---|---|"]
    for name, r in report["search"].items():
        lines.append(f"| {name} | {r['ms_per_caption']:.3f} | {r['steps_per_caption']:.1f} | {r['us_per_step']:.0f} |")
    return "\n".join(lines + ["", f"search alone (recorded steps replayed), one image at a time, p50 over "
                                  f"{report['rounds']} rounds of {report['images']} images; `{report['command']}`"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="search_overhead.py", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="model folder written by export-onnx")
    p.add_argument("--precision", default="int8", help="graphs that produce the recorded steps (default int8)")
    p.add_argument("--images", help="image folder or glob (default: noise)")
    p.add_argument("--count", type=int, default=20, help="images (default 20)")
    p.add_argument("--beams", type=lambda t: [int(n) for n in t.split(",")], default=[1, 3, 5],
                   help="beam widths, 1 = greedy (default 1,3,5)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds over all images (default 7)")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args(argv)
    if min(args.count, args.threads, args.rounds, *args.beams) < 1:
        p.error("--count, --threads, --rounds and --beams must be positive")

    return run_report(args, measure, markdown, "search_overhead.py")


if __name__ == "__main__":
    sys.exit(main())
