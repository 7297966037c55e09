"""Videos and cameras captioned by scene (issue 20): the gate, events at the cuts and none inside a held scene,
subtitle files, the annotated video, truncated and dropped sources, --every-frame as before, bad flags.

The gate's threshold is measured for the bundled model (EfficientNet-Lite0): these tests caption four drawn,
dissimilar scenes with it, each held 1.5 s under camera noise (sensor noise, shake, flicker, JPEG).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pysubs2
import pytest
from conftest import drawn_scenes

from edgecap.runtime import cli, sources
from edgecap.runtime.captioner import BUNDLED, Captioner
from edgecap.runtime.cli import main as run_main
from edgecap.runtime.scenes import Event, GateOptions, SceneGate, timestamp
from edgecap.runtime.timeline import Timeline

ROOT = Path(__file__).resolve().parents[1]
FPS, HOLD_FRAMES = 10, 15
CUTS = [0.0, 1.5, 3.0, 4.5]  # each scene's first frame, in seconds


def load_benchmark():
    """benchmarks/video.py, whose camera noise the test videos share."""
    spec = importlib.util.spec_from_file_location("video_benchmark", ROOT / "benchmarks" / "video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


noisy = load_benchmark().camera_noise


def run_timeline(captioner: Captioner, clip: Path, gate: GateOptions | None,
                 on_start: Callable[[Event], None] = lambda e: None) -> Timeline:
    timeline = Timeline(captioner, gate, on_start)
    for frame in sources.open_source(str(clip)):
        timeline.feed(frame.rgb, frame.time, frame.index)
    timeline.close()
    return timeline


def write_video(path: Path, fourcc: str) -> Path:
    rng = np.random.default_rng(1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (224, 224))
    for scene in drawn_scenes():
        for _ in range(HOLD_FRAMES):
            writer.write(noisy(scene, rng))
    writer.release()
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "scenes.mp4", "mp4v")


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(BUNDLED, threads=1)


def test_the_gate_waits_out_a_flash_and_refreshes():
    a, b, c = np.eye(3)
    gate = SceneGate(GateOptions(threshold=0.25, hold=0.2, refresh=2.0))
    assert gate.check(0.0, a) == 0.0
    gate.captioned(0.0, a)
    assert gate.check(0.5, a * 1.01) is None            # the same scene
    assert gate.check(1.0, c) is None                   # a flash: away for 0.1 s only
    assert gate.check(1.1, a) is None
    assert [gate.check(t, b) for t in (1.5, 1.6)] == [None, None]
    assert gate.check(1.7, b) == 1.5                    # held 0.2 s: a new scene, dated from its first frame
    gate.captioned(1.7, b)
    assert gate.check(3.6, b) is None and gate.check(3.7, b) == 3.7  # refreshed 2 s after its caption
    with pytest.raises(ValueError, match="--change-threshold"):
        GateOptions(threshold=3)


def test_one_event_per_cut_and_none_inside_a_held_scene(clip, captioner):
    events = []
    timeline = run_timeline(captioner, clip, GateOptions(), events.append)
    assert len(events) == len(CUTS)
    for event, cut in zip(events, CUTS):
        assert 0 <= event.start - cut <= 0.5, (event.start, cut)
    assert (timeline.counts.encoder_calls, timeline.counts.decoder_calls) == (60, 4)
    every = run_timeline(captioner, clip, None)
    assert every.counts.decoder_calls == 60  # what --every-frame pays


def test_the_video_benchmark_measures_both_modes(clip, captioner):
    """benchmarks/video.py's measurement on the test clip: every frame decoded against one decode per scene, the
    cuts scored against the truth."""
    measure = load_benchmark().measure
    every, gated = measure(captioner, clip, None, CUTS), measure(captioner, clip, GateOptions(), CUTS)
    assert (every["frames"], every["decoder_calls"], gated["frames"], gated["decoder_calls"]) == (60, 60, 60, 4)
    assert gated["cuts_found"] == len(CUTS) and gated["extra_events_in_held_scenes"] == 0
    assert every["frames_per_s"] > 0 and set(every["p50_ms"]) == {"encoder_ms", "decoder_ms"}


def test_events_subtitles_and_the_annotated_video(clip, tmp_path, capsys):
    srt, vtt, out = tmp_path / "clip.srt", tmp_path / "clip.vtt", tmp_path / "annotated.mp4"
    base = ["--model", str(BUNDLED), "--threads", "1", "--quiet", str(clip)]
    assert run_main([*base, "--subtitles", str(srt), "--save", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CUTS) and all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d  \w.*", line) for line in lines)
    assert run_main([*base, "--json", "--subtitles", str(vtt)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["caption"] for e in events] == [line.split("  ", 1)[1] for line in lines]
    assert [e["end"] for e in events[:-1]] == [e["start"] for e in events[1:]] and events[-1]["end"] == 6.0
    assert all(e["source"] == str(clip) and isinstance(e["score"], float) for e in events)

    for path, fmt in ((srt, "srt"), (vtt, "vtt")):
        cues = pysubs2.load(str(path))
        assert cues.format == fmt and [c.text for c in cues] == [e["caption"] for e in events]
        assert [(c.start, c.end) for c in cues] == [(round(e["start"] * 1000), round(e["end"] * 1000)) for e in events]
    assert re.search(r"^00:00:00,000 --> 00:00:01,\d00$", srt.read_text(), re.M)
    assert vtt.read_text().startswith("WEBVTT")
    if shutil.which("ffprobe"):
        for path in (srt, vtt):
            probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=pts_time", "-of", "csv=p=0",
                                    str(path)], capture_output=True, text=True)
            assert probe.returncode == 0 and len(probe.stdout.split()) == len(events)

    video = cv2.VideoCapture(str(out))
    assert (video.get(cv2.CAP_PROP_FRAME_COUNT), video.get(cv2.CAP_PROP_FPS)) == (60, FPS)
    assert (video.get(cv2.CAP_PROP_FRAME_WIDTH), video.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (224, 224)
    video.release()


def test_a_truncated_video_keeps_its_events_so_far(tmp_path, capsys):
    whole = write_video(tmp_path / "whole.avi", "MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) * 2 // 3])
    srt = tmp_path / "cut.srt"
    code = run_main(["--model", str(BUNDLED), "--threads", "1", "--quiet", "--subtitles", str(srt), str(cut)])
    out, err = capsys.readouterr()
    assert code == 1 and f"{cut} ended after" in err and err.count("\n") == 1
    cues = pysubs2.load(str(srt))
    assert 2 <= len(cues) == len(out.splitlines()) <= 3 and cues[0].start == 0


class VanishingCamera:
    """Delivers two drawn scenes, 1 s each at 20 frames per second, then fails; reopening it fails."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = frames

    def isOpened(self) -> bool:
        return bool(self.frames)

    def read(self):
        if not self.frames:
            return False, None
        time.sleep(0.05)
        return True, self.frames.pop(0)

    def release(self) -> None:
        self.frames = []


def test_a_camera_that_disappears_keeps_its_events(monkeypatch, tmp_path, capsys):
    rng = np.random.default_rng(2)
    frames = [noisy(scene, rng) for scene in drawn_scenes()[:2] for _ in range(20)]
    cameras = iter([VanishingCamera(frames)])
    monkeypatch.setattr(sources, "capture_factory", lambda *a: next(cameras, VanishingCamera([])))
    monkeypatch.setattr(cli, "open_source", functools.partial(sources.open_source, reconnect_delay=0.01))
    srt = tmp_path / "camera.srt"
    code = run_main(["--model", str(BUNDLED), "--threads", "1", "--quiet", "--hold", "0", "--json",
                     "--subtitles", str(srt), "camera0"])
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and err == "caption-run: warning: camera 0 dropped and did not come back after 3 reconnects\n"
    assert 1 <= len(events) <= 2 and all(e["end"] is not None for e in events)  # the last one closed too
    assert len(pysubs2.load(str(srt))) == len(events)


def test_every_frame_keeps_one_line_per_frame(clip, captioner, capsys):
    assert run_main(["--model", str(BUNDLED), "--threads", "1", "--quiet", "--every-frame", "--every", "5",
                     str(clip)]) == 0
    lines = capsys.readouterr().out.splitlines()
    frames = [f for f in sources.open_source(str(clip)) if f.index % 5 == 0]
    assert lines == [f"{clip}#{f.index}\t{captioner.caption(f.rgb).text}" for f in frames]


@pytest.mark.parametrize("flags, message", [
    (["--subtitles", "{tmp}/a-file/x.srt"], "could not write --subtitles"),
    (["--subtitles", "{tmp}/x.txt"], "name a .srt (SubRip) or .vtt (WebVTT) file"),
    (["--save", "{tmp}/a-file/x.mp4"], "could not write --save"),
    (["--every-frame", "--subtitles", "{tmp}/x.srt"], "leave out --every-frame"),
    (["--change-threshold", "5"], "--change-threshold must lie between 0 and 2"),
    (["--refresh", "0"], "--refresh must be more than 0 seconds"),
])
def test_bad_video_flags_are_one_line_before_any_work(clip, tmp_path, capsys, flags, message):
    (tmp_path / "a-file").write_text("a file where a folder is needed")
    argv = ["--model", str(BUNDLED), "--quiet", *[f.format(tmp=tmp_path) for f in flags], str(clip)]
    assert run_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err


def test_subtitles_need_a_video_or_camera(tmp_path, capsys):
    image = tmp_path / "beach.png"
    cv2.imwrite(str(image), drawn_scenes()[0])
    assert run_main(["--model", str(BUNDLED), "--subtitles", str(tmp_path / "x.srt"), str(image)]) == 2
    assert "take one video, camera or stream source" in capsys.readouterr().err
    assert not (tmp_path / "x.srt").exists()


def test_timestamps():
    assert timestamp(3723.4567) == "01:02:03.457" and timestamp(0.5, ",") == "00:00:00,500"


def test_an_annotated_video_of_every_third_frame_lasts_as_long(clip, tmp_path, capsys):
    out = tmp_path / "third.avi"
    assert run_main(["--model", str(BUNDLED), "--threads", "1", "--quiet", "--every", "3", "--save", str(out),
                     str(clip)]) == 0
    video = cv2.VideoCapture(str(out))
    frames, fps = video.get(cv2.CAP_PROP_FRAME_COUNT), video.get(cv2.CAP_PROP_FPS)
    video.release()
    assert frames == 20 and frames / fps == pytest.approx(60 / FPS, rel=0.01)  # 6 s, as the source
    assert len(capsys.readouterr().out.splitlines()) == len(CUTS)
