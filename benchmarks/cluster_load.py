#!/usr/bin/env python
"""caption-batch on a Ray cluster of 1, 2 and 3 nodes of this machine (edgecap.scale.netns: each node a network
namespace with its own address, running `ray start`), and the node-loss runs on 3 nodes: a worker host SIGKILLed
in the middle of a batch job (rows lost, rows twice, how long rows stopped coming), the head host killed with the
driver on it and the job rerun (rows kept, the rest captioned), and a replica's host killed under a served load
(serve_load.py --kill-host, run on the head host). Needs root.

  .venv/bin/python benchmarks/cluster_load.py --json benchmarks/results/cluster-cpu-2core.json \\
      --markdown benchmarks/results/cluster-cpu-2core.md

The nodes share this machine's cores: the 1/2/3-node numbers check that work spreads and nothing is lost, they
are not how a cluster of separate machines scales. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import edgecap
from edgecap.scale.netns import NetnsCluster
from edgecap.scale.serve import INGRESS
from latency import cpu_name  # this folder's benchmarks
from serve_load import jpeg_files, pipeline_rate

BIN = Path(sys.executable).parent
SERVE_LOAD = Path(__file__).with_name("serve_load.py")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, help="folder of JPEGs, the first --count in sorted order "
                                               "(default: synthetic scenes)")
    p.add_argument("--count", type=int, default=300, help="images of each batch job (default: 300)")
    p.add_argument("--batch-size", type=int, default=8, help="caption-batch --batch-size (default: 8)")
    p.add_argument("--kill-after", type=int, default=48, help="rows written before a host is killed (default: 48)")
    p.add_argument("--kill-runs", type=int, default=3, help="batch jobs with a worker host killed (default: 3)")
    p.add_argument("--serve-runs", type=int, default=3, help="served loads with a replica's host killed (default: 3)")
    p.add_argument("--kill-load", type=int, nargs=2, default=(600, 8), metavar=("REQUESTS", "CLIENTS"),
                   help="each served load (default: 600 requests from 8 clients)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def batch(cluster: NetnsCluster, folder: Path, out: Path, args: argparse.Namespace, kill: str | None = None) -> dict:
    """One caption-batch job from the head host, the output's row count polled every 20 ms; with `kill`, that
    host's processes are SIGKILLed once --kill-after rows are written. `stall_s`: the longest wait for new rows
    from the kill on (until the job ended, or until it died with its host)."""
    log = out.with_suffix(".log")
    command = cluster.on("head", str(BIN / "caption-batch"), str(folder), "-o", str(out), "--batch-size",
                         str(args.batch_size), "--address", cluster.address)
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stderr=err)
    t0, rows, arrivals, killed, at_kill = time.perf_counter(), 0, [], None, None
    while proc.poll() is None:
        if (now := lines(out)) != rows:
            rows = now
            arrivals.append(time.perf_counter() - t0)
        if kill and killed is None and rows >= args.kill_after:
            cluster.kill(kill)
            killed, at_kill = time.perf_counter() - t0, rows
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    text = log.read_text()
    run = {"exit": proc.returncode, "seconds": round(seconds, 2), **tally(out, folder)}
    if proc.returncode == 0:
        closing = next(line for line in text.splitlines() if " rows written to " in line)
        run |= {"images_per_s": pipeline_rate(closing), "rows_per_node": dict(re.findall(r"(10\.\d+\.\d+\.\d+): (\d+)",
                                                                                         closing)),
                "delivered_twice": int(m[1]) if (m := re.search(r"; (\d+) row\(s\) delivered twice", closing)) else 0}
    if killed is not None:
        after = [killed, *(t for t in arrivals if t > killed), seconds]
        run |= {"killed_at_s": round(killed, 2), "rows_at_kill": at_kill,
                "stall_s": round(max(b - a for a, b in zip(after, after[1:])), 2),
                "lost_line": next((line for line in text.splitlines() if "lost node" in line), None)}
    return run


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def tally(out: Path, folder: Path) -> dict:
    """Rows in the output against the folder's images: written, missing (lost) and written twice."""
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()[:lines(out)]] if out.exists() else []
    images = {str(p) for p in folder.iterdir()}
    return {"rows": len(paths), "lost": len(images - set(paths)), "duplicates": len(paths) - len(set(paths))}


def serve_crash(cluster: NetnsCluster, args: argparse.Namespace, work: Path, images: list[str]) -> dict:
    """serve_load.py's crash run on the head host: --replicas 2, one replica's host killed 3 s into the load."""
    report = work / "crash.json"
    command = [sys.executable, str(SERVE_LOAD), "--address", cluster.address, "--replicas", "2", "--threads", "1",
               "--count", "48", *images, "--kill-replica-at", "3", "--kill-host",
               "--kill-load", *map(str, args.kill_load), "--json", str(report)]
    done = subprocess.run(cluster.on("head", *command), capture_output=True, text=True, timeout=900)
    if done.returncode:
        sys.exit(f"cluster_load.py: error: serve_load.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(report.read_text())["crash"]


def markdown(report: dict) -> str:
    lines_ = [f"# caption-batch and caption-serve on a cluster of network namespaces, {report['machine']['cpu']} "
              f"({report['machine']['cores']} cores)", "", f"command: `{report['command']}`", "",
              f"{report['settings']['count']} images, batches of {report['settings']['batch_size']}, one 1-CPU node "
              "per namespace (the nodes share the machine's cores).", "",
              "| nodes | exit | images/s (pipeline) | seconds (with Ray's join) | rows per node | lost | duplicates |",
              "|---|---|---|---|---|---|---|"]
    for nodes, r in report["nodes"].items():
        shares = ", ".join(f"{a}: {n}" for a, n in r.get("rows_per_node", {}).items()) or "all on the head"
        lines_.append(f"| {nodes} | {r['exit']} | {r.get('images_per_s')} | {r['seconds']} | {shares} "
                      f"| {r['lost']} | {r['duplicates']} |")
    lines_ += ["", "A worker host killed after the first rows (3 nodes):", "",
               "| run | exit | killed at (s) | rows then | stall (s) | seconds | lost | duplicates | delivered twice |",
               "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["worker_killed"], 1):
        lines_.append(f"| {i} | {r['exit']} | {r['killed_at_s']} | {r['rows_at_kill']} | {r['stall_s']} | "
                      f"{r['seconds']} | {r['lost']} | {r['duplicates']} | {r.get('delivered_twice')} |")
    h = report["head_killed"]
    lines_ += ["", f"The head host killed (the driver with it) after {h['killed']['rows_at_kill']} rows: "
                   f"{h['killed']['rows']} whole rows kept; the cluster started again in {h['restart_s']} s; the "
                   f"rerun (exit {h['rerun']['exit']}) captioned the rest in {h['rerun']['seconds']} s: "
                   f"{h['rerun']['rows']} rows, {h['rerun']['lost']} lost, {h['rerun']['duplicates']} duplicates.", "",
               "A replica's host killed under a served load (caption-serve --replicas 2, HAProxy ingress):", "",
               "| run | replicas on | killed | answers | resets | recovery (s) | replicas after |",
               "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["serve_host_killed"], 1):
        lines_.append(f"| {i} | {', '.join(r['replica_hosts_before'])} | {r['killed_node']} at {r['killed_at_s']} s | "
                      f"{r['outcomes']} | {r['resets']} | {r['recovery_s']} | {', '.join(r['replica_hosts_after'])} |")
    return "\n".join(lines_) + "\n"


def main() -> None:
    args = parse_args(sys.argv[1:])
    load_average = os.getloadavg()[0]
    env = INGRESS["haproxy"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "images"
        folder.mkdir()
        jpeg_files(args, folder, args.count)
        images = ["--images", str(args.images)] if args.images else []
        nodes = {}
        for workers in (0, 1):
            with NetnsCluster(workers=workers, env=env) as cluster:
                nodes[workers + 1] = batch(cluster, folder, work / f"nodes{workers + 1}.jsonl", args)
        with NetnsCluster(workers=2, env=env) as cluster:
            nodes[3] = batch(cluster, folder, work / "nodes3.jsonl", args)
            killed = []
            for i in range(args.kill_runs):
                killed.append(batch(cluster, folder, work / f"kill{i}.jsonl", args, kill="w2"))
                cluster.start(["w2"])
            out = work / "head.jsonl"
            head_killed = batch(cluster, folder, out, args, kill="head")
            t0 = time.perf_counter()
            cluster.restart()
            head = {"killed": head_killed, "restart_s": round(time.perf_counter() - t0, 2),
                    "rerun": batch(cluster, folder, out, args)}
            serving = []
            for i in range(args.serve_runs):
                serving.append(serve_crash(cluster, args, work, images))
                cluster.restart()  # the killed host back, and the deleted application's actors gone
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load_average,
                          "versions": {"edgecap": edgecap.__version__, "ray": version("ray")}},
              "settings": {"count": args.count, "batch_size": args.batch_size, "kill_after": args.kill_after,
                           "images": str(args.images or "synthetic"), "kill_load": args.kill_load},
              "nodes": nodes, "worker_killed": killed, "head_killed": head, "serve_host_killed": serving}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
