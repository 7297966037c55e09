"""A video or camera captioned by scene: caption events with start and end times, subtitle files written as the
events close, and an annotated video with the current caption on every frame."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pysubs2

from .captioner import Caption, Captioner
from .errors import EdgecapError
from .files import atomic_write
from .render import draw_caption
from .scenes import Event, GateOptions, SceneGate

SUBTITLE_FORMATS = {".srt": "srt", ".vtt": "vtt"}     # --subtitles extension -> pysubs2 format
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}  # --save extension -> FourCC


@dataclass
class Counts:
    """What a timeline did: encoder calls (one per frame), decoder calls, events."""

    encoder_calls: int = 0
    decoder_calls: int = 0
    events: int = 0


class Timeline:
    """Feeds frames (RGB, their time in seconds, their index) through the encoder, runs the decoder when the gate
    opens (every frame with `gate=None`), and keeps the events: `on_start(event)` when one begins, `on_end(event)`
    when the next one begins or the timeline closes. A caption equal to the current one extends its event."""

    def __init__(self, captioner: Captioner, gate: GateOptions | None,
                 on_start: Callable[[Event], None] = lambda e: None, on_end: Callable[[Event], None] = lambda e: None,
                 source: str = "") -> None:
        self.captioner, self.on_start, self.on_end, self.source = captioner, on_start, on_end, source
        self.gate = SceneGate(gate) if gate is not None else None
        self.current: Event | None = None
        self.counts = Counts()
        self.last_time = 0.0
        self.timings: dict[str, float] = {}  # the last frame's stage timings (ms)

    def feed(self, rgb: np.ndarray, t: float, index: int) -> Event:
        """One frame; -> the event it belongs to."""
        features, self.timings = self.captioner.encode([rgb])
        self.counts.encoder_calls += 1
        self.last_time = t
        pooled = features["pooled"][0]
        start = self.gate.check(t, pooled) if self.gate is not None else t
        if start is not None:
            caption = self.captioner.describe(features, self.timings)[0]
            self.timings = caption.timings
            self.counts.decoder_calls += 1
            if self.gate is not None:
                self.gate.captioned(t, pooled)
            if self.current is None or caption.text != self.current.caption.text:
                self._begin(Event(start, index, caption, source=self.source))
        assert self.current is not None
        return self.current

    def _begin(self, event: Event) -> None:
        if self.current is not None:
            self.current.end = event.start
            self.on_end(self.current)
        self.current = event
        self.counts.events += 1
        self.on_start(event)

    def close(self, end: float | None = None) -> None:
        """End the last event at `end` (default: the last frame's time)."""
        if self.current is not None and self.current.end is None:
            self.current.end = max(self.last_time if end is None else end, self.current.start)
            self.on_end(self.current)


class Subtitles:
    """A SubRip (.srt) or WebVTT (.vtt) file rewritten atomically as each event closes: a killed run leaves a
    valid file of the events so far. Created (empty) at once, so an unwritable path fails before any work."""

    def __init__(self, path: Path) -> None:
        if path.suffix.lower() not in SUBTITLE_FORMATS:
            raise EdgecapError(f"--subtitles {path}: name a .srt (SubRip) or .vtt (WebVTT) file")
        self.path, self.format = path, SUBTITLE_FORMATS[path.suffix.lower()]
        self.file = pysubs2.SSAFile()
        self._write()

    def add(self, event: Event) -> None:
        self.file.append(pysubs2.SSAEvent(start=round(event.start * 1000), end=round(event.end * 1000),
                                          text=event.caption.text))
        self._write()

    def _write(self) -> None:
        text = self.file.to_string(self.format)
        try:
            atomic_write(self.path, lambda f: f.write(text.encode()))
        except OSError as e:
            raise EdgecapError(f"could not write --subtitles {self.path}: {e.strerror or e}") from None


class AnnotatedVideo:
    """A video file of the frames with the current caption drawn on each, at the source's rate and the frames'
    size. The path is checked at once (an unwritable one fails before any work); the file opens on the first
    frame."""

    def __init__(self, path: Path, fps: float) -> None:
        self.codec = VIDEO_CODECS.get(path.suffix.lower())
        if self.codec is None:
            raise EdgecapError(f"--save {path}: a video source writes a video; name a "
                               f"{', '.join(VIDEO_CODECS)} file, or a folder for one JPEG per frame")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EdgecapError(f"could not write --save {path}: {e.strerror} ({e.filename})") from None
        if not os.access(path.parent, os.W_OK):
            raise EdgecapError(f"could not write --save {path}: permission denied ({path.parent})")
        self.path, self.fps = path, fps
        self.writer: cv2.VideoWriter | None = None

    def write(self, rgb: np.ndarray, caption: Caption) -> None:
        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), self.fps,
                                          (rgb.shape[1], rgb.shape[0]))
            if not self.writer.isOpened():
                raise EdgecapError(f"could not write --save {self.path}: OpenCV cannot open a {self.codec} video")
        self.writer.write(cv2.cvtColor(draw_caption(rgb, caption.text), cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
