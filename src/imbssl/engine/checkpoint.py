"""Checkpoints that survive a crash mid-write and load without unpickling arbitrary objects."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    os.replace is atomic on POSIX, so a reader sees either the old or the new file, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_safe(path: str | Path) -> Any:
    """torch.load restricted to tensors and plain containers (weights_only=True)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
