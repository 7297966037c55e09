"""Where caption-batch rows go, written as they arrive so that a killed run loses at most what was in flight:
a JSONL file (one row per line, flushed per batch) or a folder of Parquet parts (each written whole, then
renamed into place). Opening an output reads which paths it already has, so a rerun skips them; nothing is
created before the first row (a run that fails before it leaves no empty file)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgecap.runtime.errors import DataError
from edgecap.runtime.files import atomic_write

PART_ROWS, PART_SECONDS = 1000, 30.0  # a Parquet part is written after this many rows or seconds


def clean(row: dict) -> dict:
    """A row without empty fields, in JSON types: success rows have caption and score (and tags), failed ones an
    error."""
    return {k: plain(v) for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def plain(value):
    """A value as JSON types: the arrays of structs that Arrow hands back for a column of lists become lists of
    dicts."""
    if isinstance(value, (np.ndarray, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


class Output:
    """Rows out, each path once; `done` holds the paths already there."""

    def __init__(self) -> None:
        self.done: set[str] = set()
        self.written = self.errors = 0

    def write(self, rows: list[dict]) -> int:
        """Write the rows whose path is new; how many rows were handled."""
        fresh = [clean(r) for r in rows if r["path"] not in self.done]
        self.done.update(r["path"] for r in fresh)
        self.errors += sum("error" in r for r in fresh)
        self.written += len(fresh)
        self.append(fresh)
        return len(rows)

    def append(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what is buffered."""


class JsonlOutput(Output):
    def __init__(self, path: Path) -> None:
        super().__init__()
        if path.exists():
            self.done = self.read(path)
        self.path, self.file = path, None

    @staticmethod
    def read(path: Path) -> set[str]:
        """The paths already in the file. A last line cut short by a kill is dropped (its image is redone)."""
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            print(f"caption-batch: dropping an unfinished last line of {path} (its image is captioned again)",
                  file=sys.stderr)
            os.truncate(path, cut)
            data = data[:cut]
        done = set()
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: not a caption-batch row; choose another --output") from None
        return done

    def append(self, rows: list[dict]) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.writelines(json.dumps(r) + "\n" for r in rows)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class ParquetOutput(Output):
    def __init__(self, folder: Path) -> None:
        import pyarrow.parquet as pq

        super().__init__()
        if folder.exists() and not folder.is_dir():
            raise DataError(f"--format parquet writes a folder of parts, and {folder} is a file")
        self.folder, self.pq = folder, pq
        parts = sorted(folder.glob("part-*.parquet"))
        for part in parts:
            self.done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        self.next = len(parts)
        self.buffer: list[dict] = []
        self.since = time.monotonic()

    def append(self, rows: list[dict]) -> None:
        self.buffer += rows
        if len(self.buffer) >= PART_ROWS or time.monotonic() - self.since > PART_SECONDS:
            self.write_part()

    def close(self) -> None:
        self.write_part()

    def write_part(self) -> None:
        """Write the buffer as the next part, atomically, so parts are always whole."""
        import pyarrow as pa

        if self.buffer:
            self.folder.mkdir(parents=True, exist_ok=True)
            tag = pa.struct([("label", pa.string()), ("probability", pa.float64())])
            schema = pa.schema([("path", pa.string()), ("caption", pa.string()), ("score", pa.float64()),
                                ("error", pa.string()), ("tags", pa.list_(tag))])
            table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in self.buffer], schema)
            atomic_write(self.folder / f"part-{self.next:05d}.parquet", lambda f: self.pq.write_table(table, f))
            self.next += 1
        self.buffer, self.since = [], time.monotonic()


@contextmanager
def open_output(path: Path, fmt: str) -> Iterator[Output]:
    output = ParquetOutput(path) if fmt == "parquet" else JsonlOutput(path)
    try:
        yield output
    finally:
        output.close()
