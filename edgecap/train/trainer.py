"""Maximum-likelihood training of either decoder, with dev BLEU-4 early stopping, resume and DDP."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from edgecap.runtime.errors import DataError, ModelError
from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.search import SearchOptions
from edgecap.runtime.vocab import Vocabulary

from .checkpoint import checkpoint_model_config, load_checkpoint, save_checkpoint
from .data import CaptionPairs, Head, Split, collate, open_splits
from .engine import TorchEngine
from .evaluate import caption_split, dev_scores
from .model import CaptionModel, ModelConfig


@dataclass
class TrainConfig:
    data: str = "synthetic"
    layout: str | None = None
    on_missing: str = "error"          # error | skip: listed images whose file is missing
    output: str = "runs/exp"
    decoder: str = "attention"
    encoder: str | None = None         # default: tiny for synthetic, resnet50 otherwise
    encoder_weights: str = "none"      # imagenet | none | PATH
    finetune_blocks: int = 0
    image_size: int | None = None      # default: 112 for tiny, 224 for resnet50
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.5
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"            # adam | sgd (with momentum)
    lr: float | None = None            # default: 1e-3 adam, 0.1 sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    schedule: str = "cosine"           # cosine | step | constant
    att_reg: float = 1.0               # doubly stochastic attention regulariser weight
    min_freq: int = 5
    max_len: int = 30
    patience: int = 5                  # epochs without a better dev BLEU-4 before stopping
    dev_limit: int = 500
    cache_features: bool | None = None  # default: when the encoder is frozen
    augment: bool = False
    synthetic_train: int = 4000
    synthetic_dev: int = 200
    train_limit: int | None = None     # train on the first N training images only
    seed: int = 0
    device: str = "auto"
    amp: bool = True                   # autocast on CUDA
    workers: int = 0

    def __post_init__(self) -> None:
        checks = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "step", "constant"),
                  "on_missing": ("error", "skip")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {allowed}")
        if self.encoder is None:
            self.encoder = "tiny" if self.data == "synthetic" else "resnet50"
        if self.image_size is None:
            self.image_size = 112 if self.encoder == "tiny" else 224
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adam" else 0.1

    def model_config(self, vocab_size: int) -> ModelConfig:
        names = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in asdict(self).items() if k in names}, vocab_size=vocab_size)


@dataclass
class Context:
    """Where this process runs: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _context(device: str) -> Context:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose from auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this PyTorch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world == 1:
        return Context(device=torch.device("cuda" if cuda else "cpu"))
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return Context(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def _make_optimizer(cfg: TrainConfig, params) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    return opt, sched


@torch.inference_mode()
def _encode_split(model: CaptionModel, split: Split, pre: Preprocessing, device: torch.device,
                  limit: int | None, desc: str) -> torch.Tensor:
    """Regions of every image, float16 [N, R, D]."""
    n = len(split) if limit is None else min(limit, len(split))
    rows = []
    for lo in tqdm(range(0, n, 32), desc=desc, leave=False, disable=None):
        images = torch.from_numpy(pre.batch([split.image(i) for i in range(lo, min(lo + 32, n))]))
        rows.append(model.encoder(images.to(device))[0].half().cpu())
    return torch.cat(rows)


def cached_features(model: CaptionModel, split: Split, pre: Preprocessing, ctx: Context, cache_dir: Path,
                    limit: int | None = None) -> torch.Tensor:
    """Frozen-encoder features of a split, computed once (rank 0) and kept on disk beside the run."""
    digest = hashlib.sha1(json.dumps([split.name, len(split), limit, pre.to_dict()]).encode())
    for name, t in sorted(model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.cpu().numpy().tobytes())
    path = cache_dir / f"{split.name.replace('/', '_')}-{digest.hexdigest()[:12]}.pt"
    if ctx.main and not path.exists():
        feats = _encode_split(model, split, pre, ctx.device, limit, f"encode {split.name}")
        tmp = path.with_suffix(".tmp")
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(feats, tmp)
        os.replace(tmp, path)
    if ctx.world > 1:
        dist.barrier()
    return torch.load(path, weights_only=True)


def _loss(logits: torch.Tensor, alphas: torch.Tensor | None, targets: torch.Tensor, att_reg: float):
    """Cross-entropy over real words (+ λ·Σ_regions (1 − Σ_t α)² for attention). -> (total, ce)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=Vocabulary.pad_id)
    if alphas is None or att_reg == 0:
        return ce, ce
    mask = (targets != Vocabulary.pad_id).unsqueeze(2).to(alphas.dtype)  # [B, T, 1]
    reg = ((1.0 - (alphas * mask).sum(1)) ** 2).mean()
    return ce + att_reg * reg, ce


def train(cfg: TrainConfig, resume: str | Path | dict | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train per `cfg`, resuming from a checkpoint (its path, or the loaded dict) when given; -> the last epoch's
    log record."""
    ctx = _context(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    splits, desc = open_splits(cfg.data, layout=cfg.layout, on_missing=cfg.on_missing, seed=cfg.seed,
                               image_size=cfg.image_size,
                               synthetic_sizes={"train": cfg.synthetic_train, "dev": cfg.synthetic_dev})
    train_split, dev_split = splits["train"], splits["dev"]
    if cfg.train_limit:
        train_split = Head(train_split, cfg.train_limit)
    if len(train_split) == 0 or len(dev_split) == 0:
        raise DataError(f"need train and dev images; found {desc}")
    ckpt = resume if isinstance(resume, dict) or resume is None else load_checkpoint(resume)
    if ckpt is not None:
        vocab = Vocabulary(ckpt["vocab"])
        mcfg = checkpoint_model_config(ckpt)
        typed = cfg.model_config(len(vocab))
        if (typed.decoder, typed.encoder) != (mcfg.decoder, mcfg.encoder):
            raise ModelError(f"checkpoint holds a {mcfg.encoder}/{mcfg.decoder} model, "
                             f"not {typed.encoder}/{typed.decoder}")
    else:
        vocab = Vocabulary.build((c for i in range(len(train_split)) for c in train_split.captions(i)),
                                 cfg.min_freq)
        mcfg = cfg.model_config(len(vocab))
    model = CaptionModel(mcfg).to(ctx.device)
    pre = Preprocessing(size=cfg.image_size)
    opt, sched = _make_optimizer(cfg, model.parameters())
    state = {"epoch": 0, "best_bleu4": -1.0, "best_epoch": -1, "since_best": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = dict(ckpt["train_state"])
    cached = model.encoder.frozen if cfg.cache_features is None else cfg.cache_features
    if cached and not model.encoder.frozen:
        raise ValueError("--cache-features needs a frozen encoder (finetune_blocks 0, not the tiny encoder)")
    if ctx.main:
        print(f"data: {desc}\nmodel: {mcfg.encoder} + {mcfg.decoder}, vocabulary {len(vocab)}, "
              f"{'cached features' if cached else 'end to end'}, {ctx.world} process(es) on {ctx.device}", flush=True)
    train_feats = cached_features(model, train_split, pre, ctx, out / "cache") if cached else None
    dev_feats = cached_features(model, dev_split, pre, ctx, out / "cache", cfg.dev_limit) if cached else None
    dataset = CaptionPairs(train_split, vocab, cfg.max_len, pre, train_feats, cfg.augment)
    module = model.decoder if cached else model
    net = DistributedDataParallel(module) if ctx.world > 1 else module
    amp = cfg.amp and ctx.device.type == "cuda"
    record: dict[str, Any] = {}
    for epoch in range(state["epoch"], cfg.epochs):
        torch.manual_seed(cfg.seed * 100003 + epoch)  # same dropout/augmentation on resume
        if ctx.world > 1:
            sampler = DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        loader = DataLoader(dataset, cfg.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.workers, drop_last=len(dataset) > cfg.batch_size)
        module.train()
        if cached:
            model.encoder.eval()
        t0, seen, total_loss, total_ce = time.perf_counter(), 0, 0.0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if ctx.main else True, leave=False)
        for x, words, targets in bar:
            x, words, targets = x.to(ctx.device), words.to(ctx.device), targets.to(ctx.device)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                inputs = (x, model.encoder.pool(x)) if cached else (x,)  # cached: regions, pooled
                logits, alphas = net(*inputs, words)
                loss, ce = _loss(logits, alphas, targets, cfg.att_reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            opt.step()
            seen += len(x)
            total_loss += loss.item() * len(x)
            total_ce += ce.item() * len(x)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen * ctx.world / (time.perf_counter() - t0):.0f}")
        sched.step()
        record = {"epoch": epoch + 1, "loss": total_loss / seen, "ce": total_ce / seen,
                  "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
                  "pairs_per_s": round(seen * ctx.world / (time.perf_counter() - t0), 1)}
        stop = torch.zeros(1)
        if ctx.main:
            model.eval()
            hyps = caption_split(TorchEngine(model, ctx.device), dev_split, pre, SearchOptions(max_length=cfg.max_len),
                                 cfg.dev_limit, dev_feats)
            record.update({f"dev_{k}": v for k, v in dev_scores(hyps, dev_split, vocab).items()})
            improved = record["dev_bleu4"] > state["best_bleu4"]
            state = {"epoch": epoch + 1,
                     "best_bleu4": max(record["dev_bleu4"], state["best_bleu4"]),
                     "best_epoch": epoch + 1 if improved else state["best_epoch"],
                     "since_best": 0 if improved else state["since_best"] + 1}
            payload = {"model_config": mcfg.to_dict(), "train_config": asdict(cfg), "vocab": vocab.to_list(),
                       "preprocessing": pre.to_dict(), "model": model.state_dict(),
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "train_state": state,
                       "metrics": record, "data": desc}
            save_checkpoint(out / "last.pt", payload)
            if improved:
                save_checkpoint(out / "best.pt", payload)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"epoch {epoch + 1}: loss {record['loss']:.3f}, dev BLEU-4 {record['dev_bleu4']:.3f}, "
                  f"exact {record['dev_exact']:.2f}, {record['dev_distinct']} distinct"
                  + (" (best)" if improved else ""), flush=True)
            stop[0] = float(state["since_best"] >= cfg.patience)
        else:
            state["epoch"] = epoch + 1
        if ctx.world > 1:
            dist.broadcast(stop, 0)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        if stop.item():
            if ctx.main:
                print(f"early stop: no better dev BLEU-4 for {cfg.patience} epochs (best epoch {state['best_epoch']})")
            break
    if ctx.world > 1:
        dist.destroy_process_group()
    return record
