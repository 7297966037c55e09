"""What a source string means, and the Frames every kind of source yields.

`open_source` decides, in this order: `csi://N` (Jetson CSI camera), `rtsp://`/`rtmp://`/`http(s)://` (stream),
`N`/`cameraN`/`/dev/videoN` (camera N), an existing folder, an existing image or video file, a glob pattern.
Live sources (camera, csi, stream) read in a background thread that keeps only the newest frame, so a slow
consumer never works through a backlog, and reopen a capture that stops delivering frames a few times.
"""

from __future__ import annotations

import glob
import itertools
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import cv2
import numpy as np

from .errors import DataError
from .preprocess import read_rgb

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")
CAMERA_RE = re.compile(r"(?:camera|/dev/video)?(\d+)")
CSI_RE = re.compile(r"csi://(\d+)")
UNAVAILABLE_HINTS = {
    "camera": "no such device, or another program is using it",
    "csi": "needs OpenCV built with GStreamer and the nvarguscamerasrc plugin of a Jetson",
    "stream": "check the address, the credentials and the network",
}


class Capture(Protocol):
    """The part of cv2.VideoCapture that live sources use."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...


capture_factory: Callable[..., Capture] = cv2.VideoCapture
"""Called with cv2.VideoCapture's arguments on every (re)open of a live source; tests replace it."""


@dataclass
class Frame:
    """One item of a source: an RGB uint8 HxWx3 image, or the one-line reason it could not be read."""

    source: str
    index: int
    rgb: np.ndarray | None
    error: str | None = None


class Source:
    """An iterable of Frames; a context manager whose close() releases captures and threads."""

    kind: str
    live: bool = False

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (nothing by default)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Throttle:
    """wait() sleeps so that it returns at most `max_fps` times per second; no limit when max_fps is None."""

    def __init__(self, max_fps: float | None) -> None:
        self.period = 1.0 / max_fps if max_fps else 0.0
        self.next = 0.0

    def wait(self) -> None:
        time.sleep(max(0.0, self.next - time.monotonic()))
        self.next = time.monotonic() + self.period


class ImageFiles(Source):
    """A fixed list of image files; an unreadable one becomes a Frame with `error` set."""

    def __init__(self, kind: str, paths: list[Path]) -> None:
        self.kind, self.paths = kind, paths

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            try:
                yield Frame(str(path), index, read_rgb(path))
            except DataError as e:
                yield Frame(str(path), index, None, str(e))


class VideoFile(Source):
    """Every `every`-th frame of a video file, at most `max_fps` per second; the end of the file ends it.

    A file that ends more than one frame before the count its container announces (truncated) ends with an
    error Frame saying so (the count of some containers is an estimate from duration and frame rate).
    """

    kind = "video"

    def __init__(self, path: Path, every: int, max_fps: float | None) -> None:
        self.path, self.every, self.max_fps = path, every, max_fps
        self.cap = cv2.VideoCapture(str(path))
        if not self.cap.isOpened():
            self.cap.release()
            raise DataError(f"cannot open video: {path} (corrupt, or a codec OpenCV cannot decode)")

    def __iter__(self) -> Iterator[Frame]:
        throttle, index = Throttle(self.max_fps), 0
        for number in itertools.count():
            if not self.cap.grab():
                break
            if number % self.every:
                continue  # grab() without retrieve() skips the decode
            ok, bgr = self.cap.retrieve()
            throttle.wait()
            name = f"{self.path}#{number}"
            if ok:
                yield Frame(name, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            else:
                yield Frame(name, index, None, f"frame {number} of {self.path} could not be decoded")
            index += 1
        announced = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if number < announced - 1:
            yield Frame(f"{self.path}#{number}", index, None,
                        f"{self.path} ended after {number} of the {announced} frames it announces (truncated?)")

    def close(self) -> None:
        self.cap.release()


class LiveCapture(Source):
    """A camera or stream read by a background thread that keeps only the newest frame.

    Iterating returns the newest frame not yet returned (blocking until one arrives), at most `max_fps` per
    second. A capture whose read fails is reopened up to `reconnects` times, `reconnect_delay` seconds apart;
    the count starts over after each good frame. After that the iterator raises DataError.
    """

    live = True

    def __init__(self, kind: str, name: str, label: str, open_capture: Callable[[], Capture], *,
                 max_fps: float | None = None, reconnects: int = 3, reconnect_delay: float = 1.0) -> None:
        self.kind, self.name, self.label, self.open_capture = kind, name, label, open_capture
        self.max_fps, self.reconnects, self.reconnect_delay = max_fps, reconnects, reconnect_delay
        self.cap = self._open()
        if self.cap is None:
            raise DataError(f"{label} is not available ({UNAVAILABLE_HINTS[kind]})")
        self.cond = threading.Condition()
        self.latest: tuple[int, np.ndarray] | None = None  # (frame number, BGR image)
        self.failure: DataError | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def _open(self) -> Capture | None:
        cap = self.open_capture()
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _grab(self) -> None:
        """Thread body: publish each read frame as `latest`, reopening the capture when reads fail."""
        cap, number, attempts = self.cap, 0, 0
        while not self.stopped.is_set():
            ok, bgr = cap.read() if cap is not None else (False, None)
            if ok:
                with self.cond:
                    self.latest = (number, bgr)
                    self.cond.notify_all()
                number, attempts = number + 1, 0
                continue
            if cap is not None:
                cap.release()
                cap = None
            if attempts == self.reconnects:
                with self.cond:
                    self.failure = DataError(
                        f"{self.label} dropped and did not come back after {self.reconnects} reconnects")
                    self.cond.notify_all()
                return
            attempts += 1
            if not self.stopped.wait(self.reconnect_delay):
                cap = self._open()
        if cap is not None:
            cap.release()

    def _has_new(self, seen: int) -> bool:
        return self.latest is not None and self.latest[0] > seen

    def __iter__(self) -> Iterator[Frame]:
        if self.thread is None:
            self.thread = threading.Thread(target=self._grab, name=f"edgecap-{self.kind}", daemon=True)
            self.thread.start()
        throttle, seen = Throttle(self.max_fps), -1
        for index in itertools.count():
            throttle.wait()
            with self.cond:
                self.cond.wait_for(lambda: self._has_new(seen) or self.failure or self.stopped.is_set())
                if not self._has_new(seen):
                    if self.failure is not None:
                        raise self.failure
                    return  # closed
                seen, bgr = self.latest
            yield Frame(f"{self.name}#{seen}", index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        self.stopped.set()
        with self.cond:
            self.cond.notify_all()
        if self.thread is None:
            self.cap.release()
        else:
            self.thread.join(timeout=2.0)  # the thread releases its capture; a hung read() must not hang us


def csi_pipeline(sensor_id: int, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """GStreamer pipeline for a Jetson CSI camera (nvarguscamerasrc) ending in a BGR appsink for OpenCV."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1 ! "
            "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink drop=1 max-buffers=1")


def read_images(uri: str, count: int) -> list[np.ndarray]:
    """The first `count` readable images of a folder, glob, image or video (unreadable ones skipped)."""
    with open_source(uri) as src:
        images = list(itertools.islice((f.rgb for f in src if f.rgb is not None), count))
    if not images:
        raise DataError(f"no readable images in {uri}")
    return images


def is_image(path: str | Path) -> bool:
    """Whether a path names an image file by its extension."""
    return Path(path).suffix.lower() in IMAGE_EXTS


def _image_files(paths: list[Path]) -> list[Path]:
    return sorted(p for p in paths if is_image(p) and p.is_file())


def open_source(uri: str, every: int = 1, max_fps: float | None = None, reconnects: int = 3,
                reconnect_delay: float = 1.0) -> Source:
    """Decide what `uri` means (see the module docstring) and open it; user-input problems raise DataError."""
    if every < 1:
        raise DataError(f"every must be at least 1, got {every}")
    if max_fps is not None and max_fps <= 0:
        raise DataError(f"max_fps must be positive, got {max_fps}")
    live = {"max_fps": max_fps, "reconnects": reconnects, "reconnect_delay": reconnect_delay}
    if csi := CSI_RE.fullmatch(uri):
        sensor = int(csi[1])
        return LiveCapture("csi", uri, f"CSI camera {sensor}",
                           lambda: capture_factory(csi_pipeline(sensor), cv2.CAP_GSTREAMER), **live)
    if uri.startswith(STREAM_SCHEMES):
        return LiveCapture("stream", uri, f"stream {uri}", lambda: capture_factory(uri), **live)
    if camera := CAMERA_RE.fullmatch(uri):
        n = int(camera[1])
        return LiveCapture("camera", f"camera{n}", f"camera {n}", lambda: capture_factory(n), **live)
    path = Path(uri)
    if path.is_dir():
        if not (images := _image_files(list(path.iterdir()))):
            raise DataError(f"no image files ({', '.join(IMAGE_EXTS)}) in folder: {uri}")
        return ImageFiles("folder", images)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTS:
            return ImageFiles("image", [path])
        if suffix in VIDEO_EXTS:
            return VideoFile(path, every, max_fps)
        raise DataError(f"not an image or video file: {uri} (unknown extension {suffix!r})")
    if any(c in uri for c in "*?["):
        if not (images := _image_files([Path(p) for p in glob.glob(uri)])):
            raise DataError(f"no image files match: {uri}")
        return ImageFiles("glob", images)
    raise DataError(f"no such file or folder: {uri}")
