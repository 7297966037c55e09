"""caption-eval and caption-attend."""

from __future__ import annotations

import json

import cv2
import pytest
import torch

from edgecap.runtime.attend import main as attend_main
from edgecap.runtime.vocab import Vocabulary
from edgecap.train.eval_cli import main as eval_main
from edgecap.train.eval_cli import unknown_word_share
from edgecap.train.synthetic import SyntheticSplit


@pytest.mark.parametrize("source", ["checkpoint", "folder"])
def test_caption_eval_scores_and_shuffle_check(trained, exported, tmp_path, source, capsys):
    model = trained("attention") if source == "checkpoint" else exported["attention"]
    out = tmp_path / "eval.json"
    args = ["--model", str(model), "--data", "synthetic", "--split", "test", "--limit", "40", "--beams", "1,3",
            "--json", str(out), "--markdown", str(tmp_path / "eval.md"), "--no-java"]
    assert eval_main(args) == 0
    report = json.loads(out.read_text())
    assert report["engine"] == ("torch" if source == "checkpoint" else "ort") and report["images"] == 40
    for name in ("greedy", "beam3"):
        r = report["results"][name]
        assert set(r["scores"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
        assert len(report["captions"][name]) == 40
        # captions that depend on the image score far better against their own image than a shuffled one
        assert r["scores"]["CIDEr-D"] > r["shuffled"]["CIDEr-D"] + 0.5
        assert r["stats"]["distinct_captions"] >= 10
    assert "| greedy |" in (tmp_path / "eval.md").read_text()
    assert report["reference_words_unknown"] == 0 and "warning" not in capsys.readouterr().err


def test_unknown_reference_words_are_counted():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs"])
    refs = {"x": ["A dog runs.", "Ein Hund rennt"], "y": ["a hund"]}
    assert unknown_word_share(refs, vocab) == pytest.approx(4 / 8)  # ein, hund, rennt, hund


def test_caption_eval_matches_between_checkpoint_and_folder(trained, exported, tmp_path):
    reports = []
    for model in (trained("attention"), exported["attention"]):
        out = tmp_path / f"{len(reports)}.json"
        assert eval_main(["--model", str(model), "--data", "synthetic", "--limit", "16", "--beams", "1",
                          "--json", str(out), "--no-java"]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["captions"] == reports[1]["captions"]


def test_caption_eval_compares_with_a_baseline_report(trained, exported, tmp_path, capsys):
    """int8 against fp32: per search, captions identical to the baseline's and score changes."""
    runs = {}
    for precision, beams in (("fp32", "1,3"), ("int8", "1,3")):
        runs[precision] = tmp_path / f"{precision}.json"
        args = ["--model", str(exported["attention"]), "--precision", precision, "--data", "synthetic",
                "--limit", "24", "--beams", beams, "--json", str(runs[precision]), "--no-java"]
        assert eval_main(args + (["--baseline", str(runs["fp32"])] if precision == "int8" else [])) == 0
    base, report = (json.loads(runs[p].read_text()) for p in ("fp32", "int8"))
    assert report["baseline"]["precision"] == "fp32" and list(report["baseline"]["searches"]) == ["greedy", "beam3"]
    for name, c in report["baseline"]["searches"].items():
        want = sum(report["captions"][name][k] == v for k, v in base["captions"][name].items())
        assert c["images"] == 24 and c["identical"] == want
        cider = report["results"][name]["scores"]["CIDEr-D"] - base["results"][name]["scores"]["CIDEr-D"]
        assert c["score_change"]["CIDEr-D"] == pytest.approx(cider)
    assert "captions identical" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"split": "dev"}, "scored the dev split"),
    ({"captions": {"greedy": {"images/other.png": "a cat"}}}, "captions are for other images"),
    ({"captions": {"beam5": {}}}, "no search in common"),
    (None, "not a caption-eval JSON report"),
])
def test_caption_eval_refuses_a_mismatched_baseline(exported, tmp_path, capsys, change, message):
    common = ["--model", str(exported["attention"]), "--data", "synthetic", "--split", "test", "--limit", "4",
              "--beams", "1", "--no-java"]
    baseline = tmp_path / "base.json"
    assert eval_main(common + ["--json", str(baseline)]) == 0
    report = json.loads(baseline.read_text())
    baseline.write_text("{not json" if change is None else json.dumps({**report, **change}))
    capsys.readouterr()
    assert eval_main(common + ["--baseline", str(baseline)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_caption_eval_with_coco_tokenizer_and_meteor(trained, tmp_path):
    from edgecap.train.metrics import java_available
    if not java_available():
        pytest.skip("Java is not installed: PTB tokenizer and METEOR need it")
    out = tmp_path / "e.json"
    assert eval_main(["--model", str(trained("attention")), "--data", "synthetic", "--limit", "10",
                      "--beams", "1", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())["results"]["greedy"]["scores"]
    assert json.loads(out.read_text())["tokenizer"] == "ptb" and 0 < scores["METEOR"] <= 1


def test_caption_attend(exported, tmp_path, capsys):
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), cv2.cvtColor(SyntheticSplit("test", 1).image(0), cv2.COLOR_RGB2BGR))
    model = exported["attention"]
    capsys.readouterr()  # drop the fixture's export log
    assert attend_main([str(image), "--model", str(model)]) == 0
    figure = cv2.imread(str(tmp_path / "scene.attention.png"))
    words = capsys.readouterr().out.splitlines()[0].split()
    assert figure is not None and figure.shape[1] == 5 * 160
    assert figure.shape[0] == -(-(len(words) + 1) // 5) * 184  # one tile per word plus the image
    assert attend_main([str(image), "--model", str(exported["plain"])]) == 2
    assert "attention model" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--engine", "ort"], "is a checkpoint, which runs in PyTorch (export it first: export-onnx"),
    (["--precision", "int8"], "a checkpoint runs in fp32 (export-onnx"),
    (["--device", "cuda"], "--device cuda: this PyTorch sees no CUDA device"),
])
def test_caption_eval_refuses_what_a_checkpoint_cannot_honour(tmp_path, capsys, flags, message):
    """These flags used to be ignored for a checkpoint (the report said "torch fp32", exit 0), and --device cuda
    was a traceback without CUDA: now each is one line before any work (the file is never read)."""
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this PyTorch has CUDA")
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"never read")
    assert eval_main(["--model", str(ckpt), "--data", "synthetic", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_caption_attend_names_the_beams_flag(tmp_path, capsys):
    assert attend_main([str(tmp_path / "x.jpg"), "--beams", "0"]) == 2
    assert capsys.readouterr().err == "caption-attend: error: --beams must be between 1 and 16, got 0\n"  # not num_beams


def test_caption_eval_length_penalty_is_the_searchs(exported, tmp_path, capsys, monkeypatch):
    """--length-penalty reaches the beam search (the options every search of the run gets; the search's own use of
    it is tested in test_search) and the report; unset, the model's own; not a number, one line."""
    from edgecap.train import eval_cli

    seen = []
    real = eval_cli.caption_split
    monkeypatch.setattr(eval_cli, "caption_split", lambda engine, split, pre, opts, *a, **k: (
        seen.append(opts), real(engine, split, pre, opts, *a, **k))[1])
    for flags, want in (([], 1.0), (["--length-penalty", "0.5"], 0.5)):
        out = tmp_path / f"lp{len(seen)}.json"
        assert eval_main(["--model", str(exported["attention"]), "--data", "synthetic", "--limit", "4",
                          "--beams", "1,3", *flags, "--json", str(out), "--no-java"]) == 0
        assert [o.length_penalty for o in seen[-2:]] == [want, want]
        assert json.loads(out.read_text())["length_penalty"] == want
    assert eval_main(["--model", str(exported["attention"]), "--data", "synthetic", "--length-penalty", "nan"]) == 2
    assert capsys.readouterr().err.endswith("error: --length-penalty must be a finite number, got nan\n")
