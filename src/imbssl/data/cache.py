"""Decode once, then memory-map: a content-keyed, atomically written cache of uint8 arrays.

Decoding 60,000 JPEGs costs seconds on every run; a ``.npy`` memory map costs milliseconds and
shares pages between processes. The cache key hashes what was decoded (file bytes or a folder
listing) together with the decode options and ``FORMAT_VERSION``, so a changed archive, a new
``image_size`` or a changed on-disk layout never serves stale arrays.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Bump whenever the decoded content or the cache layout changes for the same input.
FORMAT_VERSION = 1
_CHUNK = 1 << 20
_META = "meta.json"

Arrays = dict[str, np.ndarray]
Build = Callable[[], tuple[Arrays, dict[str, Any]]]


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks so large archives need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path, cache_dir: Path) -> str:
    """Content hash of ``path``, memoised under ``cache_dir`` by (path, size, mtime).

    The memo only skips re-hashing an unchanged file; the key itself is always the content
    hash, so two copies of one archive share a cache entry and an edited file never hits.
    """
    st = path.stat()
    stamp = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    memo = cache_dir / "file-hashes" / hashlib.sha256(stamp.encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    _atomic_write_text(memo, digest)
    return digest


def folder_digest(root: Path) -> str:
    """Hash of the sorted (relative path, size, mtime) listing: cheap, and any edit changes it."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath, name)
            st = full.stat()
            entries.append(f"{full.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}")
    entries.sort()
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def cache_key(kind: str, content: str, **options: Any) -> str:
    """Folder name for one decoded source: readable kind prefix plus a hash of everything that matters."""
    blob = json.dumps({"kind": kind, "content": content, "options": options, "version": FORMAT_VERSION},
                      sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _read(folder: Path) -> tuple[Arrays, dict[str, Any]]:
    meta = json.loads((folder / _META).read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta["meta"]


def _write(tmp: Path, arrays: Arrays, meta: dict[str, Any]) -> None:
    """Arrays first, ``meta.json`` last: its presence marks a complete entry."""
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
    (tmp / _META).write_text(json.dumps({"arrays": sorted(arrays), "meta": meta}))


def load_or_build(cache_dir: Path, key: str, build: Build) -> tuple[Arrays, dict[str, Any]]:
    """Return the cached arrays (read-only memmaps) for ``key``, calling ``build`` only on a miss.

    The entry is assembled in a temp folder inside ``cache_dir`` and renamed into place, so a
    crash or a concurrent reader never sees a partial entry; when two processes race, the
    first rename wins and the loser reads the winner's copy.
    """
    final = cache_dir / key
    if (final / _META).is_file():
        log.debug("cache hit %s", final)
        return _read(final)
    if final.exists():
        log.warning("removing incomplete cache entry %s", final)
        shutil.rmtree(final)
    arrays, meta = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{key}-"))
    try:
        _write(tmp, arrays, meta)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        os.rename(tmp, final)
    except OSError as err:
        if not (final / _META).is_file():
            megabytes = sum(a.nbytes for a in arrays.values()) / 1e6
            raise OSError(err.errno, f"cannot write the decode cache ({megabytes:,.0f} MB): {err.strerror}; free "
                                     f"space or move the cache with --set data.cache_dir=PATH", str(cache_dir)) from err
        log.debug("another process cached %s first", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s", final)
    return _read(final)
