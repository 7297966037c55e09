#!/usr/bin/env python
"""Scale-out benchmark: caption-serve under 1, 4 and 16 concurrent clients with dynamic batching on and off,
a bounded overload run, and caption-batch against caption-run on the same folder. One run, one machine.

  python benchmarks/serve_load.py --images ../shared/flickr8k/images --requests 24 --ingress haproxy \
      --json benchmarks/results/serve-haproxy-cpu-2core.json --markdown benchmarks/results/serve-haproxy-cpu-2core.md

With --kill-replica-at S it measures a crash instead: --replicas N under a bounded load (--kill-load), one replica
SIGKILLed S seconds in; every answer's status and shape, connection resets, and how long until the deployment
is back to N replicas; and the same 1-client latency pairing against caption-run first.

  python benchmarks/serve_load.py --images ../shared/flickr8k/images --replicas 2 --kill-replica-at 3

With --address it joins a running cluster from one of its nodes (serving on that node's address, port 8000)
instead of starting a local Ray, and with --kill-host the crash takes the replica's whole host: every process in
its network namespace (a node of edgecap.scale.netns, as benchmarks/cluster_load.py runs it). Answers are then
checked against Captioner.caption too.

The latency baseline is what caption-run does per image of a live source: decode the JPEG, then caption it
alone (`Captioner.caption(bytes)`), on the same model, threads and images, alternating with one client's
requests. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import ray
import requests
from ray import serve

import edgecap
from edgecap.runtime.captioner import Captioner
from edgecap.runtime.timing import percentiles
from edgecap.scale import netns, serve as caption_serve
from edgecap.scale.cluster import connect
from edgecap.train.synthetic import SyntheticSplit
from latency import cpu_name  # this folder's latency benchmark

CLIENTS = (1, 4, 16)
MODES = {"batching": 8, "no batching": 1}  # mode -> --max-batch-size
TIMEOUT = 60.0  # seconds: a request that takes longer counts as hanging


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--images", type=Path, help="folder of JPEGs, the first --count in sorted order "
                                               "(default: synthetic scenes)")
    p.add_argument("--count", type=int, default=48, help="distinct images the clients cycle through (default: 48)")
    p.add_argument("--requests", type=int, default=12, help="requests per client at each level (default: 12)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per replica (default: all cores)")
    p.add_argument("--ingress", choices=caption_serve.INGRESS, default="haproxy", help="caption-serve --ingress")
    p.add_argument("--overload", type=int, nargs=2, default=(500, 32), metavar=("REQUESTS", "CLIENTS"),
                   help="the overload run (default: 500 requests from 32 clients)")
    p.add_argument("--overload-queue", type=int, default=8, help="--max-queued during the overload run (default: 8)")
    p.add_argument("--batch-images", type=int, default=200, help="folder size for caption-batch vs caption-run")
    p.add_argument("--replicas", type=int, default=1, help="caption-serve --replicas (default: 1)")
    p.add_argument("--kill-replica-at", type=float, metavar="S",
                   help="measure a crash instead: SIGKILL one replica S seconds into the --kill-load run")
    p.add_argument("--kill-load", type=int, nargs=2, default=(600, 8), metavar=("REQUESTS", "CLIENTS"),
                   help="the crash run's load (default: 600 requests from 8 clients)")
    p.add_argument("--kill-host", action="store_true",
                   help="with --kill-replica-at: SIGKILL every process of the replica's host (its network namespace) "
                        "instead of the replica alone")
    p.add_argument("--address", metavar="ADDR",
                   help="join this Ray cluster (run on one of its nodes; with --kill-replica-at only) instead of "
                        "starting a local Ray")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def jpeg_files(args: argparse.Namespace, folder: Path, n: int) -> list[Path]:
    """`n` JPEGs in `folder`: copies of --images, else synthetic scenes."""
    if args.images:
        for src in sorted(args.images.glob("*.jpg"))[:n]:
            shutil.copy(src, folder / src.name)
    else:
        split = SyntheticSplit("test", n, image_size=224)
        for i in range(n):
            cv2.imwrite(str(folder / f"scene{i:04d}.jpg"), cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))
    return sorted(folder.glob("*.jpg"))


def paired(url: str, captioner: Captioner, jpegs: list[bytes], rounds: int = 2) -> dict:
    """caption-run's per-image latency (decode + caption one image, in this process, as for a live source) and
    one client's request latency, taken alternately image by image so that both see the same machine load."""
    here, served = [], []
    with requests.Session() as session:
        for data in [jpegs[0], *jpegs * rounds]:
            t0 = time.perf_counter()
            captioner.caption(data)
            t1 = time.perf_counter()
            session.post(f"{url}/v1/caption", data=data, headers={"Content-Type": "image/jpeg"},
                         timeout=TIMEOUT).raise_for_status()
            here.append((t1 - t0) * 1e3)
            served.append((time.perf_counter() - t1) * 1e3)
    here, served = here[1:], served[1:]  # the first pair warms both paths
    return {"images": len(here), "caption_run": {k: round(v, 2) for k, v in percentiles(here).items()},
            "served": {k: round(v, 2) for k, v in percentiles(served).items()},
            "overhead_p50_ms": round(percentiles([b - a for a, b in zip(here, served)])["p50"], 2)}


def load(url: str, jpegs: list[bytes], clients: int, total: int) -> dict:
    """`total` requests from `clients` threads (each with a keep-alive session); statuses, throughput, latency."""
    def client(k: int) -> list[tuple[int, float, int]]:
        out = []
        with requests.Session() as session:
            for i in range(k, total, clients):
                t0 = time.perf_counter()
                try:
                    r = session.post(f"{url}/v1/caption", data=jpegs[i % len(jpegs)], timeout=TIMEOUT,
                                     headers={"Content-Type": "image/jpeg"})
                    status, batch = r.status_code, r.json()["captions"][0]["batch"] if r.ok else 0
                except requests.Timeout:
                    status, batch = 0, 0
                out.append((status, (time.perf_counter() - t0) * 1e3, batch))
        return out

    client(0)  # warm the path
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for part in pool.map(client, range(clients)) for a in part]
    seconds = time.perf_counter() - t0
    ok = [ms for status, ms, _ in answers if status == 200]
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status or "timeout")] = statuses.get(str(status or "timeout"), 0) + 1
    batches = [b for status, _, b in answers if status == 200]
    return {"clients": clients, "requests": total, "statuses": statuses, "seconds": round(seconds, 2),
            "throughput_rps": round(len(ok) / seconds, 2),
            **{k: round(v, 2) for k, v in (percentiles(ok) if ok else {}).items()},
            "max_ms": round(max(ms for _, ms, _ in answers), 1),
            "mean_batch": round(sum(batches) / len(batches), 2) if batches else 0}


def deploy(args: argparse.Namespace, name: str, flags: list[str]) -> str:
    """One caption-serve application under /NAME with the given flags over --model/--threads."""
    common = ["--ingress", args.ingress, *(["--model", args.model] if args.model else []),
              *(["--threads", str(args.threads)] if args.threads else [])]
    app_args = caption_serve.build_parser().parse_args(common + flags)
    serve.run(caption_serve.application(app_args, caption_serve.captioner_kwargs(app_args, "serve_load")),
              name=name, route_prefix=f"/{name}")
    return name


def crash(url: str, name: str, jpegs: list[bytes], expected: list[str], args: argparse.Namespace) -> dict:
    """--kill-load requests (each client a keep-alive session); one replica SIGKILLed --kill-replica-at seconds
    in, or with --kill-host every process of its host. Each answer is counted by status and shape (JSON `{"error"}`
    or not; a 200 whose caption differs from `expected`, Captioner.caption's, is "200 wrong caption"); a request
    without an HTTP answer is a reset (or a timeout). Recovery: from the kill until `name` runs --replicas live
    replicas again."""
    total, clients = args.kill_load
    outcomes: list[tuple[float, str]] = []  # (seconds since the load began, outcome)

    def client(k: int) -> None:
        with requests.Session() as session:
            for i in range(k, total, clients):
                try:
                    r = session.post(f"{url}/v1/caption", data=jpegs[i % len(jpegs)], timeout=TIMEOUT,
                                     headers={"Content-Type": "image/jpeg"})
                    try:
                        shape = "json" if r.ok or set(r.json()) == {"error"} else "other"
                        right = not r.ok or r.json()["captions"][0]["caption"] == expected[i % len(jpegs)]
                    except ValueError:
                        shape, right = "not json", True
                    retry = " retry-after" if r.headers.get("Retry-After") else ""
                    outcome = f"{r.status_code}" + ("" if r.ok else f" {shape}{retry}") + ("" if right else
                                                                                          " wrong caption")
                except requests.Timeout:
                    outcome = "timeout"
                except requests.ConnectionError:
                    outcome = "reset"
                outcomes.append((time.perf_counter() - t0, outcome))

    where = lambda _: (os.getpid(), ray.util.get_node_ip_address())
    replicas = ray.get([a.__ray_call__.remote(where) for a in caption_serve.replicas(name)], timeout=TIMEOUT)
    if args.kill_host:  # a replica on another host than this driver's
        here = netns.identify(os.getpid())
        if not (replicas := [(p, a) for p, a in replicas if netns.identify(p) != here]):
            sys.exit("serve_load.py: error: every replica runs on this driver's host: no other host to kill")
    (victim, victim_node), hosts_before = replicas[0], replica_hosts(name)
    host = netns.identify(victim) if args.kill_host else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        time.sleep(args.kill_replica_at)
        netns.kill_all(host) if host else os.kill(victim, signal.SIGKILL)
        killed = time.perf_counter() - t0
        recovered, down = None, False
        while recovered is None and time.perf_counter() - t0 < killed + 120:
            status = serve.status().applications[name].deployments["CaptionServer"]
            healthy = status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == args.replicas
            down = down or not healthy
            if down and healthy:
                recovered = time.perf_counter() - t0 - killed
            time.sleep(0.1)
        for f in futures:
            f.result()
    counts: dict[str, int] = {}
    for _, outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    after_kill = [o for t, o in outcomes if t >= killed]
    failed = [round(t - killed, 2) for t, o in outcomes if o in ("reset", "timeout") or o.startswith("5")]
    hosts = {"replica_hosts_before": hosts_before, "replica_hosts_after": replica_hosts(name),
             "killed_node": victim_node} if args.kill_host else {}
    return {"requests": total, "clients": clients, "replicas": args.replicas, "killed_at_s": round(killed, 2),
            "outcomes": dict(sorted(counts.items())), "resets": counts.get("reset", 0),
            "non_json_errors": sum(n for o, n in counts.items() if "not json" in o or "other" in o),
            "wrong_captions": sum(n for o, n in counts.items() if "wrong caption" in o),
            "answered_after_kill": len(after_kill), "failures_s_after_kill": failed, **hosts,
            "recovery_s": round(recovered, 2) if recovered is not None else None, "seconds": round(max(t for t, _ in outcomes), 2)}


def replica_hosts(name: str) -> list[str]:
    """The address of the node each live replica of `name` runs on, sorted."""
    where = [a.__ray_call__.remote(lambda _: ray.util.get_node_ip_address()) for a in caption_serve.replicas(name)]
    return sorted(ray.get(where, timeout=TIMEOUT))


def crash_report(args: argparse.Namespace, jpegs: list[bytes], captioner: Captioner, url: str) -> dict:
    name = deploy(args, "crash", ["--replicas", str(args.replicas)])
    base = paired(f"{url}/{name}", captioner, jpegs)
    expected = [captioner.caption(data).text for data in jpegs]
    report = {"baseline": base, "crash": crash(f"{url}/{name}", name, jpegs, expected, args)}
    serve.delete(name, _blocking=False)  # a cluster keeps running after this driver (waiting: 30 s more)
    return report


def timed(command: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"serve_load.py: error: {shlex.join(command)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - t0, proc.stderr


def pipeline_rate(log: str) -> float:
    """caption-batch's own images/s, from its closing line (the pipeline alone, without Ray's start)."""
    return float(log.rsplit(" images/s", 1)[0].rsplit(", ", 1)[1])


def batch_vs_run(args: argparse.Namespace, files: list[Path], work: Path) -> dict:
    """Whole commands on the same folder: caption-run (one process, batches of 8, all cores) and caption-batch
    (a fresh local Ray, one single-thread actor per core); caption-batch's own images/s excludes Ray's start."""
    folder = work / "batch"
    folder.mkdir()
    for f in files[:args.batch_images]:
        os.link(f, folder / f.name)
    model = ["--model", args.model] if args.model else []
    bin_dir = Path(sys.executable).parent
    run_s, _ = timed([str(bin_dir / "caption-run"), str(folder), "--quiet", *model])
    batch_s, log = timed([str(bin_dir / "caption-batch"), str(folder), "-o", str(work / "out.jsonl"), *model])
    pipeline = pipeline_rate(log)
    n = len(list(folder.iterdir()))
    return {"images": n, "caption_run_s": round(run_s, 2), "caption_run_images_per_s": round(n / run_s, 2),
            "caption_batch_s": round(batch_s, 2), "caption_batch_images_per_s": round(n / batch_s, 2),
            "caption_batch_pipeline_images_per_s": pipeline}


def markdown(report: dict) -> str:
    lines = [f"# caption-serve (--ingress {report['settings']['ingress']}) / caption-batch on "
             f"{report['machine']['cpu']} ({report['machine']['cores']} cores)",
             "", f"command: `{report['command']}`", "",
             f"One client against caption-run's work per image (decode + caption, in process), alternately on "
             f"{report['baseline']['images']} images: caption-run p50 {report['baseline']['caption_run']['p50']} ms, "
             f"served p50 {report['baseline']['served']['p50']} ms (p99 {report['baseline']['caption_run']['p99']} and "
             f"{report['baseline']['served']['p99']} ms); p50 of the pairwise difference "
             f"{report['baseline']['overhead_p50_ms']} ms.", "",
             "| mode | clients | requests | throughput (req/s) | p50 ms | p99 ms | mean batch | statuses |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, levels in report["serve"].items():
        for r in levels:
            lines.append(f"| {mode} | {r['clients']} | {r['requests']} | {r['throughput_rps']} | {r['p50']} | "
                         f"{r['p99']} | {r['mean_batch']} | {r['statuses']} |")
    f, o, b = report["floors"], report["overload"], report["batch"]
    lines += ["", f"Overload: {o['requests']} requests from {o['clients']} clients (queue limit "
                  f"{report['settings']['overload_queue']}): {o['statuses']}, slowest {o['max_ms']} ms; "
                  f"healthy afterwards: {o['healthy_after']}.", "",
              f"caption-batch vs caption-run on {b['images']} images: caption-run {b['caption_run_s']} s "
              f"({b['caption_run_images_per_s']} images/s); caption-batch {b['caption_batch_s']} s "
              f"({b['caption_batch_images_per_s']} images/s including Ray's start, "
              f"{b['caption_batch_pipeline_images_per_s']} images/s in the pipeline).", "", "| floor | value | target | met |",
              "|---|---|---|---|"]
    for name, (value, target, met) in f.items():
        lines.append(f"| {name} | {value} | {target} | {'✓' if met else '✗'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args(sys.argv[1:])
    if (args.address or args.kill_host) and args.kill_replica_at is None:
        sys.exit("serve_load.py: error: --address and --kill-host measure a crash: give --kill-replica-at")
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        files = jpeg_files(args, work / "images",  # the crash run has no caption-batch part
                           args.count if args.kill_replica_at is not None else max(args.count, args.batch_images))
        jpegs = [f.read_bytes() for f in files[:args.count]]
        captioner = Captioner.load(args.model, threads=args.threads)
        os.environ.update(caption_serve.INGRESS[args.ingress])  # for a local Ray; a cluster's nodes have theirs
        connect(args.address, "serve_load.py")
        host, port = (ray.util.get_node_ip_address(), 8000) if args.address else ("127.0.0.1", free_port())
        serve.start(http_options={"host": "0.0.0.0" if args.address else host, "port": port})
        url = f"http://{host}:{port}"
        if args.kill_replica_at is not None:
            report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                      "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load_average,
                                  "versions": {"edgecap": edgecap.__version__, "ray": ray.__version__}},
                      "settings": {"ingress": args.ingress, "threads": args.threads, "count": len(jpegs),
                                   "address": args.address, "kill_host": args.kill_host},
                      **crash_report(args, jpegs, captioner, url)}
            ray.shutdown()
            text = json.dumps(report, indent=1)
            if args.json:
                args.json.write_text(text + "\n")
            print(text)
            return
        results = {}
        for mode, batch in MODES.items():
            name = deploy(args, mode.replace(" ", "-"), ["--max-batch-size", str(batch)])
            if mode == "batching":  # the default configuration
                base = paired(f"{url}/{name}", captioner, jpegs)
            results[mode] = [load(f"{url}/{name}", jpegs, c, c * args.requests) for c in CLIENTS]
            serve.delete(name)
        name = deploy(args, "overload", ["--max-queued", str(args.overload_queue)])
        overload = load(f"{url}/{name}", jpegs, args.overload[1], args.overload[0])
        overload["healthy_after"] = requests.get(f"{url}/{name}/healthz", timeout=TIMEOUT).ok and requests.post(
            f"{url}/{name}/v1/caption", data=jpegs[0], headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT).ok
        ray.shutdown()  # with the applications on it (serve.shutdown waits 30 s for HAProxy's controller)
        batch = batch_vs_run(args, files, work)
    on16, off16 = results["batching"][-1]["throughput_rps"], results["no batching"][-1]["throughput_rps"]
    answered = set(overload["statuses"]) <= {"200", "503"}
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load_average,
                    "platform": platform.platform(),
                    "versions": {"edgecap": edgecap.__version__, "ray": ray.__version__}},
        "settings": {"model": args.model or "bundled", "images": str(args.images or "synthetic"), "count": len(jpegs),
                     "requests_per_client": args.requests, "threads": args.threads, "ingress": args.ingress,
                     "overload_queue": args.overload_queue},
        "baseline": base, "serve": results, "overload": overload, "batch": batch,
        "floors": {"throughput at 16 clients, batching / batch size 1": (round(on16 / off16, 2), "≥ 1.3", on16 >= 1.3 * off16),
                   "p50 latency at 1 client − caption-run's (ms)": (base["overhead_p50_ms"], "≤ 5",
                                                                     base["overhead_p50_ms"] <= 5),
                   "overload: every request 200 or 503, service healthy": (
                       overload["statuses"], "no timeouts", answered and overload["healthy_after"])}}
    text = markdown(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
