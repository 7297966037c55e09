"""Joining Ray: a local instance by default, a cluster with --address; quiet unless something is wrong or
--verbose; a bad model folder refused before Ray starts; SIGTERM/SIGINT turned into a clean stop."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from edgecap.runtime.errors import EdgecapError

INSTALL = "pip install 'edgecap[serve]'"
# Ray's start-up noise kept off the terminal unless --verbose: the core worker's native log lines (an actor
# with arguments in the object store, a restarted actor) and its token-authentication notice
QUIET_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal"}


class Stop(BaseException):
    """SIGTERM or SIGINT asked the command to stop (like KeyboardInterrupt, no library's `except Exception`
    takes it for an error of its own)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.signal = signum, signal.Signals(signum).name


def require(module: str, prog: str) -> ModuleType:
    """Import a Ray module (or fastapi), or stop with a one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgecapError(f"{prog} needs Ray ({e.name} is not installed): {INSTALL}") from None


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """--address and --verbose, shared by caption-serve and caption-batch."""
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join: auto or HOST:PORT (default: a local one)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Ray's own log lines (start-up notices, worker and actor logs)")


def check_model(captioner: dict) -> None:
    """Open the model once here, before Ray starts: a bad folder or setting is then caption-run's one-line
    error within a second, not the actors' tracebacks after Ray's start (0.15 s for the bundled model)."""
    from edgecap.runtime.captioner import Captioner

    Captioner.load(**captioner)


def connect(address: str | None, prog: str, verbose: bool = False) -> None:
    """Start a local Ray instance (no address) or join the cluster at `address` (auto or HOST:PORT); reuse the
    instance this process already has. Without `verbose`, only Ray's errors reach the terminal."""
    ray = require("ray", prog)
    if ray.is_initialized():
        return
    if not verbose:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
    try:
        with native_stderr_off(not verbose):
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                     logging_level=logging.WARNING if verbose else logging.ERROR)
    except ConnectionError as e:
        raise EdgecapError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's "started", "ready" notices
        quiet_cluster_events(ray)


def quiet_cluster_events(ray: ModuleType) -> None:
    """Keep the cluster's event messages off this driver's stdout: Ray prints every message its GCS publishes to
    drivers (a task retried, a node marked dead: several lines each, with Ray's log-dedup notice), through the
    module-level `print_to_stdstream` of ray._private.worker (Ray 2.60), which has no switch. The commands
    report what matters to them in their own line (caption-batch: a node lost)."""
    worker = ray._private.worker
    shown = worker.print_to_stdstream
    if getattr(shown, "quiet", False):  # done by an earlier start in this process
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":  # the GCS's error channel; worker logs are off already (log_to_driver)
            shown(data, ignore_prefix)

    print_to_stdstream.quiet = True
    worker.print_to_stdstream = print_to_stdstream


def live_nodes() -> dict[str, str]:
    """The cluster's live nodes: node id -> address."""
    ray = require("ray", "edgecap")
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


@contextmanager
def native_stderr_off(off: bool) -> Iterator[None]:
    """Send this process's file descriptor 2 to /dev/null meanwhile: the lines Ray's native code writes while it
    starts (the log level it read from the environment) bypass Python. Errors come back as exceptions."""
    if not off:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def stop_on_signals() -> None:
    """From now on SIGTERM and SIGINT raise `Stop` in the main thread. Installed after Ray starts, Python's
    handler replaces the native one Ray's core worker puts on SIGTERM (a stack dump), and SIGINT is taken even
    where it was inherited ignored (a background job)."""
    def stop(signum: int, _frame: object) -> None:
        raise Stop(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


@contextmanager
def signals_restored() -> Iterator[None]:
    """Put SIGTERM's and SIGINT's handlers back as they were when the block ends (a command run in-process, as
    tests do, must not leave its own behind)."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def ignore_signals() -> None:
    """While a command stops (bounded by its own timeouts), further SIGTERM/SIGINT are ignored."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
