"""Joining Ray: a local instance by default, a cluster with --address; quiet unless something is wrong."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from edgecap.runtime.errors import EdgecapError

INSTALL = "pip install 'edgecap[serve]'"


def require(module: str, prog: str) -> ModuleType:
    """Import a Ray module (or fastapi), or stop with a one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgecapError(f"{prog} needs Ray ({e.name} is not installed): {INSTALL}") from None


def connect(address: str | None, prog: str) -> None:
    """Start a local Ray instance (no address) or join the cluster at `address` (auto or HOST:PORT); reuse the
    instance this process already has."""
    ray = require("ray", prog)
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True)
    except ConnectionError as e:
        raise EdgecapError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
