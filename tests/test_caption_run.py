"""caption-run: output modes, parity with the API and PyTorch, saving, errors, the timing report."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecap.runtime import cli, sources
from edgecap.runtime.captioner import BUNDLED, Captioner
from edgecap.runtime.cli import main
from edgecap.runtime.manifest import Manifest
from edgecap.runtime.search import SearchOptions, search
from edgecap.runtime.timing import TimingStats
from edgecap.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgecap.train.engine import TorchEngine
from edgecap.train.synthetic import SyntheticSplit

N = 6          # scenes in the folder
FRAMES = 10    # frames in the video
REPORT_LINE = re.compile(r"^  (\S.*?)\s+p50\s+(\S+)\s+p90\s+(\S+)\s+p99\s+(\S+)$", re.M)


@pytest.fixture(scope="module")
def split() -> SyntheticSplit:
    return SyntheticSplit("test", max(N, FRAMES), image_size=112)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, split) -> Path:
    """N scene PNGs plus one corrupt JPEG (sorted last)."""
    folder = tmp_path_factory.mktemp("scenes")
    for i in range(N):
        cv2.imwrite(str(folder / f"scene{i}.png"), cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))
    (folder / "zz-corrupt.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory, split) -> Path:
    """A FRAMES-frame MJPG video of scenes."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (112, 112))
    for i in range(FRAMES):
        writer.write(cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) in-process -> (exit status, stdout, stderr); earlier output (fixtures') is dropped."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def report_percentiles(err: str) -> dict[str, tuple[float, float, float]]:
    return {m[1]: tuple(map(float, m.groups()[1:])) for m in REPORT_LINE.finditer(err)}


def one_line_error(code: int, err: str) -> str:
    """Assert the run failed with exactly one `caption-run: error:` line and return it."""
    assert code == 2 and err.count("\n") == 1 and err.startswith("caption-run: error: "), err
    return err


def torch_captions(ckpt: Path, images: list[np.ndarray], opts: SearchOptions) -> list[str]:
    """The PyTorch reference: the checkpoint's own modules driven by the shared search."""
    model, vocab, pre = model_from_checkpoint(load_checkpoint(ckpt))
    engine = TorchEngine(model)
    state, context = engine.prepare(engine.encode(pre.batch(images)))
    return [vocab.decode(hyps[0].tokens) for hyps in search(engine, state, context, opts)]


@pytest.mark.parametrize("beams", [1, 3])
def test_folder_captions_match_api_and_torch(exported, trained, scenes, split, capsys, beams):
    folder = exported["attention"]
    code, out, err = run(capsys, "--model", folder, "--beams", beams, "--batch", 4, scenes)
    assert code == 1  # the corrupt file
    assert f"caption-run: warning: not a readable image: {scenes / 'zz-corrupt.jpg'}" in err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [src for src, _ in lines] == [str(scenes / f"scene{i}.png") for i in range(N)]
    said = [text for _, text in lines]
    images = [split.image(i) for i in range(N)]
    api = [c.text for c in Captioner.load(folder, num_beams=beams).caption(images)]
    reference = torch_captions(trained("attention"),
                               images, dataclasses.replace(Manifest.load(folder).search, num_beams=beams))
    assert said == api == reference


def test_video_jsonl_every_and_n_best(exported, clip, capsys):
    code, out, err = run(capsys, "--model", exported["attention"], "--json", "--every-frame", clip)
    assert code == 0
    recs = records(out)  # stdout is pure JSONL: the report is on stderr
    assert [r["source"] for r in recs] == [f"{clip}#{i}" for i in range(FRAMES)]
    for r in recs:
        assert r["caption"] == " ".join(r["words"]) and r["words"] and isinstance(r["score"], float)
        assert set(r["timings"]) >= {"preprocess_ms", "encoder_ms", "decoder_ms", "decoder_per_word_ms"}
        assert all(v > 0 for v in r["timings"].values()) and "alternatives" not in r
    assert f"captioned {FRAMES}, failed 0:" in err

    code, out, _ = run(capsys, "--model", exported["attention"], "--json", "--every-frame", "--every", 2,
                       "--beams", 3, "--n-best", 2, clip)
    recs = records(out)
    assert code == 0 and [r["source"] for r in recs] == [f"{clip}#{i}" for i in range(0, FRAMES, 2)]
    for r in recs:
        assert len(r["alternatives"]) == 2 and r["alternatives"][0] == {"caption": r["caption"], "score": r["score"]}
        assert r["alternatives"][0]["score"] >= r["alternatives"][1]["score"]


def test_search_flags_override_only_what_is_typed(exported, scenes, capsys):
    image, model = scenes / "scene4.png", exported["attention"]
    assert Manifest.load(model).search.num_beams == 3  # so --n-best 3 alone works only if it is kept
    [default] = records(run(capsys, "--model", model, "--json", "--n-best", 3, image)[1])
    assert len(default["alternatives"]) == 3
    [greedy] = records(run(capsys, "--model", model, "--json", "--beams", 1, image)[1])
    [unnormalised] = records(run(capsys, "--model", model, "--json", "--beams", 1, "--length-penalty", 0, image)[1])
    assert unnormalised["caption"] == greedy["caption"]  # a typed 0 counts: total log p, <end> included
    assert unnormalised["score"] == pytest.approx(greedy["score"] * (len(greedy["words"]) + 1))


def test_save_and_attention_figures(exported, clip, scenes, tmp_path, capsys):
    out_dir = tmp_path / "out"
    image = scenes / "scene0.png"
    code, out, _ = run(capsys, "--model", exported["attention"], "--save", out_dir, "--attention", "--quiet",
                       "--every-frame", clip, image, image)
    assert code == 0 and len(out.splitlines()) == FRAMES + 2
    stems = [f"clip-{i:06d}" for i in range(FRAMES)] + ["scene0", "scene0-2"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [f"{s}.jpg" for s in stems] + [f"{s}.attention.png" for s in stems])
    annotated, raw = cv2.imread(str(out_dir / "scene0.jpg")), cv2.imread(str(image))
    assert annotated.shape == raw.shape
    assert np.abs(annotated[-10:].astype(int) - raw[-10:]).mean() > 20  # the caption band
    assert cv2.imread(str(out_dir / "clip-000000.attention.png")).shape[0] > 112

    err = one_line_error(*run(capsys, "--model", exported["plain"], "--save", tmp_path / "plain", "--attention",
                              image)[::2])
    assert "needs an attention model" in err and not (tmp_path / "plain").exists()


@pytest.mark.parametrize("case, expected", [
    ("missing model", "model folder not found"),
    ("broken manifest", "not valid JSON"),
    ("missing source", "no such file or folder"),
    ("no camera", "camera 99 is not available"),
    ("unknown engine", "unknown engine 'ortt' (did you mean 'ort'?)"),
    ("attention without save", "add --save DIR"),
])
def test_errors_are_one_line(exported, scenes, tmp_path, capfd, case, expected):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{ not json")
    model, source, extra = exported["plain"], scenes, []
    if case == "missing model":
        model = tmp_path / "nope"
    elif case == "broken manifest":
        model = tmp_path / "broken"
    elif case == "missing source":
        source = tmp_path / "nothing.png"
    elif case == "no camera":
        source = "camera99"
    elif case == "unknown engine":
        extra = ["--engine", "ortt"]
    else:
        extra = ["--attention"]
    err = one_line_error(*run(capfd, "--model", model, *extra, source)[::2])  # capfd: OpenCV's C++ logs too
    assert expected in err
    if case == "missing model":
        assert "export-onnx CKPT -o" in err


def test_readable_sources_are_captioned_beside_a_missing_one(exported, scenes, tmp_path, capsys):
    code, out, err = run(capsys, "--model", exported["plain"], scenes / "scene1.png", tmp_path / "gone.png",
                         scenes / "scene2.png")
    assert code == 1 and [line.split("\t")[0] for line in out.splitlines()] == \
        [str(scenes / "scene1.png"), str(scenes / "scene2.png")]
    assert f"warning: no such file or folder: {tmp_path / 'gone.png'}" in err and "failed 1" in err


def test_show_needs_gui_and_display(exported, scenes, capsys, monkeypatch):
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  GUI:                           NONE\n")
    err = one_line_error(*run(capsys, "--model", exported["plain"], "--show", scenes)[::2])
    assert "headless" in err
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  GUI:                           GTK3\n")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert "needs a display" in one_line_error(*run(capsys, "--model", exported["plain"], "--show", scenes)[::2])


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_precisions_run_on_cpu(exported, scenes, capsys, precision):
    code, out, _ = run(capsys, "--model", exported["attention"], "--precision", precision, scenes / "scene1.png")
    assert code == 0 and out.startswith(f"{scenes / 'scene1.png'}\t") and out.split("\t")[1].strip()


def test_model_defaults_to_env_then_dot_model_then_bundled(exported, scenes, tmp_path, capsys, monkeypatch):
    image = scenes / "scene2.png"
    monkeypatch.setenv("EDGECAP_MODEL", str(exported["plain"]))
    code, out, err = run(capsys, image)
    assert code == 0 and out.startswith(str(image)) and "bundled" not in err
    monkeypatch.delenv("EDGECAP_MODEL")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(exported["plain"])
    code, out, err = run(capsys, image)
    assert code == 0 and "bundled" not in err
    (tmp_path / "model").unlink()
    code, out, err = run(capsys, image)
    assert code == 0 and out.startswith(f"{image}\t") and out.split("\t")[1].strip()
    assert err.count("using the bundled model flickr8k-lite1") == 1


def test_timing_report(exported, scenes, capsys):
    code, out, err = run(capsys, "--model", exported["attention"], "--batch", 4, scenes)
    assert code == 1 and len(out.splitlines()) == N
    assert "batches of up to 4: per-image time = batch time / batch size" in err
    stages = report_percentiles(err)
    assert list(stages) == ["preprocess", "encoder", "decoder", "decoder per word", "end to end"]
    for p50, p90, p99 in stages.values():
        assert 0 < p50 <= p90 <= p99
    assert stages["decoder per word"][0] < stages["decoder"][0] < stages["end to end"][0]
    assert re.search(rf"captioned {N}, failed 1: [\d.]+ images/s", err)

    code, _, err = run(capsys, "--model", exported["attention"], "--quiet", scenes)
    assert code == 1 and err.startswith("caption-run: warning:") and err.count("\n") == 1


def test_timing_stats_known_numbers():
    clock = iter([0.0, 5.0]).__next__
    stats = TimingStats(clock=clock)
    for ms in range(1, 101):
        stats.add({"decoder_ms": float(ms)})
    stats.add({"decoder_ms": 400.0, "encoder_ms": 8.0}, images=4)  # 4 images at 100 ms, 2 ms
    stats.failures = 2
    s = stats.summary()
    expected = np.percentile(list(range(1, 101)) + [100] * 4, [50, 90, 99])
    assert list(s["stages_ms"]["decoder_ms"].values()) == pytest.approx(expected)
    assert s["stages_ms"]["encoder_ms"] == {"p50": 2.0, "p90": 2.0, "p99": 2.0}
    assert (s["images"], s["failures"], s["wall_s"], s["images_per_s"]) == (104, 2, 5.0, 104 / 5.0)
    stats.clock = iter([5.0]).__next__
    text = stats.report()
    assert "batches of up to 4" in text and "captioned 104, failed 2: 20.8 images/s over 5.00 s" in text
    assert report_percentiles(text)["decoder"] == pytest.approx(tuple(round(v, 2) for v in expected))


def test_ctrl_c_stops_with_report_so_far(exported, scenes, capsys, monkeypatch):
    real, calls = Captioner.caption_batch, []

    def interrupt_second(self, images, options=None):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images, options)

    monkeypatch.setattr(Captioner, "caption_batch", interrupt_second)
    code, out, err = run(capsys, "--model", exported["plain"], "--batch", 2, scenes)
    assert code == 130 and len(out.splitlines()) == 2
    assert "captioned 2, failed 0:" in err and err.rstrip().endswith("caption-run: interrupted")


class FakeCamera:
    """A capture that delivers `frames` scenes, then fails (a dropped stream); reopening it fails."""

    opened = 0

    def __init__(self, split: SyntheticSplit, frames: int) -> None:
        FakeCamera.opened += 1
        self.split, self.left, self.first = split, frames, FakeCamera.opened == 1

    def isOpened(self) -> bool:
        return self.first

    def read(self):
        time.sleep(0.01)
        if not self.first or self.left == 0:
            return False, None
        self.left -= 1
        return True, cv2.cvtColor(self.split.image(self.left), cv2.COLOR_RGB2BGR)

    def release(self) -> None:
        pass


def test_live_source_one_frame_at_a_time_then_drop(exported, split, capsys, monkeypatch):
    monkeypatch.setattr(FakeCamera, "opened", 0)
    monkeypatch.setattr(sources, "capture_factory", lambda *a: FakeCamera(split, 5))
    monkeypatch.setattr(cli, "open_source", functools.partial(sources.open_source, reconnect_delay=0.01))
    code, out, err = run(capsys, "--model", exported["plain"], "--json", "--every-frame", "--batch", 8, "camera0")
    recs = records(out)
    assert 1 <= len(recs) <= 5 and all(r["batch"] == 1 and r["source"].startswith("camera0#") for r in recs)
    assert code == 2 and f"captioned {len(recs)}, failed 0:" in err
    assert err.splitlines()[-1] == "caption-run: error: camera 0 dropped and did not come back after 3 reconnects"


def test_installed_script_and_no_torch(exported, scenes):
    script = Path(sys.executable).parent / "caption-run"
    image = scenes / "scene3.png"
    done = subprocess.run([script, "--model", exported["plain"], "--json", image], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert records(done.stdout)[0]["source"] == str(image) and "captioned 1, failed 0:" in done.stderr
    probe = ("import sys; from edgecap.runtime.cli import main; code = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'runtime imported torch'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "--model", exported["plain"], "--quiet", image],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---- issue 19, item 8: no silent garbage, no raw errors (the bundled model: no training needed) -------------

def caption_run_process(*argv, **kwargs) -> subprocess.Popen:
    """caption-run in a fresh process, as a shell runs it (no OpenCV / FFmpeg log settings inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    return subprocess.Popen([sys.executable, "-m", "edgecap.runtime.cli", *map(str, argv)], env=env, **kwargs)


def test_names_with_newlines_and_tabs_stay_on_their_line(scenes, tmp_path, capsys):
    for name in ("new\nline.png", "tab\there.png", "back\\slash.png"):
        (tmp_path / name).write_bytes((scenes / "scene0.png").read_bytes())
    (tmp_path / "gone\n.jpg").symlink_to(tmp_path / "nowhere.jpg")
    code, out, err = run(capsys, "--model", BUNDLED, "--quiet", tmp_path)
    rows = [line.split("\t") for line in out.splitlines()]
    assert [len(r) for r in rows] == [2, 2, 2] and len({text for _, text in rows}) == 1
    assert [src for src, _ in rows] == [f"{tmp_path}/back\\\\slash.png", f"{tmp_path}/new\\nline.png",
                                        f"{tmp_path}/tab\\there.png"]
    assert code == 1 and err == f"caption-run: warning: dangling symbolic link: {tmp_path}/gone\\n.jpg -> " \
                                f"{tmp_path}/nowhere.jpg (its target does not exist)\n"


def test_subfolders_by_default_top_level_on_request(scenes, tmp_path, capsys):
    (tmp_path / "album" / "2024").mkdir(parents=True)
    for name in ("top.png", "album/a.png", "album/2024/b.png"):
        (tmp_path / name).write_bytes((scenes / "scene1.png").read_bytes())
    (tmp_path / "album" / "back").symlink_to(tmp_path)
    code, out, err = run(capsys, "--model", BUNDLED, "--quiet", tmp_path)
    assert [line.split("\t")[0] for line in out.splitlines()] == \
        [str(tmp_path / n) for n in ("album/2024/b.png", "album/a.png", "top.png")]
    assert code == 1 and err.count("\n") == 1 and "symbolic link loop: " in err and "(not followed)" in err
    code, out, err = run(capsys, "--model", BUNDLED, "--quiet", "--no-recursive", tmp_path)
    assert (code, [line.split("\t")[0] for line in out.splitlines()], err) == (0, [str(tmp_path / "top.png")], "")


def test_video_without_frames_warns(tmp_path, capsys):
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (112, 112)).release()
    code, out, err = run(capsys, "--model", BUNDLED, "--quiet", empty)
    assert (code, out) == (1, "") and err == f"caption-run: warning: no frames in video {empty} (empty, or none " \
                                             "decodable)\n"


@pytest.mark.parametrize("flags, expected", [
    (["--beams", "17"], "--beams must be between 1 and 16, got 17"),
    (["--beams", "0"], "--beams must be between 1 and 16, got 0"),
    (["--max-length", "101"], "--max-length must be between 1 and 100, got 101"),
    (["--max-length", "1"], "--max-length must be more than 1, the model's fewest words before a caption may end"),
    (["--n-best", "4"], "--n-best must be between 1 and 3 (the model's default beam width; raise it with --beams)"),
    (["--beams", "2", "--n-best", "3"], "--n-best must be between 1 and 2 (--beams), got 3"),
    (["--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
    (["--every", "0"], "--every must be at least 1, got 0"),
    (["--max-fps", "0"], "--max-fps must be more than 0, got 0.0"),
])
def test_errors_name_flags_and_the_servers_limits(scenes, capsys, flags, expected):
    err = one_line_error(*run(capsys, "--model", BUNDLED, *flags, scenes / "scene0.png")[::2])
    assert expected in err and "num_" not in err and "min_length" not in err


def test_not_found_only_for_what_does_not_exist(scenes, tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.png")
    err = one_line_error(*run(capsys, "--model", BUNDLED, tmp_path / "pipe.png")[::2])
    assert err == f"caption-run: error: not an image or video file: {tmp_path / 'pipe.png'} is a FIFO (named pipe)\n"
    err = one_line_error(*run(capsys, "--model", scenes / "scene0.png", scenes)[::2])
    assert "scene0.png is a file, not a model folder" in err and "not found" not in err


def test_could_not_write_says_why(scenes, tmp_path, capsys):
    (tmp_path / "out" / "scene0.jpg").mkdir(parents=True)  # where the annotated image would go
    err = one_line_error(*run(capsys, "--model", BUNDLED, "--quiet", "--save", tmp_path / "out",
                              scenes / "scene0.png")[::2])
    assert err == f"caption-run: error: could not write image {tmp_path / 'out' / 'scene0.jpg'}: Is a directory\n"
    (tmp_path / "file").write_text("")
    err = one_line_error(*run(capsys, "--model", BUNDLED, "--save", tmp_path / "file", scenes)[::2])
    assert err == f"caption-run: error: could not create --save folder {tmp_path / 'file'}: File exists\n"


def test_native_log_lines_do_not_precede_ours(scenes, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 8)  # FFmpeg: no moov atom
    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    data = bytearray(png.tobytes())
    data[60] ^= 0xFF  # inside the first IDAT chunk: libpng's CRC error
    (tmp_path / "bad.png").write_bytes(bytes(data))
    proc = caption_run_process("--model", BUNDLED, "--quiet", scenes / "scene0.png", tmp_path / "junk.mp4",
                               tmp_path / "bad.png", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and len(out.splitlines()) == 1
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("caption-run: warning: ") for line in lines), err
    assert "cannot open video" in lines[0] and lines[1].endswith("(libpng error: IDAT: CRC error)")


def test_broken_pipe_ends_quietly(scenes):
    proc = caption_run_process("--model", BUNDLED, "--batch", 1, "--quiet", *[scenes / "scene0.png"] * 300,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(str(scenes).encode())
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=120), err) == (141, "")  # 128 + SIGPIPE, as a shell reports `... | head -1`


def test_dash_reads_one_image_from_stdin(scenes):
    image = (scenes / "scene2.png").read_bytes()
    proc = caption_run_process("--model", BUNDLED, "--quiet", "-", scenes / "scene2.png",
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(image, timeout=120)
    rows = [line.split("\t") for line in out.decode().splitlines()]
    assert proc.returncode == 0 and err == b"" and rows[0][0] == "<stdin>" and rows[0][1] == rows[1][1]
