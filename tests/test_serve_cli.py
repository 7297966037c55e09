"""The caption-serve command as a user runs it: it starts its own local Ray, prints only its own lines, answers,
and SIGTERM or SIGINT (even inherited ignored, as in a background job) drains it and takes it all down: exit 0,
one line, no native stack dump, the port closed."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")

from test_serve import free_port  # noqa: E402

CAPTION_SERVE = str(Path(sys.executable).parent / "caption-serve")


def ignore_sigint() -> None:
    """What a shell does to a background job (`caption-serve &`): SIGINT ignored, inherited by the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def noise_png() -> bytes:
    return cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))[1].tobytes()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_the_service_and_stops_it(signum):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([CAPTION_SERVE, "--port", str(port), "--threads", "1", "--max-batch-size", "1"],
                            stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("caption-serve: serving" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-20:])
            time.sleep(0.2)
        assert requests.get(f"{url}/v1/model", timeout=10).json()["model"] == "flickr8k-lite1"
        files = [("files", ("noise.png", noise_png(), "image/png"))] * 6
        with ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(requests.post, f"{url}/v1/caption", files=files, params={"beams": 16},
                                     timeout=60) for _ in range(2)]
            time.sleep(0.3)
            proc.send_signal(signum)
            answers = [f.result() for f in in_flight]
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        proc.kill()
    assert [r.status_code for r in answers] == [200, 200]  # in flight when the signal came: finished
    assert proc.returncode == 0
    assert all(line.startswith("caption-serve: ") for line in lines), "".join(lines)  # no Ray noise, no stack dump
    assert lines[-1].startswith(f"caption-serve: {signal.Signals(signum).name}: stopped taking requests, drained in ")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
