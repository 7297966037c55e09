"""Checkpoint -> model folder: graphs, precision variants, manifest, and the proof that they agree."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import edgecap
from edgecap.runtime.console import choice_error
from edgecap.runtime.engine import Engine
from edgecap.runtime.engines import make_engine
from edgecap.runtime.errors import ModelError
from edgecap.runtime.files import honour_umask, remove_stale_temps, temp_prefix
from edgecap.runtime.manifest import MANIFEST, ROLES, Manifest, ModelSource
from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.search import SearchOptions
from edgecap.runtime.sources import read_images
from edgecap.train.checkpoint import load_checkpoint
from edgecap.train.data import Split, open_splits
from edgecap.train.engine import TorchEngine
from edgecap.train.metrics import bleu4

from .graphs import example_inputs, export_graph, graph_ios, graph_spec
from .quantize import convert_fp16, quantize_decoder_weights, quantize_encoder_static
from .tagger import add_tagger
from .verify import check_graph, compare_captions, compare_graphs

DEFAULT_OPSET = 17
MIN_OPSET = 11
FP32_ATOL = 1e-4


@dataclass
class ExportOptions:
    output: Path | None = None
    int8: bool = False
    calib: str | None = None          # image folder/glob for int8 calibration (default: the training split)
    calib_count: int = 64
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    verify: bool = True
    verify_images: str | None = None  # folder/glob (default: the checkpoint's test split)
    verify_count: int = 16
    force: bool = False
    drop_fp32: bool = False           # ship only the variants (fp32 still made, verified and used to make them)
    keep_fp32: tuple[str, ...] = ()   # graphs (roles) the variants share with fp32 instead of converting
    beams: int = SearchOptions.num_beams  # the manifest's search defaults
    max_length: int = SearchOptions.max_length
    tags: bool = True                 # the encoder's classifier head as a tagger graph, where it has one


def default_output(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.stem}-onnx"


def _split_images(ckpt: dict, split: str, n: int) -> list[np.ndarray]:
    """The first n readable images of a split of the data set the checkpoint was trained on."""
    tc = ckpt.get("train_config", {})
    try:
        splits, _ = open_splits(tc.get("data", "synthetic"), layout=tc.get("layout"), on_missing="skip",
                                seed=tc.get("seed", 0), image_size=ckpt["preprocessing"]["size"])
    except Exception as e:  # the training data is not on this machine
        raise ModelError(f"cannot read the checkpoint's data set for {split} images ({e}); "
                         "pass image folders with --calib / --verify-images") from None
    s: Split = splits[split]
    return [s.image(i) for i in range(min(n, len(s)))]


def export_model(ckpt_path: str | Path, opts: ExportOptions, say=print) -> Path:
    """Export, verify, and atomically publish a model folder; -> its path."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    out = Path(opts.output) if opts.output else default_output(ckpt_path)
    if out.exists() and not opts.force:
        raise ModelError(f"{out} exists; pass --force to replace it")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ModelError(f"{out} is not a model folder; --force only replaces model folders")
    if out.resolve() in ckpt_path.resolve().parents:
        raise ModelError(f"the checkpoint lies inside {out}; choose another output folder")
    if opts.drop_fp32 and not (opts.int8 or opts.fp16):
        raise ValueError("--drop-fp32 leaves no graphs: add --int8 and/or --fp16")
    for role in opts.keep_fp32:
        if role not in ROLES:
            raise choice_error("graph for --keep-fp32", role, ROLES)
    search = SearchOptions(num_beams=opts.beams, max_length=opts.max_length)  # bad defaults fail before the work
    if opts.calib_count < 1 or opts.verify_count < 1:
        raise ValueError("--calib-count and --verify-count must be at least 1")
    if not MIN_OPSET <= opts.opset <= torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET:
        raise ValueError(f"the installed exporter cannot write opset {opts.opset} "
                         f"(supported: {MIN_OPSET}-{torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET})")
    ref = TorchEngine.from_checkpoint(ckpt)
    model, vocab, pre = ref.model, ref.vocabulary, ref.preprocess
    tmp = _work_folder(out, say)
    try:
        manifest = _export_fp32(model, ckpt, ckpt_path, tmp, opts, search, say)
        needs_images = opts.verify or opts.int8 or opts.fp16 or opts.tags
        images = None if not needs_images else pre.batch(
            read_images(opts.verify_images, opts.verify_count) if opts.verify_images
            else _split_images(ckpt, "test", opts.verify_count))
        if opts.verify:
            verify_against_torch(ref, make_engine("ort", tmp, manifest=manifest), images, vocab_size=len(vocab),
                                 pre=pre, say=say, searches=verify_searches(manifest))
        if opts.fp16:
            _add_variant(manifest, tmp, "fp16", {r: convert_fp16 for r in manifest.graphs["fp32"]}, opts.keep_fp32,
                         say)
        if opts.int8:
            calib = read_images(opts.calib, opts.calib_count) if opts.calib else \
                _split_images(ckpt, "train", opts.calib_count)
            batches = [pre.batch(calib[i: i + 8]) for i in range(0, len(calib), 8)]
            makers = {"encoder": lambda a, b: quantize_encoder_static(a, b, batches, cache=tmp / "calibration.json"),
                      "decoder_init": quantize_decoder_weights, "decoder_step": quantize_decoder_weights}
            _add_variant(manifest, tmp, "int8", makers, opts.keep_fp32, say)
        for precision in [p for p in manifest.graphs if p != "fp32"]:
            manifest.precision_notes[precision].update(_agreement(manifest, tmp, precision, images, vocab, say))
        if opts.tags:
            add_tagger(tmp, manifest, images, opts.opset, say)
        if opts.drop_fp32:
            _drop_fp32(manifest, tmp, say)
        manifest.save(tmp)
        Manifest.load(tmp)  # the folder as the runtime will see it
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"model folder: {out}")
    return out


def _work_folder(out: Path, say) -> Path:
    """The hidden folder beside `out` that the model is built in (those of killed exports are removed first)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, say)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    except OSError as e:
        raise ModelError(f"cannot write the model folder {out} ({e.strerror or e}); "
                         "pass --output with a writable place") from None
    honour_umask(tmp)
    return tmp


def _export_fp32(model, ckpt: dict, ckpt_path: Path, folder: Path, opts: ExportOptions, search: SearchOptions,
                 say) -> Manifest:
    inputs = example_inputs(model)
    meta = {"edgecap.decoder": model.cfg.decoder, "edgecap.vocab_size": str(model.cfg.vocab_size),
            "edgecap.version": edgecap.__version__}
    graphs = {}
    for io in graph_ios(model):
        path = folder / f"{io.role}.onnx"
        try:
            graphs[io.role] = export_graph(io, inputs, path, opts.opset, meta)
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
            raise ModelError(f"exporting {io.role} at opset {opts.opset} failed: {str(e).splitlines()[0]}") from None
        check_graph(path)
        say(f"  ✓ {path.name}: onnx.checker (full) and shape inference passed")
    return Manifest(
        decoder=model.cfg.decoder, vocab=ckpt["vocab"], preprocessing=Preprocessing.from_dict(ckpt["preprocessing"]),
        context_names=list(model.decoder.context_names), graphs={"fp32": graphs}, opset=opts.opset,
        search=search,
        source=ModelSource(ckpt_path.name, ckpt.get("data", ""), ckpt.get("metrics", {}), model.cfg.encoder,
                           ckpt.get("encoder_weights_sha256")),
        versions={"edgecap": edgecap.__version__, "torch": str(torch.__version__), "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__},
        precision_notes={"fp32": {"made_by": f"torch.onnx.export opset {opts.opset}"}})


def verify_searches(manifest: Manifest) -> list[SearchOptions]:
    """Greedy and the model's own default search (when that is a beam search)."""
    greedy = dataclasses.replace(manifest.search, num_beams=1, num_return_sequences=1)
    return [greedy] + ([manifest.search] if manifest.search.num_beams > 1 else [])


def verify_against_torch(ref: Engine, test: Engine, images: np.ndarray, vocab_size: int, pre: Preprocessing,
                         say, searches: list[SearchOptions]) -> None:
    """Per-output report on random and real inputs, then token-identical captions; any miss raises."""
    random = np.random.default_rng(0).standard_normal((4, 3, pre.size, pre.size)).astype(np.float32)
    rows = compare_graphs(ref, test, random, "random", FP32_ATOL, vocab_size)
    rows += compare_graphs(ref, test, images, "real", FP32_ATOL, vocab_size)
    say("validation (ONNX Runtime vs PyTorch):")
    for row in rows:
        say(row.line())
    bad = [r for r in rows if not r.ok]
    if bad:
        raise ModelError(f"{len(bad)} output(s) differ beyond tolerance, e.g. {bad[0].graph}/{bad[0].output} "
                         f"by {bad[0].max_diff:.2e}")
    for opts in searches:
        want, _, same = compare_captions(ref, test, images, opts)
        say(f"  {'✓' if same == len(want) else '✗'} captions ({opts.name}): {same}/{len(want)} token-identical")
        if same != len(want):
            raise ModelError(f"{len(want) - same} {opts.name} caption(s) differ between ONNX Runtime and PyTorch")


def _add_variant(manifest: Manifest, folder: Path, precision: str, makers: dict, keep: tuple[str, ...], say) -> None:
    """Make a precision's graphs from the fp32 ones; the `keep` roles share the fp32 graph file."""
    graphs, methods = {}, {}
    for role, make in makers.items():
        src = folder / manifest.graphs["fp32"][role].file
        if role in keep:
            graphs[role] = manifest.graphs["fp32"][role]
            methods[role] = {"method": "fp32 (kept: --keep-fp32)", "bytes": src.stat().st_size,
                             "fp32_bytes": src.stat().st_size}
            say(f"  ✓ {src.name}: kept in fp32 for {precision}")
            continue
        dst = folder / f"{role}.{precision}.onnx"
        report = make(src, dst)
        graphs[role] = graph_spec(dst)
        methods[role] = {"method": report.method, "bytes": report.size_bytes, "fp32_bytes": report.fp32_size_bytes}
        say(f"  ✓ {dst.name}: {report.method}, {report.size_bytes / 1e6:.1f} MB "
            f"(fp32 {report.fp32_size_bytes / 1e6:.1f} MB)")
    manifest.graphs[precision] = graphs
    manifest.precision_notes[precision] = {"graphs": methods}


def _drop_fp32(manifest: Manifest, folder: Path, say) -> None:
    """Remove the fp32 graphs no variant shares (and the calibration cache) from a folder that ships variants."""
    dropped = manifest.graphs.pop("fp32")
    shared = {spec.file for roles in manifest.graphs.values() for spec in roles.values()}
    for spec in dropped.values():
        if spec.file not in shared:
            (folder / spec.file).unlink()
    (folder / "calibration.json").unlink(missing_ok=True)
    manifest.precision_notes["fp32"]["dropped"] = "verified against PyTorch, then left out of this folder"
    say(f"  fp32 graphs left out (--drop-fp32); the folder has {', '.join(manifest.graphs)}")


def _agreement(manifest: Manifest, folder: Path, precision: str, images: np.ndarray, vocab, say) -> dict:
    """Caption agreement and BLEU-4 of a precision against fp32 on the verification images."""
    base, test = (make_engine("ort", folder, p, manifest=manifest) for p in ("fp32", precision))
    result = {}
    for opts in verify_searches(manifest):
        name = opts.name
        want, got, same = compare_captions(base, test, images, opts)
        refs = {str(i): [vocab.decode(w) or "<empty>"] for i, w in enumerate(want)}
        hyps = {str(i): vocab.decode(g) or "<empty>" for i, g in enumerate(got)}
        result[name] = {"identical": same, "images": len(want), "bleu4_vs_fp32": round(bleu4(refs, hyps), 4)}
        say(f"  {precision} vs fp32 ({name}): {same}/{len(want)} identical captions, "
            f"BLEU-4 against fp32 {result[name]['bleu4_vs_fp32']:.3f}")
    return {"agreement": result}
