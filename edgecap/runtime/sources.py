"""What a source string means, and the Frames every kind of source yields.

`open_source` decides, in this order: `-` (one image on standard input), `csi://N` (Jetson CSI camera),
`rtsp://`/`rtmp://`/`http(s)://` (stream), `N`/`cameraN`/`/dev/videoN` (camera N), an existing folder (its
subfolders too, unless `recursive` is off), an existing image or video file, a glob pattern (`**` recursive).
Live sources (camera, csi, stream) read in a background thread that keeps only the newest frame, so a slow
consumer never works through a backlog, and reopen a capture that stops delivering frames a few times.
"""

from __future__ import annotations

import errno
import glob
import itertools
import os
import re
import stat
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import cv2
import numpy as np

from .errors import DataError
from .preprocess import MAX_PIXELS, decode_image, read_rgb

IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jp2", ".avif",
              ".pbm", ".pgm", ".ppm", ".pnm")  # what OpenCV's image codecs decode (a GIF: its first frame)
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
STDIN = "-"
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
    time: float | None = None  # seconds: a video's own timestamp, a live source's since it opened


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


def quiet_opencv() -> None:
    """Keep OpenCV's and FFmpeg's log lines off stderr, where a command's own one-line message says what went
    wrong (unless OPENCV_LOG_LEVEL / OPENCV_FFMPEG_LOGLEVEL are set). Call it before the first capture opens:
    OpenCV reads FFmpeg's level once, then."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


@contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Collect what native code (libpng, libjpeg, ...) writes to file descriptor 2 in the block, as the lines of
    the list yielded (filled when the block ends), instead of letting it precede our own message. Python
    warnings raised in the block are shown after it, as usual."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as raised:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                lines += [line for line in sink.read().decode(errors="replace").splitlines() if line.strip()]
    finally:
        os.close(saved)
    for w in raised:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def read_frame(name: str, index: int, read: Callable[[], np.ndarray]) -> Frame:
    """A Frame of what `read` returns, or of its DataError; a native library's complaint is added to the error."""
    with native_stderr() as native:
        try:
            rgb, error = read(), None
        except DataError as e:
            rgb, error = None, str(e)
    if error is not None and native:
        error = f"{error} ({native[0]})"
    return Frame(name, index, rgb, error)


class ImageFiles(Source):
    """A fixed list of image files, read at most `max_fps` per second; an unreadable one (see also
    `entry_problem`) becomes a Frame with `error`."""

    def __init__(self, kind: str, paths: list[Path], max_pixels: int = MAX_PIXELS,
                 max_fps: float | None = None) -> None:
        self.kind, self.paths, self.max_pixels, self.max_fps = kind, paths, max_pixels, max_fps

    def __iter__(self) -> Iterator[Frame]:
        throttle = Throttle(self.max_fps)
        for index, path in enumerate(self.paths):
            throttle.wait()
            if problem := entry_problem(path):
                yield Frame(str(path), index, None, problem)
            else:
                yield read_frame(str(path), index, lambda: read_rgb(path, self.max_pixels))


class StdinImage(Source):
    """One encoded image read from standard input (`caption-run -`)."""

    kind = "stdin"

    def __init__(self, max_pixels: int = MAX_PIXELS) -> None:
        if sys.stdin is None or sys.stdin.isatty():
            raise DataError("standard input is a terminal: pipe an image into it (caption-run - < photo.jpg)")
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[Frame]:
        yield read_frame("<stdin>", 0, lambda: decode_image(sys.stdin.buffer.read(), "standard input",
                                                            self.max_pixels))


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
            seconds = self.cap.get(cv2.CAP_PROP_POS_MSEC) / 1000  # the grabbed frame's own timestamp
            ok, bgr = self.cap.retrieve()
            throttle.wait()
            name = f"{self.path}#{number}"
            if ok:
                yield Frame(name, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time=seconds)
            else:
                yield Frame(name, index, None, f"frame {number} of {self.path} could not be decoded", seconds)
            index += 1
        announced = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if number == 0:
            yield Frame(str(self.path), index, None, f"no frames in video {self.path} (empty, or none decodable)")
        elif number < announced - 1:
            yield Frame(f"{self.path}#{number}", index, None,
                        f"{self.path} ended after {number} of the {announced} frames it announces (truncated?)")

    @property
    def fps(self) -> float:
        """The container's frame rate (0 when it does not say)."""
        return float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)

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
        self.latest: tuple[int, np.ndarray, float] | None = None  # (frame number, BGR image, seconds since open)
        self.opened = time.monotonic()
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
                    self.latest = (number, bgr, time.monotonic() - self.opened)
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
                seen, bgr, seconds = self.latest
            yield Frame(f"{self.name}#{seen}", index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time=seconds)

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


def folder_images(folder: Path, recursive: bool = True) -> list[Path]:
    """A folder's image files (by extension), sorted; with `recursive`, its subfolders' too, symbolic links to
    folders followed. Kept for the reader to say why they cannot be read (`entry_problem`): broken symbolic links
    with an image name (dangling, or a loop), links back into a folder being walked (not followed), and
    subfolders that cannot be listed. DataError when the folder cannot be listed or holds no image."""
    found: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[str]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if not is_folder(entry):
                if is_image(path):
                    found.append(path)
            elif recursive:
                if (real := os.path.realpath(path)) in ancestors:
                    found.append(path)
                    continue
                try:
                    walk(path, ancestors | {real})
                except OSError:
                    found.append(path)

    try:
        walk(folder, frozenset({os.path.realpath(folder)}))
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror}") from None
    if not found:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTS)}) {'under' if recursive else 'in'} folder: {folder}")
    return sorted(found)


def glob_images(pattern: str) -> list[Path]:
    """The image paths (by extension) a glob pattern matches, sorted; `**` matches subfolders too. A file reached
    along several paths (through symbolic links, or a link loop) is listed once, by the first in sorted order."""
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    unique = {os.path.realpath(p): p for p in reversed(matches) if is_image(p) and not p.is_dir()}
    return sorted(unique.values())


def is_folder(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a folder or a symbolic link to one (not a link loop, which is no folder)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def entry_problem(path: Path) -> str | None:
    """Why a listed image path is no file to read, in one line, or None (reading it tells the rest): a dangling
    symbolic link, a symbolic link loop, a folder (a link back into a folder that contains it, or one that
    cannot be listed)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop: {path} -> {os.readlink(path)}" if path.is_symlink() else \
                f"symbolic link loop in the path {path}"
        if e.errno == errno.ENOENT and path.is_symlink():
            return f"dangling symbolic link: {path} -> {os.readlink(path)} (its target does not exist)"
        return None
    if not path.is_dir():
        return None
    if Path(os.path.realpath(path.parent)).is_relative_to(os.path.realpath(path)):
        return f"symbolic link loop: {path} -> {os.readlink(path)} leads back into a folder that contains it " \
               "(not followed)"
    try:
        os.scandir(path).close()
    except OSError as e:
        return f"cannot list folder {path}: {e.strerror}"
    return None


def not_a_file(path: Path) -> str:
    """What an existing path that is neither a regular file nor a folder is: `a FIFO`, `a socket`, ..."""
    mode = path.stat().st_mode
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


def open_source(uri: str, every: int = 1, max_fps: float | None = None, reconnects: int = 3,
                reconnect_delay: float = 1.0, max_pixels: int = MAX_PIXELS, recursive: bool = True) -> Source:
    """Decide what `uri` means (see the module docstring) and open it; user-input problems raise DataError."""
    if uri == STDIN:
        return StdinImage(max_pixels)
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
        return ImageFiles("folder", folder_images(path, recursive), max_pixels, max_fps)
    if problem := entry_problem(path):
        raise DataError(problem)
    if path.exists() and not path.is_file():
        raise DataError(f"not an image or video file: {uri} is {not_a_file(path)}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTS:
            return ImageFiles("image", [path], max_pixels, max_fps)
        if suffix in VIDEO_EXTS:
            return VideoFile(path, every, max_fps)
        raise DataError(f"not an image or video file: {uri} (unknown extension {suffix!r})")
    if any(c in uri for c in "*?["):
        if not (images := glob_images(uri)):
            raise DataError(f"no image files match: {uri}")
        return ImageFiles("glob", images, max_pixels, max_fps)
    raise DataError(f"no such file or folder: {uri}")
