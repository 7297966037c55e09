#!/usr/bin/env python
"""Latency benchmark: PyTorch eager against ONNX Runtime (fp32, int8, fp16, CUDA, TensorRT) on the same images.

Every variant runs in its own freshly spawned process through the same Captioner and search code, so its
peak resident memory (the process's VmHWM) is its own. A model folder with a tagger graph is also timed with
--tags labels at beam 3 in the same rounds: the tagger's share of a caption. Without --ckpt the PyTorch
reference and the encoder's FLOPs floor are left out. Several --model LABEL=DIR compare models in one run, each
against the first. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
import timeit
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

import edgecap
from edgecap.runtime.captioner import Captioner
from edgecap.runtime.console import choice_error
from edgecap.runtime.engines import BACKENDS, make_engine
from edgecap.runtime.engines.ort import EXPORT_FLAG
from edgecap.runtime.errors import EdgecapError, ModelError
from edgecap.runtime.manifest import Manifest
from edgecap.runtime.search import SearchOptions
from edgecap.runtime.sources import read_images
from edgecap.runtime.timing import percentiles
from edgecap.train.synthetic import SyntheticSplit


def variant_table() -> dict[str, tuple[str, str, str]]:
    """name -> (engine, precision, device) for every pairing in the backend table: ENGINE-PRECISION on the
    engine's first device, ENGINE-DEVICE-PRECISION on the others."""
    out = {}
    for engine, b in BACKENDS.items():
        first = next(iter(b.devices))
        for device in b.devices:
            for precision in b.precisions:
                out[f"{engine}-{precision}" if device == first else f"{engine}-{device}-{precision}"] = (
                    engine, precision, device)
    return out


VARIANTS = variant_table()
REFERENCE = "torch-fp32"
SPEEDUP_SEARCH = SearchOptions(num_beams=3).name
# ORT's CPU provider computes fp16 graphs through fp32 casts: a GPU format, left out on the CPU by default
DEFAULT_VARIANTS = sorted((n for n, (_, precision, device) in VARIANTS.items() if (precision, device) != ("fp16", "cpu")),
                          key=lambda n: n != REFERENCE)  # the reference first
MATMUL_N = 2048


def variant_key(label: str, name: str, models: dict[str, str]) -> str:
    """A measured variant's name in the report: the variant's with one model, "LABEL VARIANT" with several."""
    return name if len(models) == 1 else f"{label} {name}"


def search_name(beams: int) -> str:
    return SearchOptions(num_beams=beams).name


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux VmHWM; unlike ru_maxrss, not inherited across spawn)."""
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def load_captioner(name: str, model: str, args: argparse.Namespace) -> Captioner:
    engine, precision, device = VARIANTS[name]
    if BACKENDS[engine].reads == "model folder":
        return Captioner.load(model, engine, precision, device, args.threads)
    manifest = Manifest.load(model)  # vocabulary, preprocessing and search defaults
    return Captioner(manifest, make_engine(engine, args.ckpt, precision, device, args.threads), manifest.search)


def search_options(captioner: Captioner, beams: int) -> SearchOptions:
    """The model folder's search defaults with `beams` beams: the same options for every variant."""
    return dataclasses.replace(captioner.manifest.search, num_beams=beams, num_return_sequences=1)


def timed_runs(captioner: Captioner, images: list[np.ndarray], batch: int,
               searches: dict[str, tuple[SearchOptions, int]], args: argparse.Namespace, bar: tqdm
               ) -> tuple[dict[str, list[dict]], dict[str, dict[int, list[int]]]]:
    """Warm up, then time rounds of batches cycling through the images, every search (options, tags) once per
    round (a slow moment of a shared machine then hits all searches alike), for at least `--repeats` rounds and
    `--min-seconds`; -> timed runs per search, tokens by image index per search."""
    runs: dict[str, list[dict]] = {name: [] for name in searches}
    tokens: dict[str, dict[int, list[int]]] = {name: {} for name in searches}
    start = time.perf_counter()
    for r in itertools.count():
        if r == args.warmup:
            start = time.perf_counter()
        if r >= args.warmup + args.repeats and time.perf_counter() - start >= args.min_seconds:
            return runs, tokens
        idx = [(r * batch + j) % len(images) for j in range(batch)]
        for name, (opts, tags) in searches.items():
            captions = captioner.caption_batch([images[i] for i in idx], opts, tags)
            if r >= args.warmup:
                runs[name].append(captions[0].timings)
            tokens[name].update(zip(idx, (c.tokens for c in captions)))
        bar.update()
    raise AssertionError("unreachable")


def measure(label: str, name: str, args: argparse.Namespace, images: list[np.ndarray]) -> dict:
    """Run in a fresh process: one model's variant's latencies, throughput, captions and peak memory."""
    startup = peak_rss_mb()  # interpreter, numpy, onnxruntime, OpenCV
    captioner = load_captioner(name, args.models[label], args)
    engine = captioner.engine
    provider = getattr(engine, "provider", None) or f"torch {engine.device}"
    searches = {search_name(k): (search_options(captioner, k), 0) for k in args.beams}
    tagged = f"{SPEEDUP_SEARCH}+tags{args.tags}"
    if args.tags and captioner.manifest.has_tagger(captioner.precision):
        searches[tagged] = (search_options(captioner, 3), args.tags)
    with tqdm(desc=variant_key(label, name, args.models), unit="round") as bar:
        runs, seen = timed_runs(captioner, images, 1, searches, args, bar)
        throughput, _ = timed_runs(captioner, images, args.batch, {"greedy": searches["greedy"]}, args, bar)
    latency, tokens = {}, {}
    for search, (opts, tags) in searches.items():
        for i in sorted(set(range(len(images))) - seen[search].keys()):  # every image for the agreement check
            seen[search][i] = captioner.caption_batch([images[i]], opts, tags)[0].tokens
        latency[search] = percentiles([t["total_ms"] for t in runs[search]])
        tokens[search] = [seen[search][i] for i in range(len(images))]
    latency["encoder"] = percentiles([t["encoder_ms"] for t in runs["greedy"]])
    latency["decoder_per_word"] = percentiles([t["decoder_per_word_ms"] for t in runs["greedy"]])
    if tagged in runs:
        latency["tagger"] = percentiles([t["tagger_ms"] for t in runs[tagged]])
    batch_ms = [t["total_ms"] for t in throughput["greedy"]]
    return {"model": label, "variant": name, "engine": VARIANTS[name][0], "precision": VARIANTS[name][1],
            "device": VARIANTS[name][2], "provider": provider, "placement": getattr(engine, "placement", None),
            "latency_ms": latency,
            "runs": {search: len(r) for search, r in runs.items()},
            "mean_words": {s: float(np.mean([len(t) + 1 for t in toks])) for s, toks in tokens.items()},  # <end> too
            "throughput": {"batch": args.batch, "images_per_s": args.batch * len(batch_ms) * 1e3 / sum(batch_ms),
                           "batch_ms": percentiles(batch_ms)},
            "startup_rss_mb": startup, "peak_rss_mb": peak_rss_mb(), "tokens": tokens}


def skip_reason(name: str, manifest: Manifest, ckpt: str | None) -> str | None:
    """Why a variant cannot run here, or None; `ckpt` is the model's checkpoint, if one was given."""
    engine, precision, device = VARIANTS[name]
    b = BACKENDS[engine]
    if b.reads == "checkpoint":
        import torch

        if ckpt is None:
            return "no --ckpt given for this model"
        return None if device == "cpu" or torch.cuda.is_available() else "PyTorch here has no CUDA device"
    if precision not in manifest.graphs:
        return f"model folder has no {precision} graphs (export with {EXPORT_FLAG[precision]})"
    provider = b.devices[device][0]
    return None if provider in ort.get_available_providers() else f"ONNX Runtime here has no {provider}"


def run_variant(label: str, name: str, args: argparse.Namespace, images: list[np.ndarray]) -> dict | str:
    """The model's variant's results from a fresh spawned process, or the one-line reason it failed."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # exits cleanly, unlike Pool
            return pool.submit(measure, label, name, args, images).result()
    except Exception as e:  # one broken variant (e.g. a TensorRT build failure) must not lose the others
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"failed: {type(e).__name__}: {first}"


def physical_floor(ckpt: dict, threads: int) -> dict:
    """Encoder FLOPs at batch 1 over this machine's fp32 matmul rate: the encoder's latency floor."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgecap.train.checkpoint import model_from_checkpoint

    torch.set_num_threads(threads)
    model, _, pre = model_from_checkpoint(ckpt)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encoder(torch.zeros(1, 3, pre.size, pre.size))
    flops = counter.get_total_flops()  # 2 per multiply-accumulate
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    seconds = min(timeit.repeat(lambda: torch.matmul(a, b), number=1, repeat=6)[1:])  # the first warms up
    rate = 2 * MATMUL_N ** 3 / seconds / 1e9
    return {"encoder_gflops": flops / 1e9, "encoder_gmacs": flops / 2e9, "matmul_gflops_per_s": rate,
            "floor_ms": flops / 1e9 / rate * 1e3, "method": f"FlopCounterMode on one batch-1 encoder forward; "
            f"best of 5 {MATMUL_N}x{MATMUL_N} fp32 torch.matmul on {threads} threads"}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())


def machine(threads: int, load_average: float) -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "load_average": load_average,
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "ort_providers": ort.get_available_providers(),
            "versions": {"python": platform.python_version(), "edgecap": edgecap.__version__, "numpy": np.__version__,
                         "onnxruntime": ort.__version__, "torch": str(torch.__version__)}}


def load_images(args: argparse.Namespace, size: int) -> tuple[list[np.ndarray], str]:
    """The first --count readable images of --images (sorted), else synthetic scenes at the model's size."""
    if args.images:
        return read_images(args.images, args.count), args.images
    split = SyntheticSplit("test", args.count, image_size=size)
    return [split.image(i) for i in range(len(split))], "synthetic test scenes"


def add_ratios(variants: dict[str, dict], models: dict[str, str]) -> None:
    """Speed-up over PyTorch eager, wider beams' cost over greedy, caption agreement with PyTorch eager (each
    against its own model's reference) and, with several models, each search's p50 over the first model's."""
    tokens = {name: v.pop("tokens") for name, v in variants.items()}
    first = next(iter(models))
    by = {(v["model"], v["variant"]): (name, v) for name, v in variants.items()}
    for name, v in variants.items():
        lat, mine = v["latency_ms"], tokens[name]
        ref_name, ref = by.get((v["model"], REFERENCE), (None, None))
        base = by.get((first, v["variant"]), (None, None))[1]
        v["vs_first_model"] = {s: lat[s]["p50"] / base["latency_ms"][s]["p50"] for s in mine
                               if s in base["latency_ms"]} if base and len(models) > 1 else None
        v["cost_vs_greedy"] = {s: lat[s]["p50"] / lat["greedy"]["p50"] for s in mine if s != "greedy"}
        if "tagger" in lat:
            tagged = next(s for s in mine if "+tags" in s)
            v["tagger_share"] = {"search": tagged, "tagger_p50_ms": lat["tagger"]["p50"],
                                 "of_end_to_end": lat["tagger"]["p50"] / lat[tagged]["p50"],
                                 "end_to_end_vs_untagged": lat[tagged]["p50"] / lat[SPEEDUP_SEARCH]["p50"]}
        v["speedup_vs_torch"] = {s: ref["latency_ms"][s]["p50"] / lat[s]["p50"] for s in mine} if ref else None
        v["agreement_with_torch"] = {s: {"identical": sum(a == b for a, b in zip(mine[s], tokens[ref_name][s])),
                                         "images": len(mine[s])} for s in mine} if ref else None


def fmt(x: float | None, digits: int = 2, unit: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def table(report: dict) -> list[str]:
    """The markdown table: one row per measured variant."""
    s = report["settings"]
    searches, widest = [search_name(k) for k in s["beams"]], search_name(max(s["beams"]))
    head = ["variant", "encoder p50", "decoder/word p50", "greedy p50", "greedy p90", "greedy p99",
            *(f"{x} p50" for x in searches[1:]), f"{widest}/greedy", f"throughput img/s (batch {s['batch']})",
            "peak RSS MB", f"speed-up vs torch ({SPEEDUP_SEARCH})", f"identical to torch ({', '.join(searches)})"]
    several = len(s["models"]) > 1
    if several:
        head.append(f"{SPEEDUP_SEARCH} p50 vs {next(iter(s['models']))}")
    rows = [head, ["---"] * len(head)]
    for name, v in report["variants"].items():
        lat, agree, speed = v["latency_ms"], v["agreement_with_torch"], v["speedup_vs_torch"] or {}
        rows.append([name, fmt(lat["encoder"]["p50"]), fmt(lat["decoder_per_word"]["p50"]),
                     *(fmt(lat["greedy"][q]) for q in ("p50", "p90", "p99")),
                     *(fmt(lat[x]["p50"]) for x in searches[1:]),
                     fmt(v["cost_vs_greedy"].get(widest), 1, "×"), fmt(v["throughput"]["images_per_s"], 1),
                     fmt(v["peak_rss_mb"], 0), fmt(speed.get(SPEEDUP_SEARCH), 2, "×"),
                     ", ".join(f"{a['identical']}/{a['images']}" for a in agree.values()) if agree else "–"])
        if several:
            rows[-1].append(fmt((v["vs_first_model"] or {}).get(SPEEDUP_SEARCH), 2, "×"))
    return ["| " + " | ".join(r) + " |" for r in rows]


def notes(report: dict) -> list[str]:
    """What the numbers mean, the physical floor, int8 vs torch, differing captions, skipped variants."""
    s, m, floor, variants = report["settings"], report["machine"], report["floor"], report["variants"]
    rounds = ", ".join(f"{n} {v['runs']['greedy']}" for n, v in variants.items())
    lines = [f"ms per image at batch 1 (end-to-end = preprocess + encoder + decoder), p50 over timed rounds of every "
             f"search in turn (at least {s['repeats']} and {s['min_seconds']:g} s: {rounds}) after {s['warmup']} "
             f"warm-up; {s['threads']} threads on {m['cores']} cores ({m['cpu']}); {s['count']} "
             f"images ({s['images']}; model input " + ", ".join(f"{label} {px} px" for label, px in s["image_size"].items())
             + "); peak RSS = the variant's own process (VmHWM)."]
    if floor:
        lines.append(f"Physical floor: encoder {floor['encoder_gflops']:.3f} GFLOPs / "
                     f"{floor['matmul_gflops_per_s']:.1f} GFLOP/s (fp32 {MATMUL_N}² matmul) = {floor['floor_ms']:.2f} "
                     "ms; encoder p50 / floor: " + ", ".join(
                         f"{n} {v['latency_ms']['encoder']['p50'] / floor['floor_ms']:.1f}×" for n, v in variants.items()))
    for name, v in variants.items():
        if share := v.get("tagger_share"):
            lines.append(f"{name} tags ({share['search']}): tagger p50 {share['tagger_p50_ms']:.3f} ms = "
                         f"{100 * share['of_end_to_end']:.1f}% of the tagged caption end to end; end to end "
                         f"{share['end_to_end_vs_untagged']:.3f}× the untagged {SPEEDUP_SEARCH} p50")
    if m["load_average"] > 0.5 * m["cores"]:
        lines.append(f"Warning: the machine was busy before the run (load average {m['load_average']:.1f} on "
                     f"{m['cores']} cores): other work distorts these numbers.")
    for name, v in variants.items():
        if v["variant"] == "ort-int8" and v["speedup_vs_torch"]:
            lines.append(f"{name} speed-up over PyTorch eager: "
                         + ", ".join(f"{x} {r:.2f}×" for x, r in v["speedup_vs_torch"].items()))
    for name, v in variants.items():
        if v["variant"] != REFERENCE and (agree := v["agreement_with_torch"]):
            differ = {x: a["images"] - a["identical"] for x, a in agree.items()}
            lines.append(f"{name}: {sum(differ.values())} of {sum(a['images'] for a in agree.values())} captions "
                         "differ from torch (" + ", ".join(f"{x} {d}" for x, d in differ.items()) + ")")
    return lines + [f"Skipped {name}: {why}" for name, why in report["skipped"].items()]


def plot(report: dict, path: str) -> None:
    """Grouped bars: end-to-end p50 per variant and search, whiskers up to p90."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names, searches = list(report["variants"]), [search_name(k) for k in report["settings"]["beams"]]
    x, width = np.arange(len(names)), 0.8 / len(searches)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names)), 4.5))
    ms = np.array([[[report["variants"][n]["latency_ms"][s][q] for n in names] for q in ("p50", "p90")]
                   for s in searches])  # [search, p50/p90, variant]
    for j, (s, (p50, p90)) in enumerate(zip(searches, ms)):
        ax.bar(x + j * width, p50, width, yerr=[np.zeros_like(p50), p90 - p50], capsize=3, label=s)
    if ms.max() / ms.min() > 20:  # ranges too far apart to read on a linear axis
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(x + width * (len(searches) - 1) / 2, names)
    ax.set_ylabel("ms per image, batch 1 (bar p50, whisker p90)")
    ax.set_title(f"edgecap end-to-end caption latency, {report['settings']['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_arg(text: str) -> tuple[str, str]:
    """--model [LABEL=]DIR -> (label, folder); the label defaults to the folder's name."""
    label, sep, folder = text.partition("=")
    return (label, folder) if sep and label else (Path(text).name or text, text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latency.py", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="checkpoint (.pt) for the PyTorch eager reference and the FLOPs (default: "
                                  "none, both left out)")
    p.add_argument("--model", action="append", required=True, type=model_arg, metavar="[LABEL=]DIR",
                   help="model folder written by export-onnx; repeat (LABEL=DIR) to compare models in one run, "
                        "each against the first (--ckpt then belongs to the first)")
    p.add_argument("--images", help="image folder or glob (default: synthetic scenes at the model's size)")
    p.add_argument("--count", type=int, default=20, help="images to use (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds at least (default 20)")
    p.add_argument("--min-seconds", type=float, default=5.0,
                   help="time rounds for at least this long per variant (default 5): fast variants run more rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    p.add_argument("--batch", type=int, default=8, help="batch for the greedy throughput (default 8)")
    p.add_argument("--beams", type=lambda t: sorted({1, *map(int, t.split(","))}), default=[1, 3, 5],
                   help="beam widths at batch 1 (default 1,3,5; greedy and beam 3 are always measured)")
    p.add_argument("--variants", type=lambda t: t.split(","), default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all but fp16 on a CPU)")
    p.add_argument("--tags", type=int, default=5,
                   help="labels per caption for the tagged beam-3 timing, where the model has a tagger (default 5; "
                        "0 leaves it out)")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    args = p.parse_args(argv)
    args.models = dict(args.model)
    if len(args.models) < len(args.model):
        p.error("--model: each model needs its own LABEL")
    if unknown := [n for n in args.variants if n not in VARIANTS]:
        p.error(str(choice_error("variant", unknown[0], list(VARIANTS))))
    if 3 not in args.beams:
        args.beams = sorted({3, *args.beams})  # the tagged timing's untagged twin
    if min(args.count, args.repeats, args.threads, args.batch, *args.beams) < 1 \
            or min(args.warmup, args.min_seconds, args.tags) < 0:
        p.error("--count, --repeats, --threads, --batch and --beams must be positive, --warmup and --min-seconds "
                "at least 0")
    return args


def write_outputs(report: dict, args: argparse.Namespace) -> str:
    """Write the requested JSON, markdown and plot; -> the markdown text."""
    text = "\n".join(table(report) + [""] + notes(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(f"`{report['command']}`\n\n{text}\n")
    if args.plot:
        plot(report, args.plot)
    return text


def main() -> None:
    from edgecap.train.checkpoint import load_checkpoint  # torch: here, never in the variants' processes

    load_average = os.getloadavg()[0]  # before this run adds its own
    args = parse_args(sys.argv[1:])
    first = next(iter(args.models))
    try:
        manifests, floor = {label: Manifest.load(folder) for label, folder in args.models.items()}, None
        if args.ckpt:
            ckpt = load_checkpoint(args.ckpt)
            if ckpt["vocab"] != manifests[first].vocab:
                raise ModelError(f"{args.ckpt} and {args.models[first]} are different models "
                                 "(their vocabularies differ)")
            floor = physical_floor(ckpt, args.threads)
        sizes = {label: m.preprocessing.size for label, m in manifests.items()}
        images = {size: load_images(args, size) for size in set(sizes.values())}
    except EdgecapError as e:
        sys.exit(f"latency.py: error: {e}")
    results = {variant_key(label, name, args.models):
               skip_reason(name, manifest, args.ckpt if label == first else None)
               or run_variant(label, name, args, images[sizes[label]][0])
               for label, manifest in manifests.items() for name in args.variants}
    skipped = {name: r for name, r in results.items() if isinstance(r, str)}
    variants = {name: r for name, r in results.items() if name not in skipped}
    if not variants:
        sys.exit("latency.py: error: no variant could run (" + "; ".join(f"{n}: {w}" for n, w in skipped.items()) + ")")
    add_ratios(variants, args.models)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    some_images, source = next(iter(images.values()))
    report = {"command": command, "machine": machine(args.threads, load_average), "floor": floor,
              "settings": {"models": args.models, "images": source, "count": len(some_images), "image_size": sizes,
                           "warmup": args.warmup, "repeats": args.repeats, "min_seconds": args.min_seconds,
                           "threads": args.threads,
                           "batch": args.batch, "beams": args.beams,
                           "search": {k: v for k, v in manifests[first].search.to_dict().items() if k != "num_beams"}},
              "variants": variants, "skipped": skipped}
    print(f"{write_outputs(report, args)}\n\ncommand: {command}")


if __name__ == "__main__":
    main()
