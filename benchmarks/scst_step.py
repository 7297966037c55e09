#!/usr/bin/env python
"""What a self-critical training step costs, part by part, and the CIDEr-D reward's share of it.

A step (`caption-train --objective scst`) samples K captions per image from the decoder (`sample`), scores each
against its image's training references (`reward`: the captions' words, then CIDEr-D with the document
frequencies computed once), and runs the backward pass and the optimizer step (`update`). This times the three on
the first images of the training split of a checkpoint's data set, through the frozen encoder's features, as the
trainer runs them; the first `--warmup` steps are not timed. It also times the one-time work of the reward:
n-gram vectors and document frequencies of all training references. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from edgecap.runtime.console import run_main
from edgecap.runtime.search import SearchOptions
from edgecap.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgecap.train.data import Head, open_splits
from edgecap.train.features import encode_split
from edgecap.train.scst import SelfCritical, mean_of_others, policy_loss, training_reward

PARTS = ("sample", "reward", "update")


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ckpt = load_checkpoint(args.ckpt)
    model, vocab, pre = model_from_checkpoint(ckpt)
    tc = ckpt.get("train_config", {})
    splits, desc = open_splits(args.data or tc.get("data", "synthetic"), layout=tc.get("layout"), on_missing="skip",
                               seed=tc.get("seed", 0), image_size=pre.size)
    train = splits["train"]
    t = time.perf_counter()
    reward = training_reward(train)
    references_s = time.perf_counter() - t
    steps = args.warmup + args.steps
    features = encode_split(model.encoder, Head(train, steps * args.batch_size), pre, torch.device("cpu"), None,
                            "encode train").float()
    objective = SelfCritical(model, True, reward, vocab, args.samples, SearchOptions()).train()
    model.encoder.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    rewards, words = [], []
    for step in range(steps):
        lo = step * args.batch_size
        x, index = features[lo: lo + args.batch_size], torch.arange(lo, lo + args.batch_size)
        t0 = time.perf_counter()
        samples = objective.sample(x)
        t1 = time.perf_counter()
        r = objective.rewards(index, samples)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        policy_loss(samples, (r - mean_of_others(r)).flatten()).backward()
        opt.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
                times[part].append(seconds * 1e3)
            rewards.append(r.mean().item())
            words.append(samples.mask.sum().item() / len(samples.mask))
    total = sum(sum(v) for v in times.values())
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "checkpoint": str(args.ckpt), "data": desc, "encoder": model.cfg.encoder, "decoder": model.cfg.decoder,
        "hidden_dim": model.cfg.hidden_dim, "vocabulary": len(vocab), "images_per_step": args.batch_size,
        "samples_per_image": args.samples, "steps": args.steps, "threads": args.threads,
        "load_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
        "references_seconds": round(references_s, 2), "training_images": len(train),
        "median_ms": {part: round(statistics.median(v), 1) for part, v in times.items()},
        "reward_share": round(sum(times["reward"]) / total, 4),
        "mean_reward": round(statistics.mean(rewards), 4), "words_per_sample": round(statistics.mean(words), 2),
    }


def markdown(r: dict) -> str:
    ms = r["median_ms"]
    step = sum(ms.values())
    rows = "\n".join(f"| {part} | {ms[part]:.1f} | {ms[part] / step:.1%} |" for part in PARTS)
    return (f"`{r['command']}`\n\n{r['encoder']} + {r['decoder']} (hidden {r['hidden_dim']}, vocabulary "
            f"{r['vocabulary']}), {r['images_per_step']} images x {r['samples_per_image']} samples per step, "
            f"{r['words_per_sample']} words per sample, mean reward {r['mean_reward']:.3f}; {r['threads']} thread(s), "
            f"load {r['load_1min']:.1f} on {r['cpus']} CPUs; median of {r['steps']} steps.\n\n"
            f"| part | ms | share |\n|---|---|---|\n{rows}\n| step | {step:.1f} | 100% |\n\n"
            f"The reward's share of all timed steps: {r['reward_share']:.1%}. Its one-time set-up (n-gram vectors "
            f"and document frequencies of the {r['training_images']} training images' references): "
            f"{r['references_seconds']:.1f} s.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an edgecap checkpoint with a frozen encoder (e.g. RUN/best.pt)")
    p.add_argument("--data", help="its data set (default: the one it was trained on)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (caption-train's default)")
    p.add_argument("--samples", type=int, default=5, help="captions sampled per image")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (caption-train --threads)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args(argv)

    def body() -> None:
        result = measure(args)
        table = markdown(result)
        print(table)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(table)

    return run_main(body, "scst_step")


if __name__ == "__main__":
    sys.exit(main())
