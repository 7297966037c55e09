"""Faults: kills at every write point, leftovers of killed writes, read-only places, truncated and malformed
input, image arrays of every kind, and model folders holding another model's graph."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from edgecap.export.cli import main as export_main
from edgecap.export.exporter import ExportOptions, export_model
from edgecap.runtime.captioner import Captioner, as_rgb
from edgecap.runtime.cli import main as caption_run
from edgecap.runtime.engines.ort import OrtEngine
from edgecap.runtime.errors import DataError, ModelError
from edgecap.runtime.manifest import Manifest, sha256
from edgecap.runtime.sources import open_source
from edgecap.train import trainer
from edgecap.train.checkpoint import load_checkpoint, save_checkpoint
from edgecap.train.datasets import load_corpus
from edgecap.train.synthetic import SyntheticSplit
from edgecap.train.trainer import TrainConfig, train

# A tenth of a second per epoch: the checkpoints are real, the captions they give do not matter here.
TINY = {"data": "synthetic", "synthetic_train": 16, "synthetic_dev": 4, "batch_size": 8, "min_freq": 1,
        "embed_dim": 8, "hidden_dim": 16, "attention_dim": 8, "threads": 1}


@pytest.fixture(autouse=True)
def _torch_threads():
    """TINY's `threads` sets PyTorch's for the whole process: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """decoder -> (checkpoint, model folder exported from it without verification), made on first use."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(decoder: str) -> tuple[Path, Path]:
        if decoder not in cache:
            run = tmp_path_factory.mktemp(f"tiny-{decoder}")
            train(TrainConfig.from_flat(**TINY, decoder=decoder, epochs=1, output=str(run)))
            cache[decoder] = run / "best.pt", export_model(run / "best.pt", ExportOptions(run / "model", verify=False),
                                                           say=lambda line: None)
        return cache[decoder]

    return get


# ---- 1: a kill at any write point loses at most the unfinished epoch ------------------------------------

SCORES = {1: 0.5, 2: 0.7, 3: 0.6}  # dev CIDEr-D per epoch: epochs 1 and 2 are each the best so far, 3 is not


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (atomic writes leave the old file, as for a real kill)."""


def _scripted_scores(start: int):
    """dev_scores by epoch, for a run that starts after epoch `start`."""
    epochs = itertools.count(start + 1)
    return lambda *_: {"cider": SCORES[next(epochs)], "bleu4": 0.0, "exact": 0.0, "distinct": 1}


def _kill_in_epoch_2(monkeypatch, point: str):
    """Patch the trainer so that epoch 2 is killed at `point`; -> the on_epoch_end hook for the "end" point."""
    save, append = trainer.save_checkpoint, trainer._append_log

    def save_or_die(path, payload):
        if payload["train_state"]["epoch"] == 2 and Path(path).name == point:
            raise Killed
        save(path, payload)

    def append_or_die(out, record):
        if record["epoch"] == 2 and point == "log.jsonl":
            raise Killed
        if record["epoch"] == 2 and point == "half a log line":
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record)[:20])
            raise Killed
        append(out, record)

    def end(epoch, _):
        if epoch == 2 and point == "end":
            raise Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_or_die)
    monkeypatch.setattr(trainer, "_append_log", append_or_die)
    return end


@pytest.mark.parametrize("point", ["last.pt", "best.pt", "log.jsonl", "half a log line", "end"])
def test_kill_at_each_write_then_resume_agrees(tmp_path, monkeypatch, point):
    out = tmp_path / "run"
    cfg = TrainConfig.from_flat(**TINY, decoder="plain", epochs=3, output=str(out))
    monkeypatch.setattr(trainer, "dev_scores", _scripted_scores(0))
    end = _kill_in_epoch_2(monkeypatch, point)
    with pytest.raises(Killed):
        train(cfg, on_epoch_end=end)
    monkeypatch.undo()
    start = load_checkpoint(out / "last.pt")["train_state"]["epoch"]
    monkeypatch.setattr(trainer, "dev_scores", _scripted_scores(start))
    train(cfg, resume=out / "last.pt")

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert [(r["epoch"], r["dev_cider"]) for r in log] == list(SCORES.items())
    assert last["metrics"] == log[2] and last["train_state"]["best_epoch"] == 2
    assert best["metrics"] == log[1]  # the weights of epoch 2, written with its record
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.jsonl"]


# ---- 2: what killed writes leave is removed by the next write --------------------------------------------

KILL_IN_TORCH_SAVE = """
import os, sys, torch
from edgecap.train.checkpoint import save_checkpoint
def killed(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os._exit(9)
torch.save = killed
save_checkpoint(sys.argv[1], {"model": {}})
"""

KILL_IN_EXPORT = """
import os, sys
from edgecap.export import exporter
def killed(model, ckpt, ckpt_path, folder, *rest):
    (folder / "encoder.onnx").write_bytes(b"half a graph")
    os._exit(9)
exporter._export_fp32 = killed
exporter.export_model(sys.argv[1], exporter.ExportOptions(sys.argv[2], verify=False))
"""


def _killed(script: str, *args: object) -> None:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_killed_checkpoint_write_is_cleaned_by_the_next(tmp_path, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {}})
    before = path.read_bytes()
    _killed(KILL_IN_TORCH_SAVE, path)
    [left] = _hidden(tmp_path)
    assert left.startswith(".last.pt.") and left.endswith(".tmp") and path.read_bytes() == before
    running = tempfile.mkstemp(prefix=f".last.pt.{os.getpid()}-", suffix=".tmp", dir=tmp_path)[1]  # a live writer's
    (tmp_path / ".last.pt.notes").write_text("not ours")
    capsys.readouterr()
    save_checkpoint(path, {"model": {}})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "removed" in err and left in err
    assert _hidden(tmp_path) == sorted([".last.pt.notes", Path(running).name])


def test_killed_export_is_cleaned_by_the_next(tiny, tmp_path):
    ckpt, _ = tiny("plain")
    _killed(KILL_IN_EXPORT, ckpt, tmp_path / "model")
    [left] = _hidden(tmp_path)
    assert left.startswith(".model.") and (tmp_path / left / "encoder.onnx").is_file()
    said: list[str] = []
    export_model(ckpt, ExportOptions(tmp_path / "model", verify=False), say=said.append)
    assert _hidden(tmp_path) == [] and Manifest.load(tmp_path / "model").decoder == "plain"
    assert [line for line in said if left in line and "removed" in line]


# ---- 3: a read-only place is one line naming the folder given ---------------------------------------------

def _read_only_filesystem(monkeypatch, _):
    def refuse(prefix, suffix=None, dir=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir) / f"{prefix}xxxxxxxx"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


def _read_only_folder(_, folder: Path):
    folder.chmod(0o555)


@pytest.mark.parametrize("lock", [
    pytest.param(_read_only_filesystem, id="read-only filesystem"),
    pytest.param(_read_only_folder, id="read-only folder",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders"))])
def test_export_into_a_read_only_place(tiny, tmp_path, monkeypatch, capsys, lock):
    ckpt, _ = tiny("plain")
    locked = tmp_path / "locked"
    locked.mkdir()
    lock(monkeypatch, locked)
    try:
        code = export_main([str(ckpt), "-o", str(locked / "model"), "--no-verify"])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("export-onnx: error:"), err
    assert f"model folder {locked / 'model'} " in err and "Errno" not in err and ".model." not in err


# ---- 5: a truncated video says so ------------------------------------------------------------------------

def test_truncated_video_warns(tiny, tmp_path, capsys):
    model = tiny("attention")[1]
    split = SyntheticSplit("test", 60, image_size=112)
    whole, cut = tmp_path / "whole.avi", tmp_path / "cut.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 20, (112, 112))
    for i in range(60):
        writer.write(cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))
    writer.release()
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with open_source(str(whole)) as src:
        assert [f.error for f in src] == [None] * 60
    with open_source(str(cut)) as src:
        *read, last = src
    assert 10 < len(read) < 50 and all(f.rgb is not None for f in read)
    assert last.rgb is None and f"{cut} ended after {len(read)} of the 60 frames" in last.error

    capsys.readouterr()
    code = caption_run(["--model", str(model), "--every-frame", "--every", "20", "--quiet", str(cut)])
    out, err = capsys.readouterr()
    assert code == 1 and len(out.splitlines()) == len(range(0, len(read), 20))
    assert err.count("\n") == 1 and f"{cut} ended after {len(read)} of the 60 frames" in err


# ---- 6: an unterminated quote in a captions CSV ----------------------------------------------------------

@pytest.mark.parametrize("closed_at", [31, None])  # a stray quote later closes it, or none does
def test_csv_unterminated_quote_names_its_line(tmp_path, closed_at):
    rows = [f"img{i}.jpg,a dog number {i}" for i in range(40)]
    rows[8] = 'img8.jpg,"a dog number 8'
    if closed_at is not None:
        rows[closed_at] = 'img31.jpg,a dog" with a quote'
    (tmp_path / "data.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"^data\.csv:10: a quoted field runs on to line \d+ "):
        load_corpus(tmp_path / "data.csv", on_missing="skip")


def test_csv_blank_lines_and_quoted_commas_still_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "data.csv").write_text('image,caption,split\n\na.jpg,"a dog, running",train\n\n')
    corpus = load_corpus(tmp_path / "data.csv")
    assert corpus.splits["train"][0].captions == ["a dog, running"]


# ---- 8: image arrays by the documented rule, or a DataError ----------------------------------------------

def test_image_arrays_by_the_documented_rule(tiny):
    rgb = SyntheticSplit("test", 1, image_size=112).image(0)
    grey = rgb[:, :, 1]
    alpha = np.full((*rgb.shape[:2], 1), 255, np.uint8)
    same = [rgb.astype(np.float64) / 255, rgb.astype(np.float32), rgb.astype(np.uint16) * 257,
            np.concatenate([rgb, alpha], axis=2)]
    for x in same:
        assert np.array_equal(as_rgb(x), rgb), x.dtype
    for x in (grey, grey[:, :, None], grey / 255):
        assert np.array_equal(as_rgb(x), np.repeat(grey[:, :, None], 3, axis=2))

    cap = Captioner.load(tiny("attention")[1])
    assert cap.caption(rgb.astype(np.float64) / 255).tokens == cap.caption(rgb).tokens
    nan = rgb.astype(np.float32)
    nan[0, 0, 0] = np.nan
    bad = [nan, np.full((8, 8, 3), np.inf), np.full((8, 8, 3), -0.5), np.full((8, 8, 3), 300.0),
           rgb.astype(bool), rgb.astype(np.int32), np.zeros((0, 0, 3), np.uint8), np.zeros((8, 8, 2), np.uint8),
           rgb[None], None, 3]
    for x in bad:
        with pytest.raises(DataError):
            cap.caption(x)
    with pytest.raises(DataError):
        cap.caption([])


# ---- 9, 10: precisions that do not exist, graphs of another model ----------------------------------------

def test_unknown_precision_suggests_no_flag_that_does_not_exist(tiny):
    folder = tiny("plain")[1]
    with pytest.raises(ValueError) as unknown:
        OrtEngine(folder, Manifest.load(folder), precision="fp64")
    assert "--fp64" not in str(unknown.value) and "choose from fp32, fp16, int8" in str(unknown.value)
    with pytest.raises(ModelError, match=r"has no fp16 graphs; it has fp32 \(pass --precision fp32, "
                                         r"or export with export-onnx --fp16\)"):
        OrtEngine(folder, Manifest.load(folder), precision="fp16")


@pytest.mark.parametrize("role", ["decoder_init", "decoder_step"])
def test_graph_of_another_model_is_named(tiny, tmp_path, role):
    folder = tmp_path / "model"
    shutil.copytree(tiny("plain")[1], folder)
    m = Manifest.load(folder)
    graph = folder / m.graphs["fp32"][role].file
    shutil.copy(tiny("attention")[1] / graph.name, graph)
    m.graphs["fp32"][role].sha256 = sha256(graph)  # the hash fits: only the graph's inputs/outputs tell
    m.save(folder)
    with pytest.raises(ModelError) as wrong:
        Captioner.load(folder)
    message = str(wrong.value)
    assert message.startswith(f"{graph.name} is not the graph its manifest describes") and "\n" not in message


# ---- 14: what caption-train says it trains on -----------------------------------------------------------

def test_data_line_counts_the_train_limit(tmp_path, capsys):
    train(TrainConfig.from_flat(**TINY, decoder="plain", epochs=1, train_limit=6, output=str(tmp_path)))
    assert "(training on the first 6 of 16 train images: --train-limit)" in capsys.readouterr().out
