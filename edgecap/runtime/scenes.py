"""Captions that change when the scene does: a gate on the encoder's pooled features, and caption events with
times (video files, cameras, streams).

The encoder runs on every sampled frame; the decoder (about half of a caption's cost) only when the gate opens:
on the first frame, when the picture has moved further than `threshold` (cosine distance of the pooled
features) from the frame last captioned and stayed that far for `hold` seconds (a flash or a passing hand is
not a new scene), or when `refresh` seconds have passed without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .captioner import Caption

# Chosen from measurements with the bundled model (benchmarks/video.py; its README section has the numbers): frames
# of one held Flickr8k photo under camera noise lie at most about 0.1 apart, consecutive photos 0.6 or more.
THRESHOLD = 0.25
HOLD_S = 0.2


@dataclass(frozen=True)
class GateOptions:
    threshold: float = THRESHOLD  # cosine distance of pooled features that makes a new scene
    hold: float = HOLD_S          # seconds a change must last before it is captioned
    refresh: float | None = None  # caption again after this many seconds without a change

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 2:
            raise ValueError(f"--change-threshold must lie between 0 and 2 (a cosine distance), got {self.threshold}")
        if self.hold < 0:
            raise ValueError(f"--hold must be >= 0 seconds, got {self.hold}")
        if self.refresh is not None and self.refresh <= 0:
            raise ValueError(f"--refresh must be more than 0 seconds, got {self.refresh}")


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine distance of two feature vectors: 0 the same direction, 1 unrelated, 2 opposite."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float(np.dot(a.ravel(), b.ravel())) / norm if norm > 0 else float(np.any(a != b))


class SceneGate:
    """Decides, frame by frame, whether the decoder must run."""

    def __init__(self, options: GateOptions) -> None:
        self.options = options
        self.reference: np.ndarray | None = None  # pooled features of the frame last captioned
        self.captioned_at = 0.0
        self.change_since: float | None = None    # when the picture first moved away from the reference

    def check(self, t: float, pooled: np.ndarray) -> float | None:
        """None: keep the current caption. Otherwise caption this frame; -> when its scene began (the first frame
        that moved away, earlier than `t` by the hold)."""
        if self.reference is None:
            return t
        if distance(self.reference, pooled) <= self.options.threshold:
            self.change_since = None
            refresh = self.options.refresh
            return t if refresh is not None and t - self.captioned_at >= refresh else None
        if self.change_since is None:
            self.change_since = t
        if t - self.change_since + 1e-9 < self.options.hold:
            return None
        start, self.change_since = self.change_since, None
        return start

    def captioned(self, t: float, pooled: np.ndarray) -> None:
        """The frame at `t` was captioned: it is the reference from now on."""
        self.reference, self.captioned_at = pooled, t


@dataclass
class Event:
    """One caption over a stretch of time (seconds); `end` is None while it lasts."""

    start: float
    frame: int
    caption: Caption
    end: float | None = None
    source: str = ""

    def to_dict(self) -> dict:
        """The JSON record of an event (caption-run --json on a video or camera)."""
        return {"source": self.source, "start": round(self.start, 3), "end": None if self.end is None else
                round(self.end, 3), "frame": self.frame, "caption": self.caption.text, "score": self.caption.score}


def timestamp(seconds: float, separator: str = ".") -> str:
    """`HH:MM:SS.mmm` (SubRip uses `,`)."""
    ms = round(max(seconds, 0.0) * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"
