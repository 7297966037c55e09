"""Self-critical training (`caption-train --objective scst`): sampling, the mean-of-others baseline, the policy
gradient's sign, a better model than its cross-entropy start, resume after a kill, and one-line --init errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_cut_after_first_epoch

from edgecap.runtime.search import SearchOptions
from edgecap.runtime.vocab import SPECIALS, Vocabulary
from edgecap.train import trainer
from edgecap.train.checkpoint import load_checkpoint
from edgecap.train.cider import CiderD
from edgecap.train.cli import main as train_main
from edgecap.train.model import AttentionDecoder, ModelConfig, PlainDecoder
from edgecap.train.scst import Samples, SelfCritical, mean_of_others, policy_loss, sample_captions, training_reward
from edgecap.train.trainer import TrainConfig, train

DECODERS = {"plain": PlainDecoder, "attention": AttentionDecoder}


def _decoder(name: str, vocab_size: int = 12) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(decoder=name, vocab_size=vocab_size, embed_dim=8, hidden_dim=16, attention_dim=8)
    return DECODERS[name](cfg, 6).eval()


def _features(images: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    regions = torch.randn(images, 4, 6, generator=torch.Generator().manual_seed(1))  # [B, R, D]
    return regions, regions.mean(1)


def test_baseline_is_the_mean_of_the_other_samples_and_advantages_sum_to_zero():
    rewards = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    baseline = mean_of_others(rewards)
    for i in range(3):
        for j in range(5):
            others = [rewards[i, m].item() for m in range(5) if m != j]
            assert baseline[i, j].item() == pytest.approx(sum(others) / 4)
    assert (rewards - baseline).sum(1).abs().max() < 1e-6


class _Refs:
    """The part of a training split the reward reads: each image's reference captions."""

    def __init__(self, refs: list[list[str]]):
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def captions(self, i: int) -> list[str]:
        return self.refs[i]


def test_the_reward_sees_where_a_caption_ends():
    refs = _Refs([["a dog runs in the park", "a dog runs on the grass"], ["two men ride bikes", "men on bikes"],
                  ["the cat"], ["a bird in the sky"]])
    vocab = Vocabulary(list(SPECIALS) + "a dog runs in on the park grass".split())
    ids = {w: vocab.words.index(w) for w in vocab.words}
    pad, end = Vocabulary.pad_id, Vocabulary.end_id
    rows = [[ids[w] for w in "dog runs in the park".split()] + [end],     # ends where a reference ends
            [ids[w] for w in "a dog runs in the".split()] + [end],        # stops mid-phrase
            [ids[w] for w in "a dog runs in the".split()] + [pad]]        # the same words, cut by max_length
    tokens = torch.tensor(rows)
    samples = Samples(tokens, torch.zeros(tokens.shape), (tokens != pad).float())
    rewards = SelfCritical(None, True, training_reward(refs), vocab, 3, SearchOptions()).rewards(
        torch.tensor([0]), samples)[0].tolist()
    assert rewards[0] > rewards[1]  # "park <end>" is in the references, "the <end>" is not
    assert rewards[2] > rewards[1]  # a cut caption is not rewarded nor punished for an ending it lacks
    plain = CiderD({i: [c.split() for c in refs.captions(i)] for i in range(len(refs))})
    assert plain(0, "a dog runs in the".split()) > plain(0, "dog runs in the park".split())  # what it fixes


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_samples_keep_to_what_the_search_may_choose(decoder):
    torch.manual_seed(0)
    opts = SearchOptions(max_length=6, min_length=2)
    s = sample_captions(_decoder(decoder), *_features(2), 40, opts)
    assert s.tokens.shape[0] == 80 and s.tokens.shape[1] <= 6
    for row, logp, mask in zip(s.tokens.tolist(), s.logprobs, s.mask):
        n = row.index(Vocabulary.end_id) + 1 if Vocabulary.end_id in row else len(row)
        assert n > 2 and all(t > Vocabulary.unk_id for t in row[: n - 1])  # no special word, no early <end>
        assert all(t == Vocabulary.pad_id for t in row[n:]) and mask.tolist() == [1.0] * n + [0.0] * (len(row) - n)
        assert (logp[:n] < 0).all() and (logp[n:] == 0).all()
    assert len({tuple(r) for r in s.tokens.tolist()}) > 40  # sampled, not searched


def _sequence_logprobs(decoder: torch.nn.Module, regions, pooled, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log p(caption) [N] of the given samples (<end> included)."""
    words = torch.cat([torch.full_like(tokens[:, :1], Vocabulary.start_id), tokens[:, :-1]], 1)
    logits, _ = decoder(regions, pooled, words)
    logp = logits.log_softmax(-1).gather(2, tokens[:, :, None]).squeeze(2)
    return (logp * (tokens != Vocabulary.pad_id)).sum(1)


@pytest.mark.parametrize("decoder", list(DECODERS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_step_makes_the_better_sample_likelier(decoder, sign):
    """One gradient step on the policy loss raises the log-probability of the sample whose reward beats its
    baseline (and lowers it when its reward is the lowest instead)."""
    net = _decoder(decoder)
    regions, pooled = _features(1)
    torch.manual_seed(3)
    samples = sample_captions(net, regions, pooled, 4, SearchOptions())
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]]) * sign
    advantage = (rewards - mean_of_others(rewards)).flatten()
    big, small = (regions.repeat(4, 1, 1), pooled.repeat(4, 1))
    before = _sequence_logprobs(net, big, small, samples.tokens).detach()
    policy_loss(samples, advantage).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.05 * p.grad
        after = _sequence_logprobs(net, big, small, samples.tokens)
    assert torch.sign(after[0] - before[0]) == sign
    assert (advantage * (after - before)).sum() > 0


def _cross_entropy_run(encoder_run: Path, out: Path, decoder: str, scenes: int) -> tuple[dict, Path]:
    """One cross-entropy epoch of a small decoder on a frozen tiny encoder (the attention fixture's): the attention
    decoder then trains on cached features, the plain one (its pool is learned) on images."""
    settings = dict(data="synthetic", synthetic_train=scenes, synthetic_dev=50, batch_size=16, min_freq=1,
                    embed_dim=16, hidden_dim=32, attention_dim=16, decoder=decoder, encoder="tiny",
                    encoder_weights=str(encoder_run))
    train(TrainConfig.from_flat(**settings, epochs=1, output=str(out)))
    return settings, out / "best.pt"


@pytest.mark.parametrize("decoder", ["plain", "attention"])
def test_scst_raises_dev_cider_over_its_cross_entropy_start(trained, decoder, tmp_path, capsys):
    """From a weak cross-entropy start, two self-critical epochs raise dev CIDEr-D (measured: 0.020 -> 0.464 plain,
    0.015 -> 0.457 attention)."""
    settings, init = _cross_entropy_run(trained("attention"), tmp_path / "ce", decoder, 256)
    start = load_checkpoint(init)["metrics"]["dev_cider"]
    record = train(TrainConfig.from_flat(**settings, objective="scst", init=str(init), epochs=2, lr=1e-3,
                                         output=str(tmp_path / "scst")))
    out = capsys.readouterr().out
    assert "data: synthetic shapes: 256 train, 50 dev" in out
    assert f"self-critical from {init} (epoch 1, dev CIDEr-D {start:.3f}), 5 samples per image" in out
    assert record["reward"] == pytest.approx(record["baseline"]) and record["images_per_s"] > 0
    assert record["dev_cider"] > start + 0.1, (record["dev_cider"], start)


@pytest.fixture
def cross_entropy_run(trained, tmp_path):
    return _cross_entropy_run(trained("attention"), tmp_path / "ce", "attention", 64)


def test_scst_resume_after_a_kill_continues_bit_identically(cross_entropy_run, tmp_path, capsys, monkeypatch):
    settings, init = cross_entropy_run
    scst = dict(settings, objective="scst", init=str(init), epochs=2, samples=3)
    shown = []

    class Bar(trainer.tqdm):  # what the progress bar shows after each batch
        def set_postfix(self, ordered_dict=None, **kwargs):
            shown.append(set(ordered_dict or {}) | set(kwargs))

    monkeypatch.setattr(trainer, "tqdm", Bar)
    train(TrainConfig.from_flat(**scst, output=str(tmp_path / "full")))
    assert "cached features, self-critical from" in capsys.readouterr().out
    assert shown and all({"loss", "reward", "baseline", "img_s"} <= keys for keys in shown)

    train_cut_after_first_epoch(TrainConfig.from_flat(**scst, output=str(tmp_path / "cut")))
    assert train_main(["--resume", str(tmp_path / "cut" / "last.pt")]) == 0
    full, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("full", "cut"))
    assert full["model"].keys() == resumed["model"].keys()
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    assert not all(torch.equal(full["model"][k], v) for k, v in load_checkpoint(init)["model"].items())
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all({"reward", "baseline"} <= set(r) for r in log)
    assert resumed["train_config"]["objective"] == "scst"


def test_init_mismatches_are_one_line_errors(cross_entropy_run, tmp_path, capsys):
    _, init = cross_entropy_run
    base = ["--objective", "scst", "--init", str(init), "--epochs", "1", "--output", str(tmp_path / "scst")]
    cases = {
        "decoder attention, not plain": ["--decoder", "plain"],
        "encoder tiny, not efficientnet-lite0": ["--encoder", "efficientnet-lite0"],
        "hidden_dim 32, not 64": ["--hidden-dim", "64"],
        "another vocabulary": ["--synthetic-train", "8"],
        "--samples must be at least 2": ["--samples", "1"],
    }
    for message, flags in cases.items():
        assert train_main(base + flags) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("caption-train: error:") and message in err and "\n" not in err, err
    assert train_main(["--objective", "scst", "--output", str(tmp_path / "x")]) == 2
    assert "pass --init RUN/best.pt" in capsys.readouterr().err
    assert not (tmp_path / "scst" / "last.pt").exists()


def test_scst_step_benchmark_smoke(trained, tmp_path):
    """benchmarks/scst_step.py on the attention fixture: the parts of a step and the reward's share add up."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scst_step.py"
    cmd = [sys.executable, str(script), "--ckpt", str(trained("attention")), "--batch-size", "4", "--samples", "3",
           "--steps", "2", "--warmup", "0", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    ms = report["median_ms"]
    assert set(ms) == {"sample", "reward", "update"} and all(v > 0 for v in ms.values())
    assert 0 < report["reward_share"] < 1 and report["images_per_step"] == 4 and report["samples_per_image"] == 3
    assert "| reward |" in (tmp_path / "r.md").read_text() and "| reward |" in done.stdout
