"""caption-batch on a local Ray (2 CPUs): one row per image with caption-run's captions, a killed actor's batch
retried without duplicates, reruns that add nothing, error rows for unreadable images and decompression bombs,
Parquet output, a bad model refused before Ray starts, and SIGTERM keeping what was done for the rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from edgecap.runtime import cli as caption_run
from edgecap.runtime.captioner import Captioner
from edgecap.scale import batch as caption_batch
from conftest import black_png, write_scenes  # noqa: E402
from test_serve import bad_model  # noqa: E402

N = 200
CAPTION_BATCH = str(Path(sys.executable).parent / "caption-batch")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N synthetic scenes as JPEG files."""
    return write_scenes(tmp_path_factory.mktemp("photos"), N)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_image_once_with_caption_runs_captions_after_an_actor_dies(folder, tmp_path, monkeypatch, capsys):
    out, marker = tmp_path / "captions.jsonl", tmp_path / "actor-died"
    monkeypatch.setenv(caption_batch.FAIL_ONCE, str(marker))
    assert caption_batch.main([str(folder), "-o", str(out), "--actors", "2", "--batch-size", "16"]) == 0
    assert marker.exists()  # one actor did die in the middle of a batch
    got = rows(out)
    assert len(got) == N and len({r["path"] for r in got}) == N
    assert {r["path"] for r in got} == {str(p) for p in folder.iterdir()}

    capsys.readouterr()
    assert caption_run.main([str(folder), "--json", "--quiet", "--threads", "1"]) == 0
    expected = {(r := json.loads(line))["source"]: r["caption"] for line in capsys.readouterr().out.splitlines()}
    assert {r["path"]: r["caption"] for r in got} == expected

    monkeypatch.delenv(caption_batch.FAIL_ONCE)
    assert caption_batch.main([str(folder), "-o", str(out)]) == 0
    assert f"{N} of {N} images already in" in capsys.readouterr().err
    assert len(rows(out)) == N


def test_unreadable_images_are_error_rows_and_a_cut_line_is_redone(folder, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    listed = tmp_path / "list.txt"
    listed.write_text(f"# three good, one broken, one missing\n{folder}/scene000.jpg\n{folder}/scene001.jpg\n"
                      f"{folder}/scene002.jpg\nbroken.jpg\nmissing.jpg\n")
    out = tmp_path / "out.jsonl"
    assert caption_batch.main([str(listed), "-o", str(out), "--actors", "1"]) == 1
    errors = {Path(r["path"]).name: r["error"] for r in rows(out) if "error" in r}
    assert errors == {"broken.jpg": f"not a readable image: {tmp_path}/broken.jpg",
                      "missing.jpg": f"image not found: {tmp_path}/missing.jpg"}
    assert len(rows(out)) == 5

    out.write_text(out.read_text()[:-9])  # a kill in the middle of the last line
    capsys.readouterr()
    caption_batch.main([str(listed), "-o", str(out), "--actors", "1"])
    assert "dropping an unfinished last line" in capsys.readouterr().err
    expected = {f"{folder}/scene00{i}.jpg" for i in range(3)} | {f"{tmp_path}/{n}" for n in errors}
    assert sorted(r["path"] for r in rows(out)) == sorted(expected)


def test_parquet_parts_resume(folder, tmp_path):
    out = tmp_path / "captions.parquet"
    sources = [f"{folder}/scene01*.jpg"]
    assert caption_batch.main([*sources, "-o", str(out), "--format", "parquet"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 10 and set(table.column_names) == {"path", "caption", "score", "error", "tags"}
    leftover = out / ".part-00001.parquet.99999999-killed00.tmp"  # a part write killed by a kill -9
    leftover.write_bytes(b"PAR1 half a part")
    assert caption_batch.main([*sources, f"file://{folder}/scene020.jpg", "-o", str(out), "--format", "parquet"]) == 0
    assert max(pq.read_table(out).column("path").to_pylist()) == f"file://{folder}/scene020.jpg"
    assert pq.read_table(out).num_rows == 11
    assert not leftover.exists()


def test_tags_in_jsonl_and_parquet_rows(folder, tmp_path):
    paths = sorted(folder.glob("scene00[0-5].jpg"))
    captioner = Captioner.load(threads=1, tags=2)
    want = {str(p): captioner.caption(p).tags for p in paths}

    def tags(rows: list[dict]) -> dict[str, list[tuple[str, float]]]:
        return {r["path"]: [(t["label"], t["probability"]) for t in r["tags"]] for r in rows}

    def same(got: dict) -> bool:  # labels exactly; probabilities to the 4 places, give or take other thread counts
        return got.keys() == want.keys() and all(
            [t for t, _ in got[k]] == [t for t, _ in want[k]] and
            max(abs(p - q) for (_, p), (_, q) in zip(got[k], want[k])) <= 2e-4 for k in want)

    jsonl, parquet = tmp_path / "tags.jsonl", tmp_path / "tags.parquet"
    assert caption_batch.main([*map(str, paths), "-o", str(jsonl), "--tags", "2"]) == 0
    assert same(tags(rows(jsonl)))
    assert caption_batch.main([*map(str, paths), "-o", str(parquet), "--format", "parquet", "--tags", "2"]) == 0
    assert same(tags(pq.read_table(parquet).to_pylist()))


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--engine", "ortt"], "unknown engine 'ortt' (did you mean 'ort'?)"),
])
def test_bad_flags_and_sources_are_one_line_errors(folder, tmp_path, capsys, argv, message):
    assert caption_batch.main([str(folder), "-o", str(tmp_path / "o.jsonl"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_source_that_names_nothing_is_warned_about_and_fails_the_run(folder, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert caption_batch.main([f"{folder}/scene000.jpg", str(tmp_path / "nowhere"), "-o", str(out)]) == 1
    assert f"caption-batch: warning: no such file or folder: {tmp_path}/nowhere" in capsys.readouterr().err
    assert [r["path"] for r in rows(out)] == [f"{folder}/scene000.jpg"]


def test_no_images_is_a_one_line_error(tmp_path, capsys):
    assert caption_batch.main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no such file or folder: {tmp_path}/nowhere")


def test_a_decompression_bomb_is_an_error_row_between_captioned_images(folder, tmp_path):
    """A 40000x40000 PNG (200 kB, past OpenCV's own limit) between two good images."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, source in (("a.jpg", "scene000.jpg"), ("c.jpg", "scene001.jpg")):
        (photos / name).write_bytes((folder / source).read_bytes())
    (photos / "b.png").write_bytes(black_png(40_000, 40_000))
    out = tmp_path / "out.jsonl"
    assert caption_batch.main([str(photos), "-o", str(out), "--actors", "1"]) == 1
    got = {Path(r["path"]).name: r for r in rows(out)}
    assert sorted(got) == ["a.jpg", "b.png", "c.jpg"]
    assert "over the 100,000,000-pixel limit (--max-pixels)" in got["b.png"]["error"]
    assert got["a.jpg"]["caption"] and got["c.jpg"]["caption"]


@pytest.mark.parametrize("fmt, out", [("jsonl", "o.jsonl"), ("parquet", "o.parquet")])
def test_a_bad_model_is_one_line_and_leaves_no_output(folder, tmp_path, capsys, fmt, out):
    bad = bad_model(tmp_path / "bad")
    assert caption_batch.main([str(folder), "-o", str(tmp_path / out), "--format", fmt, "--model", str(bad)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("caption-batch: error: manifest: missing key(s) ['decoder'")
    assert not (tmp_path / out).exists()


def test_sigterm_keeps_the_rows_done_and_a_rerun_captions_the_rest(folder, tmp_path, capsys):
    """The command in its own process and Ray over 40 images, one actor, batches of 4: SIGTERM once rows arrive."""
    out, sources = tmp_path / "captions.jsonl", f"{folder}/scene0[0-3]*.jpg"
    proc = subprocess.Popen([CAPTION_BATCH, sources, "-o", str(out), "--actors", "1", "--batch-size", "4"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    done = rows(out)  # every line whole
    assert 0 < len(done) < 40
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("caption-batch: SIGTERM: stopped with ") and lines[-1].endswith("captions the rest")
    assert all(line.startswith("caption-batch: ") for line in lines), lines  # no stack dump, no Ray noise

    assert caption_batch.main([sources, "-o", str(out)]) == 0
    assert f"{len(done)} of 40 images already in" in capsys.readouterr().err
    assert sorted(r["path"] for r in rows(out)) == sorted(str(p) for p in folder.glob("scene0[0-3]*.jpg"))
