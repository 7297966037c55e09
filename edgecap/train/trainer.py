"""Training of either decoder by cross-entropy or self-critical sequence training (`--objective`), with dev CIDEr-D
model selection and early stopping, resume and DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from edgecap.runtime.console import choice_error
from edgecap.runtime.errors import DataError, ModelError
from edgecap.runtime.files import atomic_write
from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.search import SearchOptions
from edgecap.runtime.vocab import Vocabulary

from .checkpoint import checkpoint_model_config, load_checkpoint, save_checkpoint
from .data import Head, open_splits
from .encoders import encoder_spec
from .engine import TorchEngine
from .evaluate import caption_split, dev_scores
from .features import cached_features
from .model import CaptionModel, Encoder, ModelConfig
from .objectives import OBJECTIVES, make_objective

SELECT = {"cider": "dev_cider", "bleu4": "dev_bleu4"}  # --select -> the log record's key
LOG = "log.jsonl"  # one JSON record per finished epoch, in the run folder
ARCHITECTURE = ("decoder", "encoder", "finetune_blocks", "embed_dim", "hidden_dim", "attention_dim")
# what `caption-train --init CKPT` takes from CKPT's settings unless typed: its data and its network
INIT_SETTINGS = ("data", "layout", "on_missing", "model", "image_size", "min_freq", "max_len", "seed", "train_limit",
                 "synthetic_train", "synthetic_dev", "dev_limit", "cache_dir", "threads")
DEFAULT_LR = {("cross-entropy", "adam"): 1e-3, ("cross-entropy", "sgd"): 0.1, ("scst", "adam"): 5e-5,
              ("scst", "sgd"): 5e-3}


@dataclass
class TrainConfig:
    data: str = "synthetic"
    layout: str | None = None
    on_missing: str = "skip"           # skip (counted in the data line) | error: listed images whose file is missing
    output: str = "runs/exp"
    objective: str = "cross-entropy"   # cross-entropy | scst (self-critical, from an --init checkpoint)
    init: str | None = None            # start from this checkpoint's weights (same network and vocabulary)
    samples: int = 5                   # scst: captions sampled per image (the baseline is the others' mean)
    model: ModelConfig = field(default_factory=ModelConfig)
    image_size: int | None = None      # input side for the preprocessing spec (default: the encoder's)
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"            # adam | sgd (with momentum)
    lr: float | None = None            # default: 1e-3 adam, 0.1 sgd (scst: 5e-5 adam, 5e-3 sgd)
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    schedule: str = "cosine"           # cosine | step | constant
    att_reg: float = 1.0               # doubly stochastic attention regulariser weight
    min_freq: int = 5
    max_len: int = 30
    select: str = "cider"              # dev score that picks best.pt and stops early: cider (CIDEr-D) | bleu4
    patience: int = 5                  # epochs without a better dev score before stopping
    dev_limit: int = 1000
    cache_features: bool | None = None  # default: when the encoder is frozen
    cache_dir: str | None = None       # default: OUTPUT/cache; runs may share one (files are keyed by content)
    augment: bool = False
    synthetic_train: int = 4000
    synthetic_dev: int = 200
    train_limit: int | None = None     # train on the first N training images only
    seed: int = 0
    device: str = "auto"
    amp: bool = True                   # autocast on CUDA
    workers: int = 0
    threads: int | None = None         # PyTorch threads (1 is fastest on a busy 2-core CPU)
    force: bool = False                # a new run may replace the run already in `output`

    def __post_init__(self) -> None:
        """Fill in the data-dependent defaults; bad settings fail here, before any data is read."""
        checks = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "step", "constant"),
                  "on_missing": ("error", "skip"), "select": tuple(SELECT), "objective": OBJECTIVES}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise choice_error(name, getattr(self, name), allowed)
        encoder = self.model.encoder or ("tiny" if self.data == "synthetic" else "efficientnet-lite0")
        spec = encoder_spec(encoder)
        self.model = dataclasses.replace(self.model, encoder=encoder,
                                         encoder_weights=self.model.encoder_weights or spec.default_weights)
        if self.image_size is None:
            self.image_size = spec.preprocessing.size
        spec.check_size(encoder, self.image_size)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.objective == "scst" and not self.init:
            raise ValueError("--objective scst starts from a cross-entropy checkpoint of the same model: "
                             "pass --init RUN/best.pt")
        if self.samples < 2:
            raise ValueError(f"--samples must be at least 2 (each sample's baseline is the others' mean), "
                             f"got {self.samples}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.objective, self.optimizer]
        # recorded absolute, so that a resume from another working directory reads and writes the same places
        self.output = str(Path(self.output).resolve())
        if self.cache_dir is not None:
            self.cache_dir = str(Path(self.cache_dir).resolve())
        if self.init is not None:
            self.init = str(Path(self.init).resolve())
        if self.data != "synthetic" and Path(self.data).exists():
            self.data = str(Path(self.data).resolve())

    @classmethod
    def from_flat(cls, **settings: Any) -> "TrainConfig":
        """From flat settings (command-line flags; checkpoints of edgecap 0.1): ModelConfig's go into `model`."""
        names = {f.name for f in fields(ModelConfig)}
        model = settings.pop("model", None) or {}
        model = asdict(model) if isinstance(model, ModelConfig) else dict(model)
        model.update({k: settings.pop(k) for k in list(settings) if k in names})
        return cls(model=ModelConfig(**model), **settings)

    def preprocessing(self) -> Preprocessing:
        """The encoder's preprocessing at this run's image size (written into checkpoints and manifests)."""
        return dataclasses.replace(encoder_spec(self.model.encoder).preprocessing, size=self.image_size)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self.model, vocab_size=vocab_size)


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


def _encoder_mode(encoder: Encoder, cached: bool, weights: str | None) -> str:
    """How the encoder takes part, for the model line: cached, frozen (with its weights) or trained."""
    if cached:
        return "cached features"
    if any(p.requires_grad for p in encoder.body.parameters()):
        return "end to end"
    return f"frozen encoder ({weights})"


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


def _model_differences(ckpt: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """How a checkpoint's network differs from the one `cfg` describes: "decoder plain, not attention", ..."""
    mcfg, pre = checkpoint_model_config(ckpt), Preprocessing.from_dict(ckpt["preprocessing"])
    typed = cfg.model_config(mcfg.vocab_size)
    differ = [f"{f} {getattr(mcfg, f)}, not {getattr(typed, f)}" for f in ARCHITECTURE
              if getattr(mcfg, f) != getattr(typed, f)]
    return differ + ([f"image size {pre.size}, not {cfg.image_size}"] if pre.size != cfg.image_size else [])


def _check_init(init: dict[str, Any], cfg: TrainConfig, vocab: Vocabulary) -> None:
    """An --init checkpoint must hold the network this run trains, over the vocabulary of this run's data."""
    if differ := _model_differences(init, cfg):
        raise ModelError(f"--init {cfg.init}: its model has {'; '.join(differ)} (--init continues the same "
                         "encoder and decoder)")
    if init["vocab"] != vocab.to_list():
        raise ModelError(f"--init {cfg.init} has another vocabulary ({len(init['vocab'])} words) than this run's "
                         f"training data gives ({len(vocab)} words at --min-freq {cfg.min_freq}): start from a "
                         "checkpoint trained on the same data")


def _start_line(cfg: TrainConfig, init: dict[str, Any] | None) -> str:
    """What the model line says of the objective: the --init checkpoint with its dev score, the samples."""
    start = ""
    if init is not None:
        metrics = init.get("metrics", {})
        start = (f" from {cfg.init}" + (f" (epoch {metrics['epoch']}, dev CIDEr-D {metrics['dev_cider']:.3f})"
                                         if "dev_cider" in metrics else ""))
    if cfg.objective == "scst":
        return f", self-critical{start}, {cfg.samples} samples per image"
    return f", initialised{start}" if start else ""


def _append_log(out: Path, record: dict[str, Any]) -> None:
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def _log_epoch(line: str) -> int | None:
    """The epoch of a log line; None for a line cut short by a kill."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return None


def _redo_epoch_writes(out: Path, ckpt: dict[str, Any]) -> None:
    """Each epoch writes last.pt, then best.pt (when it improved), then its log record; a kill between them
    leaves a checkpoint that is ahead of best.pt and the log. Write both again from the checkpoint resumed from,
    so a kill at any moment loses at most the unfinished epoch (log records after its epoch, from a run resumed
    from an earlier checkpoint, are dropped)."""
    state = ckpt["train_state"]
    if state["best_epoch"] == state["epoch"]:
        save_checkpoint(out / "best.pt", ckpt)
    log = out / LOG
    old = log.read_text() if log.is_file() else ""
    kept = [line for line in old.splitlines() if (epoch := _log_epoch(line)) is not None and epoch < state["epoch"]]
    text = "".join(f"{line}\n" for line in [*kept, json.dumps(ckpt["metrics"])])
    if text != old:
        atomic_write(log, lambda f: f.write(text.encode()))


RUN_FILES = ("last.pt", "best.pt", LOG)


def _claim_output(out: Path, ckpt: dict[str, Any] | None, resumed: Path | None, force: bool) -> None:
    """Refuse to write into a folder that holds another run: a new run needs an empty one (or --force, which
    clears it); a resume writes only where the file it resumes is that folder's own last.pt."""
    last = out / "last.pt"
    held = [name for name in RUN_FILES if (out / name).exists()]
    if ckpt is None:
        if held and not force:
            raise ModelError(f"{out} already holds a run ({', '.join(held)}): resume it with --resume {last}, "
                             "choose another --output, or pass --force to replace it")
        for name in held:
            (out / name).unlink()
        return
    if resumed is not None and last.exists() and last.samefile(resumed):
        return
    if not held:
        return
    if not last.exists():
        raise ModelError(f"{out} holds {', '.join(held)} of a run without its last.pt; choose another --output")
    epoch = load_checkpoint(last)["train_state"]["epoch"]
    mine = ckpt["train_state"]["epoch"]
    if resumed is not None and resumed.resolve().parent == out.resolve() and epoch == mine:
        return  # the run's own best.pt of its last epoch: the same state as its last.pt
    if epoch > mine:
        raise ModelError(f"{last} is at epoch {epoch}, further along than the resumed checkpoint (epoch {mine}); "
                         f"resume {last} instead, or pass --output NEW to branch off")
    raise ModelError(f"{out} holds another run (its last.pt, epoch {epoch}, is not the file being resumed); "
                     "pass --output NEW to continue there")


def train(cfg: TrainConfig, resume: str | Path | dict | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train per `cfg`, resuming from a checkpoint (its path, or the loaded dict: then `cfg.output` must not hold a
    run) when given; -> the last epoch's log record. Never writes into another run's folder (`_claim_output`)."""
    ctx = _context(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    splits, desc = open_splits(cfg.data, layout=cfg.layout, on_missing=cfg.on_missing, seed=cfg.seed,
                               image_size=cfg.image_size,
                               synthetic_sizes={"train": cfg.synthetic_train, "dev": cfg.synthetic_dev})
    train_split, dev_split = splits["train"], splits["dev"]
    if cfg.train_limit and cfg.train_limit < len(train_split):
        desc += f" (training on the first {cfg.train_limit} of {len(train_split)} train images: --train-limit)"
        train_split = Head(train_split, cfg.train_limit)
    if len(train_split) == 0 or len(dev_split) == 0:
        raise DataError(f"need train and dev images; found {desc}")
    resumed = None if isinstance(resume, dict) or resume is None else Path(resume)
    ckpt = load_checkpoint(resumed) if resumed is not None else resume
    if ctx.main:
        _claim_output(out, ckpt, resumed, cfg.force)
    init = load_checkpoint(cfg.init) if cfg.init and ckpt is None else None  # a resume has its own weights
    if ckpt is not None:
        vocab = Vocabulary(ckpt["vocab"])
        mcfg = checkpoint_model_config(ckpt)
        pre = Preprocessing.from_dict(ckpt["preprocessing"])
        if differ := _model_differences(ckpt, cfg):
            raise ModelError(f"the checkpoint's model has {'; '.join(differ)} (--resume keeps its model settings)")
    else:
        vocab = Vocabulary.build((c for i in range(len(train_split)) for c in train_split.captions(i)),
                                 cfg.min_freq)
        if init is not None:
            _check_init(init, cfg, vocab)
        mcfg = cfg.model_config(len(vocab))
        pre = cfg.preprocessing()
    model = CaptionModel(mcfg, pre.size)
    if ckpt is not None or init is not None:
        start = ckpt if ckpt is not None else init
        model.load_state_dict(start["model"])
        weights_sha256 = start.get("encoder_weights_sha256")
    else:
        weights_sha256 = model.encoder.load_pretrained(cfg.model.encoder_weights)
    model.to(ctx.device)
    opt, sched = _make_optimizer(cfg, model.parameters())
    state = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "since_best": 0, "select": cfg.select}
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = dict(ckpt["train_state"])
        if "best_bleu4" in state:  # checkpoints from before --select chose by dev BLEU-4
            state["best_score"], state["select"] = state.pop("best_bleu4"), "bleu4"
        if state.get("select") != cfg.select:  # a best of another score cannot be compared with this one
            state.update(best_score=-1.0, since_best=0, select=cfg.select)
    if ckpt is not None and ctx.main:
        _redo_epoch_writes(out, ckpt)
    cached = model.encoder.frozen if cfg.cache_features is None else cfg.cache_features
    if cached and not model.encoder.frozen:
        raise ValueError("--cache-features needs a frozen encoder (pretrained weights, finetune_blocks 0, no "
                         "learned pool)")
    if cached and cfg.augment:
        raise ValueError("--augment changes each image, but this run trains on cached features (the default for a "
                         "frozen encoder): pass --no-cache-features to augment, or leave out --augment")
    if ctx.main:
        print(f"data: {desc}\nmodel: {mcfg.encoder} + {mcfg.decoder}, vocabulary {len(vocab)}, "
              f"{_encoder_mode(model.encoder, cached, mcfg.encoder_weights)}{_start_line(cfg, init)}, "
              f"{ctx.world} process(es) on {ctx.device}", flush=True)
    train_feats = dev_feats = None
    if cached:
        source = f"{cfg.data if cfg.data == 'synthetic' else Path(cfg.data).resolve()}, seed {cfg.seed}"
        paths = [cached_features(model.encoder, split, pre, ctx.device, ctx.main, Path(cfg.cache_dir or out / "cache"),
                                 source, limit)
                 for split, limit in ((train_split, None), (dev_split, cfg.dev_limit))]
        if ctx.world > 1:
            dist.barrier()
        train_feats, dev_feats = (torch.load(p, weights_only=True) for p in paths)
    module, dataset, collate = make_objective(cfg.objective, model, cached, train_split, vocab, pre, train_feats,
                                              att_reg=cfg.att_reg, max_len=cfg.max_len, augment=cfg.augment,
                                              samples=cfg.samples)
    net = DistributedDataParallel(module) if ctx.world > 1 else module
    unit = "images" if cfg.objective == "scst" else "pairs"
    amp = cfg.amp and ctx.device.type == "cuda"
    record: dict[str, Any] = {}
    first = state["epoch"] if state["since_best"] < cfg.patience else cfg.epochs  # a run that stopped early stays so
    if first == cfg.epochs > state["epoch"] and ctx.main:
        print(f"early stop: this run stopped at epoch {state['epoch']} (no better dev {cfg.select} for "
              f"{cfg.patience} epochs; best epoch {state['best_epoch']})")
    for epoch in range(first, cfg.epochs):
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
        t0, seen, totals = time.perf_counter(), 0, {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if ctx.main else True, leave=False)
        for batch in bar:
            batch = [t.to(ctx.device) for t in batch]  # inputs (images or cached regions), then the targets
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                loss, stats = net(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            opt.step()
            stats = {"loss": loss.item(), **stats}  # the batch's means
            seen += len(batch[0])
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value * len(batch[0])
            bar.set_postfix({**{name: f"{value:.3f}" for name, value in stats.items()},
                             "img_s": f"{seen * ctx.world / (time.perf_counter() - t0):.0f}"})
        sched.step()
        record = {"epoch": epoch + 1, **{name: total / seen for name, total in totals.items()},
                  "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
                  f"{unit}_per_s": round(seen * ctx.world / (time.perf_counter() - t0), 1)}
        stop = torch.zeros(1)
        if ctx.main:
            model.eval()
            hyps = caption_split(TorchEngine(model, ctx.device), dev_split, pre, SearchOptions(num_beams=1),
                                 cfg.dev_limit, dev_feats)
            record.update({f"dev_{k}": v for k, v in dev_scores(hyps, dev_split, vocab).items()})
            score = record[SELECT[cfg.select]]
            improved = score > state["best_score"]
            state = {"epoch": epoch + 1, "select": cfg.select,
                     "best_score": max(score, state["best_score"]),
                     "best_epoch": epoch + 1 if improved else state["best_epoch"],
                     "since_best": 0 if improved else state["since_best"] + 1}
            payload = {"model_config": mcfg.to_dict(), "train_config": asdict(cfg), "vocab": vocab.to_list(),
                       "preprocessing": pre.to_dict(), "model": model.state_dict(),
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "train_state": state,
                       "metrics": record, "data": desc, "encoder_weights_sha256": weights_sha256}
            save_checkpoint(out / "last.pt", payload)  # first: what a resume starts from (see _redo_epoch_writes)
            if improved:
                save_checkpoint(out / "best.pt", payload)
            _append_log(out, record)
            print(f"epoch {epoch + 1}: loss {record['loss']:.3f}, "
                  + (f"mean reward {record['reward']:.3f}, " if "reward" in record else "")
                  + f"dev CIDEr-D {record['dev_cider']:.3f}, "
                  f"BLEU-4 {record['dev_bleu4']:.3f}, exact {record['dev_exact']:.2f}, "
                  f"{record['dev_distinct']} distinct, {record['seconds']:.0f} s"
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
                print(f"early stop: no better dev {cfg.select} for {cfg.patience} epochs (best epoch {state['best_epoch']})")
            break
    if ctx.world > 1:
        dist.destroy_process_group()
    return record
