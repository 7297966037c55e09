"""The tagger graph: the encoder's own ImageNet classifier head over the regions the captioner already computes.

EfficientNet-Lite weights carry a 1,000-class head that captioning does not use. Exported as a small graph over
the encoder's regions (head conv, pooling, classifier) it gives labels beside the sentence for the cost of one
more small graph. It is only right over the features it was trained on: a model whose encoder is not the
registry's frozen pretrained backbone (other weights, fine-tuned blocks) gets no tagger, and says why.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch

import edgecap
from edgecap.runtime.engines import make_engine
from edgecap.runtime.errors import ModelError
from edgecap.runtime.manifest import FORMAT_VERSION, TAGGER, Manifest
from edgecap.runtime.tags import softmax
from edgecap.train.encoders import pretrained_head
from edgecap.train.model import Encoder

from .graphs import GraphIO, export_graph, graph_spec
from .quantize import convert_fp16, quantize_decoder_weights
from .verify import OutputCheck, check_graph

REGIONS_ATOL = 1e-3  # the folder's fp32 encoder against PyTorch's pretrained backbone (relative to the largest)
LOGITS_ATOL = 1e-4   # the tagger graph against PyTorch's head, on the same regions
# int8: weight-only on the classifier (1.28M weights) only; each image's tags stay independent of the others in
# its batch. Measured, batch 1, one run each: MatMulNBits on the region projection too (320x1280 over 49 rows) was
# slower than fp32 (1.00 against 0.68 ms, 1 thread); dynamic int8 was faster (0.17 ms) but quantizes the
# activations of the whole batch with one scale, so an image's tags changed with the images batched beside it.
VARIANTS = {"int8": functools.partial(quantize_decoder_weights, min_weights=500_000), "fp16": convert_fp16}


def add_tagger(folder: Path, manifest: Manifest, images: np.ndarray, opset: int, say) -> bool:
    """Export, check and verify the tagger for every precision of the model folder (the manifest is updated, not
    saved); False, having said why, when the model's encoder cannot be tagged."""
    source = manifest.source
    found = pretrained_head(source.encoder, source.encoder_weights_sha256) if source.encoder else None
    if found is None:
        say(f"  no tagger: the {source.encoder or 'unknown'} encoder has no pretrained classifier head in the "
            "registry for the weights it was trained with")
        return False
    head, labels = found
    backbone = Encoder(source.encoder)
    backbone.load_pretrained(backbone.spec.default_weights)
    with torch.inference_mode():
        want = backbone.eval()(torch.from_numpy(images))[0].numpy()
    reference = "fp32" if "fp32" in manifest.graphs else manifest.default_precision
    regions = make_engine("ort", folder, reference, manifest=manifest).encode(images)["regions"]
    check = OutputCheck("encoder", "regions", "real", regions.shape, float(np.abs(want - regions).max()),
                        REGIONS_ATOL * max(1.0, float(np.abs(want).max())))
    if not check.ok:
        say(f"  no tagger: the model's {reference} encoder is not the pretrained {source.encoder} (its regions "
            f"differ by {check.max_diff:.2e}; fine-tuned or quantized?)")
        return False
    fp32 = folder / f"{TAGGER}.onnx"
    spec = export_graph(GraphIO(TAGGER, head, ["regions"], ["logits"]), {"regions": torch.from_numpy(regions)},
                        fp32, opset, {"edgecap.version": edgecap.__version__})
    check_graph(fp32)
    manifest.labels = labels
    alone = dataclasses.replace(manifest, graphs={"fp32": {TAGGER: spec}})  # a session of the new graph only
    with torch.inference_mode():
        logits = head(torch.from_numpy(regions)).numpy()
    got = make_engine("ort", folder, "fp32", manifest=alone).tag(regions)
    row = OutputCheck(TAGGER, "logits", "real", got.shape, float(np.abs(logits - got).max()),
                      LOGITS_ATOL * max(1.0, float(np.abs(logits).max())))
    say(row.line())
    if not row.ok:
        raise ModelError(f"the tagger graph differs from PyTorch by {row.max_diff:.2e}")
    for precision in manifest.graphs:
        if precision == "fp32":
            manifest.graphs["fp32"][TAGGER] = spec
            continue
        out = folder / f"{TAGGER}.{precision}.onnx"
        report = VARIANTS[precision](fp32, out)
        manifest.graphs[precision][TAGGER] = graph_spec(out)
        engine = make_engine("ort", folder, precision, manifest=manifest)
        variant = engine.tag(engine.encode(images)["regions"])  # end to end: the variant's own encoder too
        top1 = int((variant.argmax(-1) == logits.argmax(-1)).sum())
        manifest.precision_notes.setdefault(precision, {})[TAGGER] = {
            "method": report.method, "bytes": report.size_bytes, "top1_identical": top1, "images": len(images)}
        say(f"  ✓ {out.name}: {report.method}; top-1 label {top1}/{len(images)} as fp32")
    if "fp32" not in manifest.graphs:
        fp32.unlink()
    top = softmax(logits).argmax(-1)
    say(f"  ✓ tagger: {len(labels)} labels; e.g. {', '.join(dict.fromkeys(labels[i] for i in top[:4]))}")
    return True


def tag_folder(folder: Path, images: list[np.ndarray], opset: int, say) -> None:
    """Add a tagger to an existing model folder in place, checked on RGB `images`: the new graphs, then the
    manifest, written atomically."""
    manifest = Manifest.load(folder)
    if not add_tagger(folder, manifest, manifest.preprocessing.batch(images), opset, say):
        raise ModelError(f"{folder}: no tagger for this model (see above)")
    manifest.format_version = FORMAT_VERSION
    manifest.save(folder)
