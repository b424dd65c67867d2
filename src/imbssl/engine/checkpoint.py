"""Checkpoints that survive a crash mid-write and load without unpickling arbitrary objects."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from imbssl.errors import ImbsslError


class CheckpointError(ImbsslError, RuntimeError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong with it."""


def save_atomic(obj: Any, path: str | Path, write: Callable[[Any, BinaryIO], None] = torch.save) -> Path:
    """Write ``obj`` (``write(obj, file)``, torch.save by default) to a temporary file in the same folder, fsync,
    then rename over the target.

    os.replace is atomic on POSIX, so a reader sees either the old or the new file, never half of one.
    A failed write (a full disk, an interrupt) removes the temporary file and leaves the old one as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        disk_error = _os_error_behind(err)
        if disk_error is None:
            raise
        raise OSError(disk_error.errno, f"not written: {disk_error.strerror}", str(path)) from err
    return path


def _os_error_behind(err: BaseException) -> OSError | None:
    """The OSError (a full disk, say) behind a failed save: torch.save re-raises it as a RuntimeError of its
    zip writer, with the OSError as the context."""
    if isinstance(err, OSError):
        return err
    return err.__context__ if isinstance(err, RuntimeError) and isinstance(err.__context__, OSError) else None


def load_safe(path: str | Path) -> Any:
    """torch.load restricted to tensors and plain containers (weights_only=True).

    A file that does not load raises CheckpointError naming the file; one holding other objects is
    refused, never unpickled.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        if _is_zip(path):  # a complete torch.save file whose pickle names globals outside the allow-list
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers; "
                                  f"refusing to load it") from None
        raise CheckpointError(f"{path} is not a torch checkpoint (corrupt)") from None
    except Exception as err:  # truncated: zip and EOF errors
        first_sentence = str(err).split(". ")[0].strip() or type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({first_sentence})") from None


def _is_zip(path: Path) -> bool:
    """torch.save's format since torch 1.6 is a zip archive."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"
