"""`torch.load` of files users hand us: weights only, never pickled code, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgecap.runtime.errors import ModelError


def load_torch_file(path: str | Path, what: str) -> Any:
    """torch.load(weights_only=True) of a file a user names: never runs pickled code; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = "holds objects other than weights" if "Unsupported global" in str(e) else type(e).__name__
        raise ModelError(f"{path} is not a readable {what} (truncated or corrupt?): {reason}") from None
