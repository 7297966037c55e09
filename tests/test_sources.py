"""Source strings -> Frames: files, folders, globs, videos, cameras, and live-source logic with fake captures."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edgecap.runtime import sources
from edgecap.runtime.errors import DataError
from edgecap.runtime.sources import LiveCapture, csi_pipeline, open_source


def write_image(path: Path, bgr: tuple[int, int, int]) -> None:
    cv2.imwrite(str(path), np.full((16, 16, 3), bgr, np.uint8))


def frame_number(frame: sources.Frame) -> int:
    return int(frame.source.rsplit("#", 1)[1])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_image(tmp_path / "b.png", (255, 0, 0))  # blue in BGR
    write_image(tmp_path / "a.png", (0, 0, 255))  # red in BGR
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_image_file_is_one_rgb_frame(folder: Path) -> None:
    with open_source(str(folder / "a.png")) as src:
        frames = list(src)
    assert (src.kind, src.live) == ("image", False)
    assert len(frames) == 1 and frames[0].error is None
    assert frames[0].rgb[0, 0].tolist() == [255, 0, 0]  # red, in RGB order


def test_corrupt_image_file_is_an_error_frame(folder: Path) -> None:
    [frame] = open_source(str(folder / "c.jpg"))
    assert frame.rgb is None and "c.jpg" in frame.error


def test_folder_is_its_sorted_images_with_corrupt_ones_as_errors(folder: Path) -> None:
    src = open_source(str(folder))
    frames = list(src)
    assert src.kind == "folder"
    assert [Path(f.source).name for f in frames] == ["a.png", "b.png", "c.jpg"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[1].rgb[0, 0].tolist() == [0, 0, 255]
    assert frames[0].error is None and frames[1].error is None
    assert frames[2].rgb is None and frames[2].error


def test_read_images_skips_unreadable_ones_and_stops_at_count(folder: Path) -> None:
    images = sources.read_images(str(folder), 5)
    assert [im[0, 0].tolist() for im in images] == [[255, 0, 0], [0, 0, 255]]  # a.png, b.png; c.jpg is corrupt
    assert len(sources.read_images(str(folder), 1)) == 1
    with pytest.raises(DataError, match="no readable images in .*c.jpg"):
        sources.read_images(str(folder / "c.jpg"), 5)


def test_glob_is_sorted_matches(folder: Path) -> None:
    src = open_source(str(folder / "*.png"))
    assert src.kind == "glob"
    assert [Path(f.source).name for f in src] == ["a.png", "b.png"]


@pytest.mark.parametrize("make_uri, message", [
    (lambda d: str(d), "no image files"),
    (lambda d: str(d / "*.png"), "no image files match"),
    (lambda d: str(d / "missing.jpg"), "no such file or folder"),
])
def test_nothing_to_read_raises(tmp_path: Path, make_uri, message: str) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=message):
        open_source(make_uri(tmp_path))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 solid frames: BGR (10*i, 0, 200), i.e. red 200 and blue growing."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (32, 32))
    for i in range(20):
        writer.write(np.full((32, 32, 3), (10 * i, 0, 200), np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize("every, numbers", [(1, list(range(20))), (5, [0, 5, 10, 15])])
def test_video_frames_in_rgb_order(video: Path, every: int, numbers: list[int]) -> None:
    with open_source(str(video), every=every) as src:
        frames = list(src)
    assert (src.kind, src.live) == ("video", False)
    assert [frame_number(f) for f in frames] == numbers
    assert [f.index for f in frames] == list(range(len(numbers)))
    for f, n in zip(frames, numbers):
        r, g, b = f.rgb[16, 16].astype(int)
        assert abs(r - 200) <= 8 and g <= 8 and abs(b - 10 * n) <= 8


def test_video_max_fps_throttles(video: Path) -> None:
    start = time.monotonic()
    with open_source(str(video), every=5, max_fps=20) as src:
        assert len(list(src)) == 4
    assert time.monotonic() - start >= 0.14  # 3 gaps of 1/20 s


def test_unreadable_video_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.avi").write_bytes(b"not a video" * 100)
    with pytest.raises(DataError, match="cannot open video"):
        open_source(str(tmp_path / "bad.avi"))


@pytest.mark.parametrize("uri", ["camera99", "/dev/video99", "99"])
def test_missing_camera_fails_fast(uri: str) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="camera 99 is not available"):
        open_source(uri)
    assert time.monotonic() - start < 2


class FakeCapture:
    """Counts frames into a BGR (1, 2, n % 256) image; opened=False or read failures after `frames` reads."""

    def __init__(self, frames: int | None = None, opened: bool = True, delay: float = 0.001) -> None:
        self.frames, self.opened, self.delay, self.reads = frames, opened, delay, 0

    def isOpened(self) -> bool:
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(self.delay)
        if self.frames is not None and self.reads >= self.frames:
            return False, None
        self.reads += 1
        return True, np.full((2, 2, 3), (1, 2, self.reads % 256), np.uint8)

    def release(self) -> None:
        pass


class FakeFactory:
    """Hands out the given captures in turn, then closed ones; records the arguments of every call."""

    def __init__(self, *captures: FakeCapture) -> None:
        self.captures, self.calls = iter(captures), []

    def __call__(self, *args: object) -> FakeCapture:
        self.calls.append(args)
        return next(self.captures, FakeCapture(opened=False))


def live(factory: FakeFactory, **options: object) -> LiveCapture:
    return LiveCapture("stream", "rtsp://fake", "stream rtsp://fake", factory, **options)


def test_live_source_keeps_only_the_newest_frame() -> None:
    cap = FakeCapture()
    with live(FakeFactory(cap)) as src:
        seen = []
        for frame in itertools.islice(src, 5):
            seen.append(frame_number(frame))
            assert frame_number(frame) >= cap.reads - 10  # no backlog: at most a few reads behind
            assert frame.rgb[0, 0].tolist() == [(frame_number(frame) + 1) % 256, 2, 1]  # RGB of BGR (1, 2, n)
            time.sleep(0.05)  # a slow consumer
    assert seen == sorted(set(seen))
    assert all(b - a > 5 for a, b in zip(seen, seen[1:]))  # frames were skipped, not queued
    assert not src.thread.is_alive()


def test_live_source_max_fps_throttles() -> None:
    with live(FakeFactory(FakeCapture()), max_fps=20) as src:
        start = time.monotonic()
        assert len(list(itertools.islice(src, 4))) == 4
    assert time.monotonic() - start >= 0.14


@pytest.mark.parametrize("dead", [FakeCapture(opened=False), FakeCapture(frames=0)])
def test_live_source_gives_up_after_reconnects(dead: FakeCapture) -> None:
    factory = FakeFactory(FakeCapture(frames=3), dead, dead)
    frames = []
    with live(factory, reconnects=2, reconnect_delay=0.01) as src:
        with pytest.raises(DataError, match="stream rtsp://fake dropped and did not come back after 2 reconnects"):
            for frame in src:
                frames.append(frame)
    assert len(factory.calls) == 3  # the first open and 2 reconnects
    assert 1 <= len(frames) <= 3


def test_live_source_continues_after_a_drop() -> None:
    factory = FakeFactory(FakeCapture(frames=3), FakeCapture())
    with live(factory, reconnects=1, reconnect_delay=0.01) as src:
        numbers = [frame_number(f) for f in itertools.islice(src, 6)]
    assert len(factory.calls) == 2
    assert numbers == sorted(set(numbers)) and numbers[-1] >= 5


@pytest.mark.parametrize("uri, kind, args", [
    ("rtsp://cam/live", "stream", ("rtsp://cam/live",)),
    ("https://cam/video.mjpg", "stream", ("https://cam/video.mjpg",)),
    ("/dev/video2", "camera", (2,)),
    ("csi://1", "csi", (csi_pipeline(1), cv2.CAP_GSTREAMER)),
])
def test_live_source_strings_open_the_right_capture(monkeypatch, uri: str, kind: str, args: tuple) -> None:
    factory = FakeFactory(FakeCapture())
    monkeypatch.setattr(sources, "capture_factory", factory)
    with open_source(uri) as src:
        assert (src.kind, src.live) == (kind, True)
        frame = next(iter(src))
    assert factory.calls[0] == args
    assert frame.source.startswith(f"{'camera2' if kind == 'camera' else uri}#")


def test_unavailable_csi_camera_names_gstreamer(monkeypatch) -> None:
    monkeypatch.setattr(sources, "capture_factory", FakeFactory())
    with pytest.raises(DataError, match="CSI camera 0 is not available.*GStreamer.*nvarguscamerasrc"):
        open_source("csi://0")


def test_csi_pipeline() -> None:
    pipeline = csi_pipeline(2, width=1920, height=1080, fps=60)
    assert pipeline.startswith("nvarguscamerasrc sensor-id=2 ! ")
    assert "video/x-raw(memory:NVMM),width=1920,height=1080,framerate=60/1" in pipeline
    assert "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR" in pipeline
    assert pipeline.endswith("appsink drop=1 max-buffers=1")
    assert "width=1280,height=720,framerate=30/1" in csi_pipeline(0)


# ---- issue 19, item 8: subfolders, links, special files, empty videos, formats, native log lines, stdin ------

@pytest.fixture
def tree(folder: Path) -> Path:
    """`folder` plus sub/d.png, sub/deeper/e.png, a dangling link, a link loop and a link back up to the top."""
    (folder / "sub" / "deeper").mkdir(parents=True)
    write_image(folder / "sub" / "d.png", (0, 255, 0))
    write_image(folder / "sub" / "deeper" / "e.png", (0, 255, 0))
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "sub" / "up").symlink_to(folder)
    return folder


def test_folder_recurses_unless_told_not_to_and_says_why_links_are_unreadable(tree: Path) -> None:
    frames = {str(Path(f.source).relative_to(tree)): f for f in open_source(str(tree))}
    assert list(frames) == ["a.png", "b.png", "c.jpg", "gone.jpg", "loop.png", "sub/d.png", "sub/deeper/e.png",
                            "sub/up"]
    assert frames["sub/deeper/e.png"].rgb[0, 0].tolist() == [0, 255, 0]
    assert frames["gone.jpg"].error == f"dangling symbolic link: {tree / 'gone.jpg'} -> {tree / 'nowhere.jpg'} " \
                                       "(its target does not exist)"
    assert frames["loop.png"].error == f"symbolic link loop: {tree / 'loop.png'} -> {tree / 'loop.png'}"
    assert frames["sub/up"].error.startswith(f"symbolic link loop: {tree / 'sub' / 'up'} -> {tree} leads back")
    top = [Path(f.source).name for f in open_source(str(tree), recursive=False)]
    assert top == ["a.png", "b.png", "c.jpg", "gone.jpg", "loop.png"]
    with pytest.raises(DataError, match="^dangling symbolic link: .*gone.jpg"):
        open_source(str(tree / "gone.jpg"))
    assert [Path(f.source).name for f in open_source(str(tree / "**" / "*.png"))] == \
        ["a.png", "b.png", "loop.png", "d.png", "e.png"]  # a glob's ** reaches into subfolders too


def test_special_files_are_not_said_to_be_missing(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(DataError, match=r"^not an image or video file: .*pipe.jpg is a FIFO \(named pipe\)$"):
        open_source(str(tmp_path / "pipe.jpg"))


def test_video_without_frames_is_an_error_frame(tmp_path: Path) -> None:
    path = tmp_path / "empty.avi"
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32)).release()
    with open_source(str(path)) as src:
        assert [(f.rgb, f.error) for f in src] == [(None, f"no frames in video {path} (empty, or none decodable)")]


@pytest.mark.parametrize("ext", [".gif", ".jp2", ".avif", ".ppm", ".pgm", ".jpe"])
def test_formats_opencv_decodes_are_read(tmp_path: Path, ext: str) -> None:
    first, second = (Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)) for rgb in [(200, 0, 0), (0, 0, 200)])
    animation = {"save_all": True, "append_images": [second]} if ext == ".gif" else {}
    first.convert("L" if ext == ".pgm" else "RGB").save(tmp_path / f"x{ext}", **animation)
    [frame] = open_source(str(tmp_path))  # listed in a folder, and read
    assert frame.error is None and frame.rgb.shape == (32, 32, 3)
    if ext == ".gif":  # an animation: its first frame
        assert frame.rgb[0, 0].tolist() == [200, 0, 0]


def test_native_library_messages_join_our_line(tmp_path: Path, capfd) -> None:
    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    data = bytearray(png.tobytes())
    data[60] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
    (tmp_path / "bad.png").write_bytes(bytes(data))
    capfd.readouterr()
    [frame] = open_source(str(tmp_path / "bad.png"))
    assert frame.rgb is None and frame.error.endswith("(libpng error: IDAT: CRC error)")
    assert capfd.readouterr().err == ""  # not printed ahead of the command's own warning


def test_quiet_opencv_keeps_ffmpeg_off_stderr(tmp_path: Path) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 8)
    code = ("import sys; from edgecap.runtime import sources; sources.quiet_opencv()\n"
            "try:\n    sources.open_source(sys.argv[1])\nexcept sources.DataError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "junk.mp4")], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")})
    assert done.stdout.startswith("cannot open video") and done.stderr == ""


def test_stdin_is_one_image(monkeypatch) -> None:
    ok, png = cv2.imencode(".png", np.full((16, 16, 3), (255, 0, 0), np.uint8))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(png.tobytes())))
    [frame] = open_source("-")
    assert frame.source == "<stdin>" and frame.rgb[0, 0].tolist() == [0, 0, 255]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    [frame] = open_source("-")
    assert frame.rgb is None and frame.error == "not a readable image: standard input (empty)"


def test_max_fps_paces_image_files_too(folder: Path, monkeypatch) -> None:
    """--max-fps used to apply to videos and cameras only: a folder was read as fast as it could be."""
    made: list[float | None] = []

    class Counting(sources.Throttle):
        waits = 0

        def __init__(self, max_fps: float | None) -> None:
            made.append(max_fps)
            super().__init__(max_fps)

        def wait(self) -> None:
            Counting.waits += 1

    monkeypatch.setattr(sources, "Throttle", Counting)
    for uri in (str(folder), str(folder / "a.png"), str(folder / "*.png")):
        Counting.waits = 0
        with open_source(uri, max_fps=5) as src:
            frames = list(src)
        assert made[-1] == 5 and Counting.waits == len(frames) >= 1, uri
