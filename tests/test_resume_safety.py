"""A resume writes beside the checkpoint it resumes and never into another run (issue 19, item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgecap.runtime.errors import ModelError
from edgecap.train.checkpoint import load_checkpoint
from edgecap.train.cli import main as train_main
from edgecap.train.trainer import TrainConfig, train

TINY = ["--data", "synthetic", "--synthetic-train", "16", "--synthetic-dev", "4", "--batch-size", "8",
        "--min-freq", "1", "--embed-dim", "8", "--hidden-dim", "16", "--attention-dim", "8"]


def _epoch(path: Path) -> int:
    return load_checkpoint(path)["train_state"]["epoch"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resuming_a_copy_writes_beside_the_copy_from_any_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert train_main([*TINY, "--epochs", "1", "--output", "runs/exp"]) == 0  # relative, as the default is
    run = tmp_path / "here" / "runs" / "exp"
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    original = _snapshot(run)

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train_main(["--resume", str(copy / "last.pt"), "--epochs", "2"]) == 0
    assert _epoch(copy / "last.pt") == 2 and len((copy / "log.jsonl").read_text().splitlines()) == 2
    assert _snapshot(run) == original                       # the run the copy came from is untouched
    assert not (tmp_path / "elsewhere" / "runs").exists()   # nor was the recorded relative folder re-resolved
    monkeypatch.chdir(tmp_path / "here")
    assert train_main(["--resume", "runs/exp/last.pt", "--epochs", "2"]) == 0  # the run's own last.pt: fine
    assert _epoch(run / "last.pt") == 2
    capsys.readouterr()


def test_a_resume_refuses_a_folder_of_another_run(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert train_main([*TINY, "--epochs", "1", "--output", str(run)]) == 0
    shutil.copytree(run, tmp_path / "at-epoch-1")
    assert train_main(["--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    assert train_main([*TINY, "--epochs", "1", "--output", str(other)]) == 0
    capsys.readouterr()
    before = {folder: _snapshot(folder) for folder in (run, other)}

    # an older checkpoint of the run, resumed into the run: its last.pt is further along
    assert train_main(["--resume", str(tmp_path / "at-epoch-1" / "last.pt"), "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is at epoch 2, further along than the resumed checkpoint (epoch 1)" in err
    # another run's folder, not further along
    assert train_main(["--resume", str(tmp_path / "at-epoch-1" / "last.pt"), "--output", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run" in err[0]
    assert {folder: _snapshot(folder) for folder in (run, other)} == before

    # branching off into a new folder is what --output is for
    assert train_main(["--resume", str(tmp_path / "at-epoch-1" / "last.pt"), "--output", str(tmp_path / "branch"),
                       "--epochs", "2"]) == 0
    assert _epoch(tmp_path / "branch" / "last.pt") == 2


def test_a_new_run_refuses_a_folder_holding_a_run_unless_forced(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([*TINY, "--epochs", "2", "--output", str(run)]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert train_main([*TINY, "--epochs", "1", "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already holds a run" in err and "--force" in err
    assert _snapshot(run) == before
    assert train_main([*TINY, "--epochs", "1", "--output", str(run), "--force"]) == 0
    assert _epoch(run / "last.pt") == 1 and len((run / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("scores, allowed", [((0.5, 0.3), False), ((0.3, 0.5), True)])
def test_a_runs_own_best_pt_resumes_only_at_its_last_epoch(tmp_path, monkeypatch, scores, allowed):
    scripted = iter([{"cider": c, "bleu4": 0.1, "exact": 0.0, "distinct": 5} for c in scores])
    monkeypatch.setattr("edgecap.train.trainer.dev_scores", lambda *a: next(scripted))
    cfg = TrainConfig.from_flat(data="synthetic", epochs=2, synthetic_train=16, synthetic_dev=4, batch_size=8,
                                min_freq=1, embed_dim=8, hidden_dim=16, attention_dim=8, output=str(tmp_path))
    train(cfg)
    if allowed:  # best.pt is epoch 2, the same state as last.pt: nothing is lost by resuming it
        train(cfg, resume=tmp_path / "best.pt")
    else:        # best.pt is epoch 1: resuming it would overwrite epoch 2
        with pytest.raises(ModelError, match="is at epoch 2, further along than the resumed checkpoint"):
            train(cfg, resume=tmp_path / "best.pt")
