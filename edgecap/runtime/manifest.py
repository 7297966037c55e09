"""The model folder's `manifest.json`: what each graph is, how to feed it, and how to read its output.

A model folder is self-describing: file names, tensor names/dtypes/shapes, vocabulary, preprocessing and
search defaults live here (and the same metadata in each graph's `metadata_props`). Unknown keys are
rejected; every file's sha256 is checked on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ModelError
from .files import atomic_write
from .preprocess import Preprocessing
from .search import SearchOptions
from .vocab import Vocabulary

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: an optional tagger graph and the labels it scores
ROLES = ("encoder", "decoder_init", "decoder_step")
TAGGER = "tagger"  # optional role: the encoder's own classifier head over its regions -> logits per label
PRECISIONS = ("fp32", "fp16", "int8")
PREFERRED = ("fp32", "int8", "fp16")  # the default precision: the first a folder has


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strict(cls, d: Any, where: str):
    """Build dataclass `cls` from dict `d`, refusing unknown or missing keys."""
    if not isinstance(d, dict):
        raise ModelError(f"manifest: {where} must be an object")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ModelError(f"manifest: unknown key(s) {sorted(unknown)} in {where}")
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ModelError(f"manifest: missing key(s) {missing} in {where}")
    return cls(**d)


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphSpec:
    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "GraphSpec":
        g = _strict(cls, d, where)
        g.inputs = [_strict(TensorSpec, t, f"{where}.inputs") for t in g.inputs]
        g.outputs = [_strict(TensorSpec, t, f"{where}.outputs") for t in g.outputs]
        return g

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class ModelSource:
    """Where the graphs came from."""

    checkpoint: str = ""
    data: str = ""
    metrics: dict = field(default_factory=dict)   # the checkpoint's last log record
    encoder: str = ""                             # registry name of the image backbone
    encoder_weights_sha256: str | None = None     # its pretrained weights file


@dataclass
class Manifest:
    decoder: str                                  # plain | attention
    vocab: list[str]
    preprocessing: Preprocessing
    context_names: list[str]                      # per-image arrays the step reads after h, c
    graphs: dict[str, dict[str, GraphSpec]]       # precision -> role -> graph
    opset: int
    search: SearchOptions = field(default_factory=SearchOptions)  # the model's search defaults
    source: ModelSource = field(default_factory=ModelSource)
    versions: dict = field(default_factory=dict)  # torch, onnx, onnxruntime, edgecap that made it
    precision_notes: dict = field(default_factory=dict)  # precision -> how it was made and checked
    labels: list[str] = field(default_factory=list)  # the tagger's classes, in its logits' order
    format_version: int = FORMAT_VERSION

    def has_tagger(self, precision: str) -> bool:
        return TAGGER in self.graphs.get(precision, {})

    @property
    def default_precision(self) -> str:
        """fp32 where the folder has it (the reference), else int8, else fp16."""
        return next(p for p in PREFERRED if p in self.graphs)

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.vocab)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: Path) -> None:
        """Write `folder/manifest.json` atomically (a reader sees the old manifest or the new one, never half)."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        atomic_write(Path(folder) / MANIFEST, lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, folder: str | Path, check_files: bool = True) -> "Manifest":
        """Read and validate a model folder's manifest (and, by default, its graph files' hashes)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.is_dir():
            raise ModelError(f"model folder not found: {folder}")
        if not path.is_file():
            raise ModelError(f"{folder} is not an edgecap model folder (no {MANIFEST}; run export-onnx first)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path} is not valid JSON: {e}") from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelError(f"{path}: model format {version}; this edgecap reads up to {FORMAT_VERSION}")
        try:
            m = _strict(cls, raw, "manifest")
            m.graphs = {p: {r: GraphSpec.from_dict(g, f"graphs.{p}.{r}") for r, g in roles.items()}
                        for p, roles in m.graphs.items()}
            m.preprocessing = Preprocessing.from_dict(m.preprocessing)
            m.search = SearchOptions.from_dict(m.search, "the manifest's search")
            m.source = _strict(ModelSource, m.source, "source")
            m.validate(folder if check_files else None)
        except ValueError as e:
            raise ModelError(f"{path}: {e}") from None
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise ModelError(f"{path} is malformed: {type(e).__name__}: {e}") from None
        return m

    def validate(self, folder: Path | None) -> None:
        """Cross-check vocabulary, preprocessing and graphs; with a folder, also files and hashes."""
        try:
            vocab = self.vocabulary
        except ValueError as e:
            raise ModelError(f"manifest: {e}") from None
        if self.decoder not in ("plain", "attention"):
            raise ModelError(f"manifest: unknown decoder {self.decoder!r}")
        if not self.graphs:
            raise ModelError("manifest: no graphs")
        for precision, roles in self.graphs.items():
            if precision not in PRECISIONS or set(roles) - {TAGGER} != set(ROLES):
                raise ModelError(f"manifest: precision {precision!r} must have graphs {ROLES} (and may have "
                                 f"{TAGGER!r})")
            if TAGGER in roles:
                logits = roles[TAGGER].outputs[0].shape[-1]
                if logits != len(self.labels):
                    raise ModelError(f"manifest: {len(self.labels)} labels but the {precision} tagger graph "
                                     f"outputs {logits} scores")
            step = roles["decoder_step"]
            logprobs = next((t for t in step.outputs if t.name == "logprobs"), None)
            if logprobs is None or logprobs.shape[-1] != len(vocab):
                raise ModelError(f"manifest: vocabulary has {len(vocab)} words but the {precision} step graph "
                                 f"outputs {None if logprobs is None else logprobs.shape[-1]}")
            if step.input_names() != ["word", "h", "c", *self.context_names]:
                raise ModelError(f"manifest: {precision} step inputs {step.input_names()} do not match "
                                 f"['word', 'h', 'c', *{self.context_names}]")
            if folder is None:
                continue
            for role, g in roles.items():
                f = folder / g.file
                if not f.is_file():
                    raise ModelError(f"model folder {folder} lacks {g.file} ({precision} {role})")
                if sha256(f) != g.sha256:
                    raise ModelError(f"{f} does not match its manifest hash (modified or truncated)")
