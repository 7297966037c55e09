"""`caption-serve`: an HTTP captioning service on Ray Serve, with dynamic batching across requests and replicas.

  caption-serve [--model DIR] [--replicas N] [--max-batch-size B] [--batch-wait-ms W] [--port 8000]
  curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://127.0.0.1:8000/v1/caption

Starts a local Ray instance, or joins a cluster with --address auto|HOST:PORT. Ctrl-C stops the service.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from edgecap.runtime.cli import add_model_arguments, captioner_kwargs
from edgecap.runtime.console import run_main
from edgecap.runtime.errors import EdgecapError

from .cluster import connect, require

PROG = "caption-serve"
APP = "edgecap"
# --ingress -> the environment a Ray instance needs for it (set before the instance starts; a cluster's nodes
# need it when they start: `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 ray start --head`)
INGRESS = {name: {"RAY_SERVE_ENABLE_HA_PROXY": on, "RAY_SERVE_ENABLE_DIRECT_INGRESS": on}
           for name, on in (("proxy", "0"), ("haproxy", "1"))}


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
                   help="requests waiting per caller before the service answers 503 (default: 64)")
    p.add_argument("--max-bytes", metavar="M", type=int, default=10 << 20,
                   help="largest request body in bytes; larger ones get 413 (default: 10 MiB)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join: auto or HOST:PORT (default: a local one)")
    p.add_argument("--ingress", choices=INGRESS, default="haproxy",
                   help="for a Ray this command starts: Ray's HAProxy straight to the replicas (measured faster: "
                        "4 ms over caption-run at 1 client against 9 ms; experimental in Ray 2.60), or Serve's "
                        "Python proxy; a cluster uses what its nodes were started with (default: haproxy)")
    return p


def check_options(args: argparse.Namespace) -> None:
    for flag in ("replicas", "max_batch_size", "max_queued", "max_bytes"):
        if getattr(args, flag) < 1:
            raise EdgecapError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.batch_wait_ms < 0:
        raise EdgecapError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if not 0 < args.port < 65536:
        raise EdgecapError(f"--port must be between 1 and 65535, got {args.port}")


def application(args: argparse.Namespace, captioner: dict):
    """The Serve application: `--replicas` copies of the deployment, each taking up to two batches' worth of
    requests at once (one captioning, one filling; at least 16, so that the router never backs off from a busy
    replica, which cost a batch-size-1 service two thirds of its throughput at 16 clients), and a queue of
    `--max-queued` before 503 + Retry-After."""
    require("ray.serve", PROG)
    from ray.serve.config import BackpressureConfig

    from .deployment import CaptionServer

    return CaptionServer.options(
        num_replicas=args.replicas, max_ongoing_requests=max(16, 2 * args.max_batch_size),
        max_queued_requests=args.max_queued, backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        ray_actor_options={"num_cpus": args.threads or 1},
    ).bind(captioner, args.max_batch_size, args.batch_wait_ms, args.max_bytes)


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
    args = build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in config.items()])
    check_options(args)
    return application(args, captioner_kwargs(args, PROG))


def start(args: argparse.Namespace) -> str:
    """Deploy the service (blocking until every replica is up); the URL it answers on."""
    check_options(args)
    app = application(args, captioner_kwargs(args, PROG))
    serve = require("ray.serve", PROG)
    if not args.address:
        check_port(args.host, args.port)
    os.environ.update(INGRESS[args.ingress])  # read by a Ray instance this process starts
    connect(args.address, PROG)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def serve_forever(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C (run_main reports it); then a local Ray goes with everything on it, and on a cluster
    our application is deleted."""
    try:
        url = start(args)
        print(f"{PROG}: serving {url}/v1/caption ({args.replicas} replica(s), batches up to "
              f"{args.max_batch_size}); Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        ray = require("ray", PROG)
        if ray.is_initialized():
            if args.address:
                require("ray.serve", PROG).delete(APP)
            else:
                ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: serve_forever(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
