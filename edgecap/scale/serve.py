"""`caption-serve`: an HTTP captioning service on Ray Serve, with dynamic batching across requests and replicas.

  caption-serve [--model DIR] [--replicas N] [--max-batch-size B] [--batch-wait-ms W] [--port 8000]
  curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://127.0.0.1:8000/v1/caption
  open http://127.0.0.1:8000/ in a browser: a page to caption a photo (upload, drop, webcam) and see its attention

Starts a local Ray instance, or joins a cluster with --address auto|HOST:PORT. SIGTERM or Ctrl-C stops the
service: new requests get 503, those in flight finish (up to --drain-timeout), then everything it started goes.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Iterator

from edgecap.runtime.cli import add_model_arguments, captioner_kwargs
from edgecap.runtime.console import run_main
from edgecap.runtime.errors import EdgecapError

from .cluster import (Stop, add_cluster_arguments, check_model, connect, ignore_signals, require,
                      signals_restored, stop_on_signals)

PROG = "caption-serve"
APP = "edgecap"
# HAProxy retries a request whose replica died on another (captioning is idempotent): on a refused connection,
# and on a connection closed with no answer or a broken one; 6 tries outlast its mark-down of a server after 3
# errors, so that with one replica the last ones reach Serve's fallback proxy, which holds them until the
# replacement replica is up. Round robin sends a retry to the next replica; least-connections (Ray's default)
# picked the dead one, which has none, again, until the tries ran out.
# HAProxy retries only a request it had whole before sending it (it drops the retry otherwise: a 502, seen as a
# plain-text 500, when a replica died on a request whose body was still arriving); `option http-buffer-request`
# makes it wait for the whole body first. Ray 2.60 has no setting for that option: the newline in the retry-on
# value puts it on a line of its own after `retry-on` in Ray's HAProxy template. Bodies up to the buffer (1 MiB
# here) are retried.
HAPROXY_RETRIES = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response\n"
                                                 "    option http-buffer-request",
                   "RAY_SERVE_HAPROXY_RETRIES": "6", "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(1 << 20),
                   "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "roundrobin"}
# --ingress -> the environment a Ray instance needs for it (set before the instance starts; a cluster's nodes
# need it when they start: `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 ray start --head`, and
# the HAPROXY_RETRIES settings)
INGRESS = {"proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
           "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", **HAPROXY_RETRIES}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--replicas", metavar="N", type=int, default=1, help="model replicas (default: 1)")
    p.add_argument("--max-batch-size", metavar="B", type=int, default=8,
                   help="most images captioned together by one replica; 1 turns batching off (default: 8)")
    p.add_argument("--batch-wait-ms", metavar="W", type=float, default=0.0,
                   help="how long a replica waits for a batch to fill; with 0 a batch is what arrived while the "
                        "previous one ran (default: 0)")
    p.add_argument("--max-queued", metavar="Q", type=int, default=64,
                   help="requests waiting per replica, beyond two batches' worth, before it answers 503 "
                        "(default: 64)")
    p.add_argument("--max-bytes", metavar="M", type=int, default=10 << 20,
                   help="largest request body in bytes; larger ones get 413 (default: 10 MiB)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--drain-timeout", metavar="S", type=float, default=10.0,
                   help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish (default: 10)")
    add_cluster_arguments(p)
    p.add_argument("--ingress", choices=INGRESS, default="haproxy",
                   help="for a Ray this command starts: Ray's HAProxy straight to the replicas (measured faster: "
                        "4 ms over caption-run at 1 client against 9 ms; experimental in Ray 2.60), or Serve's "
                        "Python proxy; a cluster uses what its nodes were started with (default: haproxy)")
    return p


def check_options(args: argparse.Namespace) -> None:
    for flag in ("replicas", "max_batch_size", "max_queued", "max_bytes"):
        if getattr(args, flag) < 1:
            raise EdgecapError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("batch_wait_ms", "drain_timeout"):
        if getattr(args, flag) < 0:
            raise EdgecapError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not 0 < args.port < 65536:
        raise EdgecapError(f"--port must be between 1 and 65535, got {args.port}")


def application(args: argparse.Namespace, captioner: dict):
    """The Serve application: `--replicas` copies of the deployment, each holding two batches' worth of requests
    (one captioning, one filling; at least 16, so that the router never backs off from a busy replica, which
    cost a batch-size-1 service two thirds of its throughput at 16 clients) and `--max-queued` more waiting; the
    replica answers the next one 503 JSON + Retry-After itself. Serve's own queue limit stays off: its proxy
    counts a burst's requests as queued while it picks replicas, and answers them 503 in plain text."""
    require("ray.serve", PROG)
    from .deployment import CaptionServer

    capacity = max(16, 2 * args.max_batch_size) + args.max_queued
    return CaptionServer.options(
        num_replicas=args.replicas, max_ongoing_requests=capacity + 1, max_queued_requests=-1,
        ray_actor_options={"num_cpus": args.threads or 1},
    ).bind(captioner, args.max_batch_size, args.batch_wait_ms, args.max_bytes, capacity)


def check_port(host: str, port: int) -> None:
    """The HTTP port must be free before a local Ray starts: Ray's ingress would otherwise retry binding it
    for ever."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise EdgecapError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def build(config: dict[str, str]):
    """Ray Serve's application builder: `serve run edgecap.scale.serve:build model=DIR replicas=2`, or
    `import_path: edgecap.scale.serve:build` with `args:` in a Serve config file (KubeRay's RayService). The keys
    are caption-serve's flags (`max_batch_size` or `max-batch-size`); the HTTP ones are the config file's."""
    return checked_application(build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in config.items()]))


def checked_application(args: argparse.Namespace):
    """`application` for caption-serve's flags, checked first: bad flags or a bad model folder are one line before
    Ray starts."""
    check_options(args)
    captioner = captioner_kwargs(args, PROG)
    check_model(captioner)
    return application(args, captioner)


def start(args: argparse.Namespace) -> str:
    """Deploy the service (blocking until every replica is up); the URL it answers on."""
    app = checked_application(args)
    serve = require("ray.serve", PROG)
    if not args.address:
        check_port(args.host, args.port)
    os.environ.update(INGRESS[args.ingress])  # read by a Ray instance this process starts
    connect(args.address, PROG, args.verbose)
    from ray.experimental.internal_kv import _internal_kv_del

    from .deployment import DRAINING

    _internal_kv_del(DRAINING + APP)  # a flag left by an earlier caption-serve on the cluster
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def replicas(name: str) -> Iterator:
    """The replica actors of application `name`."""
    ray = require("ray", PROG)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{name}#"):
            yield ray.get_actor(actor["name"], namespace=actor["namespace"])


def drain(timeout: float, name: str = APP) -> int:
    """Stop taking requests (each replica answers 503 once it sees the flag, within DRAIN_POLL_S) and wait up to
    `timeout` seconds for those in flight; how many were still unfinished then."""
    ray = require("ray", PROG)
    from ray.experimental.internal_kv import _internal_kv_put

    from .deployment import DRAIN_POLL_S, DRAINING

    _internal_kv_put(DRAINING + name, b"1")
    deadline = time.monotonic() + timeout
    time.sleep(min(timeout, 3 * DRAIN_POLL_S))  # every replica has seen the flag: no request starts after
    actors = list(replicas(name))
    while True:
        counts = [actor.get_num_ongoing_requests.remote() for actor in actors]
        ongoing = sum(map(answer, ray.wait(counts, num_returns=len(counts), timeout=1.0)[0]))
        if not ongoing or time.monotonic() >= deadline:
            return ongoing
        time.sleep(0.05)


def answer(count) -> int:
    """A replica's count of requests in flight; 0 for one that died meanwhile (nothing left to wait for)."""
    ray = require("ray", PROG)
    try:
        return ray.get(count)
    except ray.exceptions.RayError:
        return 0


def serve_forever(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then drain (see `drain`), and take down what this command started: a local
    Ray it started, with everything on it, or else our application (on a cluster, or on a Ray this process
    already ran). Exit 0 with one line."""
    stop_on_signals()  # a signal while Ray starts stops the command as well
    serving = False
    joined = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # a Ray this command did not start
    try:
        url = start(args)
        stop_on_signals()  # again: starting Ray put its own handlers in place
        print(f"{PROG}: serving {url}/v1/caption and a page to try it at {url}/ ({args.replicas} replica(s), "
              f"batches up to {args.max_batch_size}); SIGTERM or Ctrl-C stops", file=sys.stderr, flush=True)
        serving = True
        while True:
            time.sleep(3600)
    except Stop as stop:
        ignore_signals()
        if not serving:
            print(f"{PROG}: {stop.signal} while starting; stopped", file=sys.stderr)
            return 0
        t0 = time.monotonic()
        left = drain(args.drain_timeout)
        cut = f", {left} request(s) cut off after --drain-timeout {args.drain_timeout:g} s" if left else ""
        print(f"{PROG}: {stop.signal}: stopped taking requests, drained in {time.monotonic() - t0:.1f} s{cut}; "
              "shut down", file=sys.stderr)
        return 0
    finally:
        ray = sys.modules.get("ray")  # not imported when the command failed before Ray's start
        if ray is not None and ray.is_initialized():
            if args.address or (joined and serving):  # a cluster, or a Ray that was running already: our app goes
                require("ray.serve", PROG).delete(APP)
            elif not joined:
                ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with signals_restored():
        return run_main(lambda: serve_forever(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
