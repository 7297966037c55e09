"""benchmarks/latency.py end to end on the tiny attention model: outputs exist, numbers are consistent.

Timing values are not asserted: timing belongs in benchmarks, not tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgecap.runtime.engines import BACKENDS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def test_latency_benchmark_smoke(trained, exported, tmp_path):
    out = {name: tmp_path / name for name in ("report.json", "report.md", "report.png")}
    cmd = [sys.executable, str(SCRIPT), "--ckpt", str(trained("attention")), "--model", str(exported["attention"]),
           "--repeats", "2", "--min-seconds", "0", "--warmup", "1", "--count", "2", "--beams", "1,3", "--batch", "2",
           "--threads", "1",
           "--json", str(out["report.json"]), "--markdown", str(out["report.md"]), "--plot", str(out["report.png"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| ort-fp32 |" in done.stdout and "command: " in done.stdout

    report = json.loads(out["report.json"].read_text())
    assert {"command", "machine", "floor", "settings", "variants", "skipped"} <= set(report)
    assert report["machine"]["threads"] == 1 and report["floor"]["floor_ms"] > 0
    assert {"torch-fp32", "ort-fp32", "ort-int8"} <= set(report["variants"])
    table = {(e, d, p) for e, b in BACKENDS.items() for d in b.devices for p in b.precisions if (p, d) != ("fp16", "cpu")}
    measured = {**report["variants"], **{n: None for n in report["skipped"]}}
    assert len(measured) == len(table)  # every pairing of the backend table is measured or skipped with a reason
    for name, v in report["variants"].items():
        assert set(v["latency_ms"]) == {"encoder", "decoder_per_word", "greedy", "beam3"}, name
        for p in v["latency_ms"].values():
            assert p["p50"] <= p["p90"] <= p["p99"], name
        assert v["throughput"]["images_per_s"] > 0 and v["peak_rss_mb"] > 0
        assert v["runs"] == {"greedy": 2, "beam3": 2}, name  # every search timed in each round
    assert all(why for why in report["skipped"].values())
    agreement = report["variants"]["ort-fp32"]["agreement_with_torch"]
    assert agreement == {s: {"identical": 2, "images": 2} for s in ("greedy", "beam3")}  # the export guarantees it

    assert "| variant |" in out["report.md"].read_text()
    assert out["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decoder_step_benchmark_smoke(exported, tmp_path):
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(SCRIPT.with_name("decoder_step.py")), "--model", str(exported["attention"]),
           "--rows", "1,3", "--rounds", "1", "--block", "2", "--warmup", "0", "--count", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["step_ms_p50"]) == {"fp32", "fp16", "int8"}
    assert all(set(ms) == {"1", "3"} and min(ms.values()) > 0 for ms in report["step_ms_p50"].values())
    assert "| int8 |" in done.stdout and "per extra row" in done.stdout
    bad = subprocess.run([*cmd[:3], str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not found" in bad.stderr


def test_search_overhead_benchmark_smoke(exported, tmp_path):
    out = tmp_path / "search.json"
    cmd = [sys.executable, str(SCRIPT.with_name("search_overhead.py")), "--model", str(exported["attention"]),
           "--beams", "1,3", "--rounds", "2", "--count", "3", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())["search"]
    assert set(report) == {"greedy", "beam3"}
    assert all(r["ms_per_caption"] > 0 and r["steps_per_caption"] >= 1 for r in report.values())
    assert "| beam3 |" in done.stdout


def test_latency_benchmark_compares_models(trained, exported, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--ckpt", str(trained("attention")),
           "--model", f"att={exported['attention']}", "--model", f"plain={exported['plain']}",
           "--variants", "torch-fp32,ort-fp32", "--repeats", "1", "--min-seconds", "0", "--warmup", "0", "--count", "2",
           "--beams", "3", "--batch", "1", "--threads", "1", "--tags", "0", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"att torch-fp32", "att ort-fp32", "plain ort-fp32"}
    assert report["skipped"] == {"plain torch-fp32": "no --ckpt given for this model"}  # --ckpt is the first model's
    assert report["settings"]["models"] == {"att": str(exported["attention"]), "plain": str(exported["plain"])}
    att, plain = report["variants"]["att ort-fp32"], report["variants"]["plain ort-fp32"]
    assert att["vs_first_model"] == {"greedy": 1.0, "beam3": 1.0}
    ratio = plain["latency_ms"]["beam3"]["p50"] / att["latency_ms"]["beam3"]["p50"]
    assert plain["vs_first_model"]["beam3"] == ratio and plain["agreement_with_torch"] is None
    assert att["agreement_with_torch"]["beam3"] == {"identical": 2, "images": 2}
    assert "beam3 p50 vs att" in done.stdout

    same = subprocess.run([*cmd[:2], "--model", f"x={exported['attention']}", "--model", f"x={exported['plain']}"],
                          capture_output=True, text=True, timeout=60)
    assert same.returncode == 2 and "needs its own LABEL" in same.stderr
