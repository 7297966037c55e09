"""How caption-serve and caption-batch start Ray (edgecap.scale.cluster), without starting it: quiet by default,
Ray's own lines with --verbose, and file descriptor 2 given back after the start."""

from __future__ import annotations

import logging
import os

import pytest

ray = pytest.importorskip("ray")

from edgecap.scale import cluster


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_starts_quiet_unless_verbose(monkeypatch, verbose):
    calls: list[dict] = []

    def init(**kwargs) -> None:
        os.write(2, b"")  # the descriptor is open (on /dev/null while quiet)
        calls.append({**kwargs, "stderr": os.readlink("/proc/self/fd/2")})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "")  # so that the environment is restored after
    monkeypatch.delenv("RAY_BACKEND_LOG_LEVEL")
    monkeypatch.setattr(logging.getLogger("ray.serve"), "level", logging.getLogger("ray.serve").level)
    stderr = os.readlink("/proc/self/fd/2")
    cluster.connect(None, "caption-test", verbose=verbose)
    [call] = calls
    assert call["log_to_driver"] is verbose
    assert call["logging_level"] == (logging.WARNING if verbose else logging.ERROR)
    assert (call["stderr"] == os.devnull) is not verbose and os.readlink("/proc/self/fd/2") == stderr
    assert ("RAY_BACKEND_LOG_LEVEL" in os.environ) is not verbose
