"""The caption-serve command as a user runs it: it starts its own local Ray, answers, and Ctrl-C takes it all
down (exit 130, the port closed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")

from test_serve import free_port  # noqa: E402

CAPTION_SERVE = str(Path(sys.executable).parent / "caption-serve")


def start_interruptible(cmd: list[str]) -> subprocess.Popen:
    """Start `cmd` able to take Ctrl-C (SIGINT) even where this process ignores it, as a background job does
    (`make test &`): an ignored signal stays ignored in a child, a handled one is reset to the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_starts_answers_and_stops_on_ctrl_c():
    port = free_port()
    proc = start_interruptible([CAPTION_SERVE, "--port", str(port), "--threads", "1"])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("caption-serve: serving" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-20:])
            time.sleep(0.2)
        assert f"caption-serve: serving http://127.0.0.1:{port}/v1/caption" in "".join(lines)
        assert requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()["model"] == "flickr8k-lite0"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert lines[-1].strip() == "caption-serve: interrupted"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
