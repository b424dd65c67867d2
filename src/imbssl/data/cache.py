"""Decode once, then memory-map: a content-keyed, atomically written cache of uint8 arrays.

Decoding 60,000 JPEGs costs seconds on every run; a ``.npy`` memory map costs milliseconds and
shares pages between processes. A builder may decode straight into memory maps of the entry being
written (``allocate``), so a dataset larger than host memory never has to fit in it. The cache key
hashes what was decoded (file bytes or a folder listing) together with the decode options and
``FORMAT_VERSION``, so a changed archive, a new ``image_size`` or a changed on-disk layout never
serves stale arrays.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imbssl.errors import ImbsslError

log = logging.getLogger(__name__)

#: Bump whenever the decoded content or the cache layout changes for the same input.
#: 2: both splits in one ``images`` array, train rows first.
FORMAT_VERSION = 2
_CHUNK = 1 << 20
_META = "meta.json"
_TMP = ".tmp-"

Arrays = dict[str, np.ndarray]
Allocate = Callable[[str, tuple[int, ...]], np.ndarray]
Build = Callable[[Allocate], tuple[Arrays, dict[str, Any]]]


class CacheSpaceError(ImbsslError):
    """A decode that would not fit on the cache's disk, found before it starts."""


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
    entries = sorted(f"{'/'.join((*folder, name))}\0{st.st_size}\0{st.st_mtime_ns}"
                     for folder, files in walk_folder(root) for name, st in files)
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


FolderFiles = tuple[tuple[str, ...], list[tuple[str, os.stat_result]]]


def walk_folder(root: Path) -> Iterator[FolderFiles]:
    """Every folder under ``root``, as its path components below it, with its files and their stat; symbolic links
    are followed, as the file-list sources follow them. A link to a folder it is inside (a loop) is not followed,
    with a warning: the images below it are read once, from the real folder. A link that cannot be followed
    (pointing nowhere, or at itself) is a file with the link's own stat, which the decode names as unreadable."""
    pending = [((), root, frozenset[tuple[int, int]]())]
    while pending:
        folder, path, above = pending.pop()
        st = path.stat()
        above |= {(st.st_dev, st.st_ino)}
        files = []
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                try:
                    st = entry.stat()
                except OSError:
                    files.append((entry.name, entry.stat(follow_symlinks=False)))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    files.append((entry.name, st))
                elif (st.st_dev, st.st_ino) in above:
                    log.warning("%s links to %s, a folder it is inside: not followed (a loop)", entry.path,
                                os.path.realpath(entry.path))
                else:
                    pending.append(((*folder, entry.name), Path(entry.path), above))
        yield folder, files


def cache_key(kind: str, content: str, **options: Any) -> str:
    """Folder name for one decoded source: readable kind prefix plus a hash of everything that matters."""
    blob = json.dumps({"kind": kind, "content": content, "options": options, "version": FORMAT_VERSION},
                      sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _read(folder: Path) -> tuple[Arrays, dict[str, Any]]:
    meta = json.loads((folder / _META).read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta["meta"]


class _Entry:
    """A cache entry being assembled in a temp folder; ``allocate`` hands out writable uint8 memory maps in it.

    The folder's name carries the process id, so that a later build can remove the folders of builds that
    were killed (a decode into a reserved map can hold tens of GB)."""

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.cache_dir = cache_dir
        self.folder = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f"{_TMP}{key}-{os.getpid()}-")).resolve()
        self.maps: dict[str, np.ndarray] = {}
        self.nbytes = 0

    def allocate(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """``name.npy`` of ``shape``, its disk space reserved now: a full disk fails here with ENOSPC, not
        later with SIGBUS on a write through the map (best effort: where the file system cannot reserve,
        the map stays sparse)."""
        path = self.folder / f"{name}.npy"
        self.nbytes += int(np.prod(shape))
        if self.nbytes > (free := free_bytes(self.folder)):
            raise CacheSpaceError(f"decoding needs {readable_size(self.nbytes)} in the decode cache ({name} {shape}, "
                                  f"from the image headers), and {self.cache_dir} has {readable_size(free)} free: "
                                  f"set data.image_size to store the images smaller, or move the cache with --set "
                                  f"data.cache_dir=PATH")
        try:
            self.maps[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(path)
        except OSError as err:
            raise self.cannot_write(err) from err
        return self.maps[name]

    def write(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Arrays first (the maps allocated here are only flushed), ``meta.json`` last: its presence marks a
        complete entry."""
        try:
            for name, array in arrays.items():
                if name in self.maps:
                    if array is not self.maps[name]:  # np.save would truncate the file the map points into
                        raise ValueError(f"cache array {name!r} must be the memory map allocated for it")
                    array.flush()
                else:
                    self.nbytes += array.nbytes
                    np.save(self.folder / f"{name}.npy", np.ascontiguousarray(array))
            (self.folder / _META).write_text(json.dumps({"arrays": sorted(arrays), "meta": meta}))
            os.chmod(self.folder, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        except OSError as err:
            raise self.cannot_write(err) from err
        self.maps.clear()

    def cannot_write(self, err: OSError) -> OSError:
        return OSError(err.errno, f"cannot write the decode cache ({self.nbytes / 1e6:,.0f} MB): {err.strerror}; "
                                  f"free space or move the cache with --set data.cache_dir=PATH", str(self.cache_dir))


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk of ``folder``, or of its nearest existing parent."""
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def readable_size(nbytes: float) -> str:
    """'1.2 GB', '340.0 MB', '12.0 kB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now (posix_fallocate); a file system that cannot do so is left sparse."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            log.debug("cannot reserve %s (%s): the map stays sparse", path, err.strerror)


def _remove_abandoned(cache_dir: Path, key: str) -> None:
    """Temp folders of ``key`` whose builder process is gone (killed mid-decode) are removed."""
    for folder in cache_dir.glob(f"{_TMP}{key}-*"):
        pid = folder.name[len(f"{_TMP}{key}-"):].split("-")[0]
        if pid.isdecimal() and not _alive(int(pid)):
            log.warning("removing %s, left by a decode that did not finish (process %s)", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def load_or_build(cache_dir: Path, key: str, build: Build) -> tuple[Arrays, dict[str, Any]]:
    """Return the cached arrays (read-only memmaps) for ``key``, calling ``build(allocate)`` only on a miss.

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
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(cache_dir, key)
    entry = _Entry(cache_dir, key)
    try:
        arrays, meta = build(entry.allocate)
        entry.write(arrays, meta)
        del arrays  # the maps into the temp folder, before it is renamed or removed
        try:
            os.rename(entry.folder, final)
        except OSError as err:
            raise entry.cannot_write(err) from err
    except BaseException as err:
        entry.maps.clear()
        traceback.clear_frames(err.__traceback__)  # the builder's maps too, so the reserved space is freed now
        if not (isinstance(err, OSError) and (final / _META).is_file()):
            raise
        log.debug("another process cached %s first", final)  # the loser reads the winner's copy
    finally:
        shutil.rmtree(entry.folder, ignore_errors=True)
    log.info("cached %s", final)
    return _read(final)
