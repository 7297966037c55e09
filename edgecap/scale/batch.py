"""`caption-batch SOURCE... --output OUT.jsonl`: caption large image collections with a Ray Data pipeline.

  caption-batch photos/ more/*.jpg list.txt --output captions.jsonl [--actors N] [--batch-size B]

Paths -> `map_batches` over a pool of Captioner actors (read, decode, caption) -> rows written by this process as
they arrive: JSONL `{path, caption, score}` or, with --format parquet, a folder of Parquet parts. A rerun skips
paths already in the output (so a killed run resumes); an unreadable image gives a row with an `error`; an actor
that dies is replaced and its batch retried, so every input appears exactly once, also when a whole node of a
cluster is lost (one line names it; the closing line counts each node's rows, and an error row names the node
that could not read the image). SIGTERM or Ctrl-C keeps the rows written so far and stops (exit 128 + the
signal's number); the same command resumes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

from edgecap.runtime.cli import add_model_arguments, captioner_kwargs
from edgecap.runtime.console import run_main
from edgecap.runtime.errors import EdgecapError

from .cluster import (Stop, add_cluster_arguments, check_model, connect, ignore_signals, live_nodes, require,
                      signals_restored, stop_on_signals)
from .collection import image_paths
from .outputs import open_output

PROG = "caption-batch"
FORMATS = ("jsonl", "parquet")
FAIL_ONCE = "EDGECAP_BATCH_FAIL_ONCE"  # test hook: a marker path; the first actor batch that creates it dies


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image file, folder (with its subfolders), glob, list file (.txt: one path per line), "
                        "or a URI Ray Data / pyarrow can read (s3://, gs://, file://)")
    add_model_arguments(p, threads=1)
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="caption the images in a folder's subfolders too (default); --no-recursive: its top level "
                        "only, as caption-run --no-recursive")
    p.add_argument("--output", "-o", required=True, type=Path, metavar="OUT",
                   help="JSONL file (or Parquet folder with --format parquet); rows already there are kept")
    p.add_argument("--format", default="jsonl", choices=FORMATS, help="output format (default: jsonl)")
    p.add_argument("--actors", metavar="N", type=int,
                   help="Captioner actors, each with --threads threads (default: the cluster's CPUs / --threads)")
    p.add_argument("--batch-size", metavar="B", type=int, default=16, help="images per actor call (default: 16)")
    add_cluster_arguments(p)
    return p


class CaptionActor:
    """A Ray Data actor: a pandas batch of paths -> the same paths with caption and score (and tags, with --tags),
    or error, and the address of the node it ran on (`node`, counted and dropped by the driver). With `name_node`
    (a cluster of several nodes) an error says which node could not read the image."""

    def __init__(self, captioner: dict, fail_once: str | None = None, name_node: bool = False) -> None:
        import ray

        from edgecap.runtime.captioner import Captioner

        self.captioner = Captioner.load(**captioner)
        self.fail_once = fail_once
        self.node = ray.util.get_node_ip_address()
        self.where = f" (read on node {self.node})" if name_node else ""

    def __call__(self, batch):
        from edgecap.runtime.errors import DataError

        from .collection import read_image

        if self.fail_once and not os.path.exists(self.fail_once):
            Path(self.fail_once).touch()
            os._exit(1)  # the test hook: this actor dies in the middle of its batch
        images, errors = {}, {}
        for path in batch["path"]:
            try:
                images[path] = read_image(path, self.captioner.max_pixels)
            except DataError as e:
                errors[path] = f"{e}{self.where}"
        captions = dict(zip(images, self.captioner.caption_batch(list(images.values())))) if images else {}
        batch["caption"] = [c.text if (c := captions.get(p)) else None for p in batch["path"]]
        batch["score"] = [c.score if (c := captions.get(p)) else None for p in batch["path"]]
        batch["error"] = [errors.get(p) for p in batch["path"]]
        if self.captioner.tags:
            batch["tags"] = [[{"label": t, "probability": pr} for t, pr in c.tags] if (c := captions.get(p)) else None
                             for p in batch["path"]]
        batch["node"] = self.node
        return batch


def check_options(args: argparse.Namespace) -> None:
    for flag in ("actors", "batch_size"):
        if (value := getattr(args, flag)) is not None and value < 1:
            raise EdgecapError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def caption_batch(args: argparse.Namespace) -> int:
    """The command's body: 0 when every image was captioned, 1 when some rows are errors or some source named
    nothing (each warned about), 128 + N when signal N stopped it. The model is opened here first: a bad one is a
    one-line error before Ray starts or the output is touched."""
    check_options(args)
    captioner = captioner_kwargs(args, PROG)
    check_model(captioner)
    unusable: list[str] = []

    def warn(line: str) -> None:
        unusable.append(line)
        print(f"{PROG}: warning: {line}", file=sys.stderr)

    paths = image_paths(args.sources, warn=warn, recursive=args.recursive)
    with open_output(args.output, args.format) as output:
        todo = [p for p in paths if p not in output.done]
        if len(todo) < len(paths):
            print(f"{PROG}: {len(paths) - len(todo)} of {len(paths)} images already in {args.output}; "
                  "captioning the rest", file=sys.stderr)
        try:
            if todo:
                run_pipeline(args, captioner, todo, output)
        except Stop as stop:
            print(f"{PROG}: {stop.signal}: stopped with {output.written} new row(s) in {args.output}; the same "
                  "command captions the rest", file=sys.stderr)
            return 128 + stop.signum
        errors = output.errors
    return 1 if errors or unusable else 0


def run_pipeline(args: argparse.Namespace, captioner: dict, todo: list[str], output) -> None:
    """Paths -> actor pool -> output rows, with a progress bar and a closing count (on a cluster: rows per node,
    and a line for each node lost meanwhile, whose batches Ray Data ran again on the others)."""
    tqdm = require("tqdm", PROG).tqdm
    data = require("ray.data", PROG)
    connect(args.address, PROG, args.verbose)
    stop_on_signals()  # after Ray's start, whose handlers it replaces
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no execution plans and progress notices
    data.DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
    ray = require("ray", PROG)
    nodes = live_nodes()
    actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1) // args.threads))
    actors = min(actors, math.ceil(len(todo) / args.batch_size))  # no actor loads a model it has no batch for
    dataset = data.from_items([{"path": p} for p in todo]).map_batches(
        CaptionActor, fn_constructor_kwargs={"captioner": captioner, "fail_once": os.environ.get(FAIL_ONCE),
                                             "name_node": len(nodes) > 1},
        batch_size=args.batch_size, batch_format="pandas", compute=data.ActorPoolStrategy(size=actors),
        num_cpus=args.threads)  # Ray Data restarts a dead actor and retries its batch
    per_node: Counter[str] = Counter()  # rows received from each node, a row delivered twice included
    start = time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="img", desc=PROG, file=sys.stderr) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
                per_node.update(batch.pop("node"))
                bar.update(output.write(batch.to_dict("records")))
    finally:
        ignore_signals()  # from here on the command ends anyway (Ray's shutdown at exit is bounded)
    seconds = time.perf_counter() - start
    shares = ", ".join(f"{address}: {n}" for address, n in sorted(per_node.items()))
    where = f" on {len(per_node)} node(s) ({shares})" if len(nodes) > 1 else ""
    twice = sum(per_node.values()) - output.written  # a batch Ray Data ran again after its actor was lost
    dropped = f"; {twice} row(s) delivered twice, written once" if twice else ""
    print(f"{PROG}: {output.written} rows written to {args.output} ({output.errors} unreadable) with {actors} "
          f"actor(s){where} in {seconds:.1f} s, {output.written / seconds:.1f} images/s{dropped}", file=sys.stderr)
    if lost := sorted(nodes[i] for i in set(nodes) - set(live_nodes())):
        print(f"{PROG}: lost node(s) {', '.join(lost)} during the run: the batches they had were captioned again "
              "on the others", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with signals_restored():
        return run_main(lambda: caption_batch(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
