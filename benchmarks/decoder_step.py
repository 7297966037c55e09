#!/usr/bin/env python
"""Decoder-step latency against the number of rows, for each precision of a model folder (torch-free).

Beam search runs the step graph on num_beams rows per image, so how a precision's step scales with rows
decides what beam search costs over greedy. Each round times a block of back-to-back calls per row count (the
first calls of a block untimed), as a decoding loop makes them, with the row counts in turn, so a slow moment
of a shared machine hits them alike; precisions run one after the other. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgecap.runtime.console import run_main
from edgecap.runtime.decode import start
from edgecap.runtime.engine import Engine
from edgecap.runtime.engines import make_engine
from edgecap.runtime.manifest import Manifest
from edgecap.runtime.sources import read_images


def load_images(pattern: str | None, count: int, size: int) -> list[np.ndarray]:
    """The first `count` readable images of a folder or glob, else uniform noise at the model's size."""
    if pattern is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    return read_images(pattern, count)


def step_inputs(engine: Engine, images: np.ndarray, rows: int):
    """Words, state and context for `rows` rows: the images' own prepared state and context, cycled."""
    state, context = start(engine, images)
    pick = np.arange(rows) % len(images)
    words = np.full(rows, 4, np.int64)  # the first ordinary word of every vocabulary
    return words, {k: v[pick] for k, v in state.items()}, {k: v[pick] for k, v in context.items()}


def measure(args: argparse.Namespace) -> dict:
    manifest = Manifest.load(args.model)
    precisions = args.precisions or list(manifest.graphs)
    pre = manifest.preprocessing
    images = pre.batch(load_images(args.images, args.count, pre.size))
    engines = {p: make_engine("ort", args.model, p, threads=args.threads, manifest=manifest) for p in precisions}
    times: dict[tuple[str, int], list[float]] = {(p, n): [] for p in precisions for n in args.rows}
    for precision, engine in engines.items():
        inputs = {n: step_inputs(engine, images, n) for n in args.rows}
        for _ in range(args.rounds):
            for rows, feeds in inputs.items():
                for call in range(args.warmup + args.block):
                    t = time.perf_counter()
                    engine.step(*feeds)
                    if call >= args.warmup:
                        times[(precision, rows)].append((time.perf_counter() - t) * 1e3)
    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "model": str(args.model),
            "threads": args.threads, "rounds": args.rounds, "block": args.block, "warmup": args.warmup,
            "step_ms_p50": {p: {str(n): float(np.median(times[(p, n)])) for n in args.rows} for p in precisions}}


def markdown(report: dict) -> str:
    rows = list(next(iter(report["step_ms_p50"].values())))
    lines = ["| precision | " + " | ".join(f"{n} row{'s' * (n != '1')}" for n in rows) + " | per extra row |",
             "|---|" + "---|" * (len(rows) + 1)]
    for precision, ms in report["step_ms_p50"].items():
        first, last = int(rows[0]), int(rows[-1])
        slope = (ms[rows[-1]] - ms[rows[0]]) / (last - first) if last > first else float("nan")
        lines.append(f"| {precision} | " + " | ".join(f"{ms[n]:.3f}" for n in rows) + f" | {slope:.3f} |")
    return "\n".join(lines + ["", f"ms per decoder step call, p50 over {report['rounds']} rounds of "
                                  f"{report['block']} timed calls per row count, {report['threads']} threads; "
                                  f"`{report['command']}`"])


def run_report(args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict],
               markdown: Callable[[dict], str], prog: str) -> int:
    """Measure, print the markdown table and write the JSON when `--json` asks; errors as one line (run_main)."""

    def body() -> None:
        report = measure(args)
        print(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    return run_main(body, prog)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="decoder_step.py", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="model folder written by export-onnx")
    p.add_argument("--images", help="image folder or glob for realistic state and context (default: noise)")
    p.add_argument("--count", type=int, default=8, help="images (default 8)")
    p.add_argument("--precisions", type=lambda t: t.split(","), help="comma-separated (default: all in the folder)")
    p.add_argument("--rows", type=lambda t: sorted({int(n) for n in t.split(",")}), default=[1, 3, 5, 8],
                   help="row counts (default 1,3,5,8)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="rounds over the row counts (default 10)")
    p.add_argument("--block", type=int, default=30, help="timed calls per row count and round (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each block (default 3)")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args(argv)
    if min(args.count, args.threads, args.rounds, args.block, *args.rows) < 1 or args.warmup < 0:
        p.error("--count, --threads, --rounds, --block and --rows must be positive, --warmup at least 0")

    return run_report(args, measure, markdown, "decoder_step.py")


if __name__ == "__main__":
    sys.exit(main())
