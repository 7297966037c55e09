"""benchmarks/latency.py end to end on the tiny attention model: outputs exist, numbers are consistent.

Timing values are not asserted: timing belongs in benchmarks, not tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def test_latency_benchmark_smoke(trained, exported, tmp_path):
    out = {name: tmp_path / name for name in ("report.json", "report.md", "report.png")}
    cmd = [sys.executable, str(SCRIPT), "--ckpt", str(trained("attention")), "--model", str(exported["attention"]),
           "--repeats", "2", "--warmup", "1", "--count", "2", "--beams", "1,3", "--batch", "2", "--threads", "1",
           "--json", str(out["report.json"]), "--markdown", str(out["report.md"]), "--plot", str(out["report.png"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| ort-fp32 |" in done.stdout and "command: " in done.stdout

    report = json.loads(out["report.json"].read_text())
    assert {"command", "machine", "floor", "settings", "variants", "skipped"} <= set(report)
    assert report["machine"]["threads"] == 1 and report["floor"]["floor_ms"] > 0
    assert {"torch", "ort-fp32", "ort-int8"} <= set(report["variants"])
    for name, v in report["variants"].items():
        assert set(v["latency_ms"]) == {"encoder", "decoder_per_word", "greedy", "beam3"}, name
        for p in v["latency_ms"].values():
            assert p["p50"] <= p["p90"] <= p["p99"], name
        assert v["throughput"]["images_per_s"] > 0 and v["peak_rss_mb"] > 0
    assert all(why for why in report["skipped"].values())
    agreement = report["variants"]["ort-fp32"]["agreement_with_torch"]
    assert agreement == {s: {"identical": 2, "images": 2} for s in ("greedy", "beam3")}  # the export guarantees it

    assert "| variant |" in out["report.md"].read_text()
    assert out["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
