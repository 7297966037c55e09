"""Caption corpora: read the common image-caption data set layouts into one shape.

Every layout becomes a CaptionCorpus: per split ("train", "dev", "test") the images, each with its raw
captions. A data set's own split is used where it has one (Flickr8k's split files, Karpathy's JSON, COCO's
train file); elsewhere a stable hash of the image file name decides (80% train, 10% dev, 10% test; COCO's
val file: half dev, half test), so a split never changes between runs, processes or machines.
Plain Python (no torch import), so a data set can be checked where PyTorch is not installed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..runtime.console import choice_error
from ..runtime.errors import DataError

LAYOUTS = ("flickr8k", "flickr8k-csv", "flickr30k", "coco", "karpathy", "csv", "jsonl")
SPLITS = ("train", "dev", "test")
ON_MISSING = ("error", "skip")

# Files that identify a folder's layout, in detection order: the first layout with a file wins, and
# within a layout earlier files are preferred (so Karpathy beats COCO, Flickr8k.token.txt beats captions.txt).
_MARKERS = {
    "karpathy": ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json"),
    "coco": tuple(f"annotations/captions_{s}{y}.json" for y in (2014, 2017) for s in ("train", "val")),
    "flickr8k": ("Flickr8k.token.txt",),
    "flickr8k-csv": ("captions.txt",),
    "flickr30k": ("results_20130124.token", "results.csv"),
}
_FLICKR8K_DIRS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")
_FLICKR30K_DIRS = ("flickr30k-images", "images")
_KARPATHY_DIRS = (*_FLICKR8K_DIRS, "flickr30k-images")
_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
_PLAIN_SPLITS = {"train": "train", "dev": "dev", "val": "dev", "test": "test"}
# Kaggle's Flickr30k results.csv row `image| number| comment`; one real row lacks the second pipe.
_PIPE_ROW = re.compile(r"([^|]+)\|\s*\d+\s*[|\s](.*)")

_Row = tuple[Path, str, str]  # (image, caption, split); split "" = named by no official split file
_Pairs = Iterable[tuple[str, str]]  # (image file name, caption)


@dataclass
class ImageCaptions:
    """One image (absolute path) and its raw captions, in file order."""

    image: Path
    captions: list[str]


@dataclass
class CaptionCorpus:
    """A loaded data set: captioned images per split, and what was left out."""

    layout: str
    root: Path  # the folder given, or the folder of the file given
    splits: dict[str, list[ImageCaptions]]  # exactly "train", "dev", "test"
    missing: list[Path]  # listed images whose file does not exist (skipped)
    unsplit: list[ImageCaptions] = field(default_factory=list)  # captioned, but in no official split file

    def summary(self) -> str:
        """One line: layout, images/captions per split, images outside the split, missing images."""
        parts = [f"{s} {len(items)} images/{sum(len(i.captions) for i in items)} captions"
                 for s, items in self.splits.items()]
        outside = f"; {len(self.unsplit)} images outside the official split" if self.unsplit else ""
        return (f"{self.layout} at {self.root}: {', '.join(parts)}{outside}; "
                f"{len(self.missing)} missing images skipped")


def load_corpus(path: str | Path, layout: str | None = None, on_missing: str = "error") -> CaptionCorpus:
    """Read a caption data set from a folder (layout detected) or one annotation file.

    `layout` forces a layout (one of LAYOUTS). `on_missing="error"` refuses a data set that lists image
    files which do not exist; `"skip"` drops those images and records them in `CaptionCorpus.missing`.
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    if layout is not None and layout not in LAYOUTS:
        raise DataError(str(choice_error("data set layout", layout, LAYOUTS)))
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        layout, files = _folder_files(path, layout)
        root = path
    elif path.is_file():
        layout, files, root = layout or _detect_file(path), [path], path.parent
    else:
        raise DataError(f"{path}: no such file or folder")
    return _assemble(layout, root, _READERS[layout](files), on_missing)


def _folder_files(root: Path, layout: str | None) -> tuple[str, list[Path]]:
    """The layout of a folder (forced or detected) and its annotation files, preferred first."""
    if layout in ("csv", "jsonl"):
        raise DataError(f"{root}: layout {layout!r} reads one file; pass the .{layout} file itself")
    candidates = [layout] if layout else list(_MARKERS)
    for name in candidates:
        files = [root / m for m in _MARKERS[name] if (root / m).is_file()]
        if files:
            return name, files
    looked = "; ".join(f"{n}: {', '.join(_MARKERS[n])}" for n in candidates)
    entries = sorted(p.name + "/" * p.is_dir() for p in root.iterdir())
    found = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")
    raise DataError(f"{root}: no caption data set found (looked for {looked}; found {found or 'nothing'})")


def _detect_file(path: Path) -> str:
    """The layout of a single annotation file, from its name, extension and (for JSON) first bytes."""
    for name, markers in _MARKERS.items():
        if any(path.match(m) for m in markers):
            return name
    if path.suffix.lower() in (".csv", ".jsonl"):
        return path.suffix.lower()[1:]
    if path.suffix.lower() == ".json":
        with path.open(encoding="utf-8", errors="replace") as f:
            return "karpathy" if '"sentences"' in f.read(65536) else "coco"
    names = ", ".join(m for ms in _MARKERS.values() for m in ms)
    raise DataError(f"{path}: cannot tell the layout of this file (expected .csv, .jsonl, a Karpathy or "
                    f"COCO .json, or one of {names}); pass a layout")


def _read_text(path: Path) -> str:
    """A whole UTF-8 text file (a byte-order mark is dropped); unreadable files raise DataError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a text file with their 1-based line numbers."""
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            yield n, line


def _load_json(path: Path, *lists: str) -> dict:
    """A JSON object file that must hold a list under each of `lists`."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in lists):
        raise DataError(f"{path.name}: expected a JSON object with the lists {', '.join(lists)}")
    return data


def _csv_records(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with a header naming at least `required` (lowercased), with line numbers.

    No row may span lines: an unterminated quote would otherwise swallow the rows after it into one caption.
    """
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        fields = [f.strip().lower() for f in next(reader, [])]
        if not set(required) <= set(fields):
            raise DataError(f"{path.name}:1: header {fields} needs the columns {', '.join(required)}")
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num
            if end > start:
                raise DataError(f"{path.name}:{start}: a quoted field runs on to line {end} (an unterminated quote?)")
            if not values:  # a blank line
                continue
            if len(values) != len(fields):
                raise DataError(f"{path.name}:{end}: expected the {len(fields)} fields {fields}")
            yield end, dict(zip(fields, values))
    except csv.Error as e:
        raise DataError(f"{path.name}:{reader.line_num}: {e}") from e


def _image_dir(root: Path, names: Iterable[str]) -> Path:
    """The first root/<name> that is a folder, else root itself."""
    return next((root / n for n in names if (root / n).is_dir()), root)


def _bucket(name: str) -> int:
    """A stable bucket 0-99 from an image's file name (SHA-256: the same on every run and machine)."""
    return int.from_bytes(hashlib.sha256(Path(name).name.encode()).digest()[:8], "big") % 100


def _hash_split(name: str) -> str:
    """The split of an image in a data set without one: 80% train, 10% dev, 10% test."""
    bucket = _bucket(name)
    return "train" if bucket < 80 else "dev" if bucket < 90 else "test"


def _official_split(root: Path) -> Callable[[str], str]:
    """Flickr8k's split files if the folder has them ("" for images they do not name), else the hash rule."""
    files = {s: root / f for s, f in _SPLIT_FILES.items() if (root / f).is_file()}
    if not files:
        return _hash_split
    split_of = {line.strip(): s for s, f in files.items() for _, line in _lines(f)}
    return lambda name: split_of.get(name, "")


def _token_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """A Flickr token file: `IMAGE.jpg#K<TAB>caption` per line."""
    for n, line in _lines(path):
        key, tab, caption = line.partition("\t")
        if not tab or "#" not in key:
            raise DataError(f"{path.name}:{n}: expected 'IMAGE.jpg#K<TAB>caption', got {line[:60]!r}")
        yield key.rsplit("#", 1)[0].strip(), caption


def _kaggle_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """Kaggle's Flickr8k captions.txt: CSV with the header `image,caption`."""
    for _, row in _csv_records(path, ("image", "caption")):
        yield row["image"].strip(), row["caption"]


def _pipe_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """Kaggle's Flickr30k results.csv: `image_name| comment_number| comment` per line."""
    for n, line in _lines(path):
        if n == 1 and line.startswith("image_name"):
            continue
        match = _PIPE_ROW.fullmatch(line)
        if not match:
            raise DataError(f"{path.name}:{n}: expected 'IMAGE| NUMBER| caption', got {line[:60]!r}")
        yield match[1].strip(), match[2]


def _flickr_rows(pairs: _Pairs, folder: Path, split_of: Callable[[str], str]) -> list[_Row]:
    """Rows for image names in one image folder."""
    return [(folder / name, caption, split_of(name)) for name, caption in pairs]


def _read_flickr8k(parse: Callable[[Path], _Pairs], files: list[Path]) -> list[_Row]:
    """Flickr8k from its token file or Kaggle's captions.txt (`parse`), split by its split files."""
    root = files[0].parent
    return _flickr_rows(parse(files[0]), _image_dir(root, _FLICKR8K_DIRS), _official_split(root))


def _read_flickr30k(files: list[Path]) -> list[_Row]:
    """Flickr30k from its token file or Kaggle's results.csv, split by the hash rule."""
    path = files[0]
    parse = _pipe_pairs if path.suffix.lower() == ".csv" else _token_pairs
    return _flickr_rows(parse(path), _image_dir(path.parent, _FLICKR30K_DIRS), _hash_split)


def _read_karpathy(files: list[Path]) -> list[_Row]:
    """Karpathy's dataset_*.json: its own split, val -> dev, restval -> train."""
    path = files[0]
    folder = _image_dir(path.parent, _KARPATHY_DIRS)
    rows: list[_Row] = []
    for i, image in enumerate(_load_json(path, "images")["images"]):
        try:
            split = _KARPATHY_SPLITS.get(image["split"])
            base = path.parent / image["filepath"] if "filepath" in image else folder
            rows += [(base / image["filename"], s["raw"], split) for s in image["sentences"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{path.name}: images[{i}] needs filename, split, sentences[].raw ({e!r})") from e
        if split is None:
            raise DataError(f"{path.name}: images[{i}] has split {image['split']!r} "
                            "(expected train, restval, val or test)")
    return rows


def _read_coco(files: list[Path]) -> list[_Row]:
    """COCO captions_*.json: a train file is train; any other is split half dev, half test by the hash."""
    rows: list[_Row] = []
    for path in files:
        data = _load_json(path, "images", "annotations")
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        folder = _image_dir(root, (path.stem.removeprefix("captions_"),))
        try:
            names = {image["id"]: image["file_name"] for image in data["images"]}
            pairs = [(names[a["image_id"]], a["caption"]) for a in data["annotations"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{path.name}: not a COCO captions file (missing or unknown {e!r})") from e
        train = "train" in path.stem
        rows += [(folder / n, c, "train" if train else "dev" if _bucket(n) < 50 else "test")
                 for n, c in pairs]
    return rows


def _plain_row(path: Path, n: int, record: dict) -> _Row:
    """Line `n` of a csv/jsonl file; a relative image path is relative to the file's folder."""
    image, caption, split = record.get("image"), record.get("caption"), record.get("split")
    if not isinstance(image, str) or not image.strip() or not isinstance(caption, str):
        raise DataError(f"{path.name}:{n}: needs an 'image' path and a 'caption' text")
    image = Path(os.path.normpath(path.parent / image.strip()))
    if split is None:
        return image, caption, _hash_split(image.name)
    if str(split).strip().lower() not in _PLAIN_SPLITS:
        raise DataError(f"{path.name}:{n}: unknown split {split!r} (use train, dev, val or test)")
    return image, caption, _PLAIN_SPLITS[str(split).strip().lower()]


def _read_csv(files: list[Path]) -> list[_Row]:
    """A CSV file with the columns image, caption and optionally split."""
    path = files[0]
    return [_plain_row(path, n, record) for n, record in _csv_records(path, ("image", "caption"))]


def _read_jsonl(files: list[Path]) -> list[_Row]:
    """A JSON-lines file of {"image", "caption", optional "split"} objects."""
    path = files[0]
    rows: list[_Row] = []
    for n, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}:{n}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise DataError(f"{path.name}:{n}: expected a JSON object, got {line[:60]!r}")
        rows.append(_plain_row(path, n, record))
    return rows


_READERS: dict[str, Callable[[list[Path]], list[_Row]]] = {
    "flickr8k": partial(_read_flickr8k, _token_pairs),
    "flickr8k-csv": partial(_read_flickr8k, _kaggle_pairs),
    "flickr30k": _read_flickr30k,
    "coco": _read_coco,
    "karpathy": _read_karpathy,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
}


def _assemble(layout: str, root: Path, rows: Iterable[_Row], on_missing: str) -> CaptionCorpus:
    """Group rows per image, check that the image files exist, and sort each split by file name."""
    grouped: dict[Path, tuple[str, list[str]]] = {}
    for image, caption, split in rows:
        if not isinstance(caption, str):
            raise DataError(f"{image.name}: caption {caption!r} is not text")
        seen, captions = grouped.setdefault(image, (split, []))
        if seen != split:
            raise DataError(f"{image.name} is listed in two splits ({seen or 'none'} and {split or 'none'})")
        if caption.strip():
            captions.append(caption.strip())
    grouped = {image: entry for image, entry in grouped.items() if entry[1]}
    missing = sorted(image for image in grouped if not image.is_file())
    if missing and on_missing == "error":
        raise DataError(f"{len(missing)} of {len(grouped)} listed images are missing (e.g. {missing[0]}); "
                        "pass --on-missing skip to continue without them")
    splits: dict[str, list[ImageCaptions]] = {s: [] for s in SPLITS}
    unsplit: list[ImageCaptions] = []
    for image in sorted(grouped.keys() - set(missing), key=lambda p: (p.name, str(p))):
        split, captions = grouped[image]
        (splits[split] if split else unsplit).append(ImageCaptions(image, captions))
    if not any(splits.values()):
        reason = ("no captions" if not grouped else f"all {len(grouped)} listed images are missing"
                  if not unsplit else f"none of its {len(unsplit)} images is in a split file")
        raise DataError(f"{root}: empty {layout} data set ({reason})")
    return CaptionCorpus(layout, root, splits, missing, unsplit)
