"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one: a temporary
file (or folder) beside the target, renamed into place; the leftovers of killed writers removed by the next
write. Used for checkpoints, training logs, feature caches, model folders and caption-batch's Parquet parts."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

STALE_AFTER_S = 24 * 3600  # a temporary file untouched this long is a leftover even if its pid runs again


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write` into a temporary file beside `path`, fsync, rename; the temporary files of writes that were
    killed are removed first (and reported on stderr)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path, lambda line: print(line, file=sys.stderr))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_prefix(path: Path) -> str:
    """`.NAME.PID-`: how the temporary files and folders that become `path` start (the pid tells a killed
    writer's leftovers from a running one's)."""
    return f".{path.name}.{os.getpid()}-"


def remove_stale_temps(path: Path, say: Callable[[str], None]) -> None:
    """Remove the temporary files and folders for `path` (named by `temp_prefix`) whose writer is gone: its
    process is no longer alive, or they were last touched over a day ago (its pid may be in use again)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[a-z0-9_]{{8}}(?:\.tmp)?")
    removed = []
    for entry in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and _stale(entry, int(match[1])):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:  # a read-only folder, or another run removed it first
                continue
            removed.append(entry.name)
    if removed:
        say(f"removed what an interrupted write of {path} left behind: {', '.join(removed)}")


def _stale(entry: Path, pid: int) -> bool:
    try:
        age = time.time() - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_AFTER_S or not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)  # signal 0 only checks
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def honour_umask(path: Path) -> None:
    """Give a file or folder made private by mkstemp/mkdtemp the mode any new file would get (umask applied),
    so a checkpoint or model folder written for a team can be read by it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
