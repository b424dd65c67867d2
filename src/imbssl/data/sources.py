"""Image sources: scikit-learn digits, CIFAR-10/100 python archives, ImageFolder trees or tars, the
long-tailed benchmarks' file lists (ImageNet-LT, Places-LT), iNaturalist's annotation JSON, and
unlabelled images (a folder or tar in any layout, or a list of paths).

Every source yields the full "train" and "test" pools as uint8 ``[N, H, W, C]`` images with
int64 labels; the unlabelled images are all "train", labelled -1, with an empty "test". CIFAR and
file sources are decoded once and then served as read-only
memory maps from the cache (``cache.py``); the tiny digits set is computed directly. Choosing a
long-tailed subset of the train pool is the caller's job (``longtail.select_subset``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
import tempfile
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from imbssl.config import LISTED_SOURCES, DataConfig
from imbssl.data.cache import (Allocate, cache_key, file_digest, folder_digest, free_bytes, load_or_build,
                               walk_folder)
from imbssl.errors import ImbsslError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DIGITS_TEST_PER_CLASS = 50
DIGITS_SPLIT_SEED = 0
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm",
                              ".tif", ".tiff", ".webp"})
#: the label of every image of an unlabelled set
UNLABELLED = -1
#: the smallest side an image is stored at as it is (without data.image_size): smaller ones leave no room for crops
MIN_SIDE = 8
#: the most bytes of decoded rows that closing the gap of an image left out of a tar's decode copies at once
MOVE_BYTES = 64 << 20
#: PIL's modes of 16-bit greyscale (PNG, TIFF), whose convert() clips every value above 255 to white
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
#: the greyscale modes of more than 8 bits: 16-bit, 32-bit integer ("I"; also how older Pillow opened 16-bit PNGs)
#: and 32-bit float ("F"), scaled to 8 bits by ``_to_8_bits``
WIDE_MODES = SIXTEEN_BIT_MODES | {"I", "F"}
#: how ``_to_8_bits`` scales each kind of wide image (docs/data.md "Modes"), as the decode's log line names it
SCALE_RULES = {"16-bit": "16-bit values (I;16, or I within 0..65535) as v / 257",
               "unit": "floats within [0, 1] (F) as v * 255",
               "range": "the other I and F images by their own range, min..max to 0..255"}


class DataError(ImbsslError, RuntimeError):
    """Input data that cannot be used as given; the message names the file, folder or class."""


class UnreadableImage(DataError):
    """An image file that PIL cannot read; ``name`` is the file."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot decode image {name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class ImageSet:
    """One split: uint8 images ``[N, H, W, C]`` (C in {1, 3}, possibly a read-only memmap),
    int64 labels ``[N]`` indexing ``classes``; an unlabelled set has no classes and every label -1.
    ``skipped`` names the source's unreadable images that ``data.unreadable: skip`` left out."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"images must be uint8 [N, H, W, C] with C in (1, 3), got {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise DataError(f"labels must be int64 [{len(images)}], got {labels.dtype} {labels.shape}")
        if not self.labelled and (labels != UNLABELLED).any():
            raise DataError(f"an unlabelled set (no classes) has every label {UNLABELLED}")
        if self.labelled and labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"labels outside 0..{len(self.classes) - 1}")

    @classmethod
    def unlabelled(cls, images: np.ndarray, skipped: tuple[str, ...] = ()) -> "ImageSet":
        return cls(images, np.full(len(images), UNLABELLED, dtype=np.int64), (), skipped)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def class_counts(self) -> np.ndarray:
        """Images per class index, zeros included."""
        if not self.labelled:
            raise DataError("class counts need labels, and these images have none (data.source images, or "
                            "data.labels none)")
        return np.bincount(self.labels, minlength=len(self.classes)).astype(np.int64)


Splits = dict[str, ImageSet]


def load_splits(cfg: DataConfig) -> Splits:
    """The full "train" and "test" pools of ``cfg.source`` (``cfg.subset`` is not applied here)."""
    if cfg.source == "digits":
        return _load_digits()
    cache_dir = Path(cfg.cache_dir).expanduser()
    if cfg.source == "imagefolder":
        key, build = _imagefolder_source(cfg, cache_dir)
    elif cfg.source in LISTED_SOURCES:
        key, build = _listed_source(cfg, cache_dir)
    elif cfg.source == "images":
        key, build = _images_source(cfg, cache_dir)
    else:
        key, build = _cifar_source(cfg, cache_dir)
    return _cached(cache_dir, key, build)


def without_labels(splits: Splits) -> Splits:
    """A labelled source seen as if it had no labels (``data.labels: none``): its train images unlabelled, and no
    test images, as the images source gives them."""
    train = splits["train"]
    return {"train": ImageSet.unlabelled(train.images, train.skipped), "test": ImageSet.unlabelled(train.images[:0])}


class _Decoded(NamedTuple):
    """Both splits of a source in one array, as the cache stores them: the first ``n_train`` rows are "train", the
    test rows follow up to ``len(labels)``; rows past those are spare (images left out as unreadable)."""

    images: np.ndarray
    labels: np.ndarray
    n_train: int
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()


def _cached(cache_dir: Path, key: str, build: Callable[[Allocate], _Decoded]) -> Splits:
    """A source's decode, cached: ``images`` and ``labels`` arrays, split by ``n_train``; labels are copied into
    memory (they are small)."""

    def build_arrays(allocate: Allocate) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        start = time.perf_counter()
        decoded = build(allocate)
        log.info("decoded %s in %.1f s", key, time.perf_counter() - start)
        skipped = {"skipped": list(decoded.skipped)} if decoded.skipped else {}
        return ({"images": decoded.images, "labels": decoded.labels},
                {"classes": list(decoded.classes), "n_train": decoded.n_train, **skipped})

    arrays, meta = load_or_build(cache_dir, key, build_arrays)
    labels, n, classes = np.array(arrays["labels"]), meta["n_train"], tuple(meta["classes"])
    images = arrays["images"][:len(labels)]
    return {"train": ImageSet(images[:n], labels[:n], classes, tuple(meta.get("skipped", ()))),
            "test": ImageSet(images[n:], labels[n:], classes)}


# ---------------------------------------------------------------------------------------- digits


def _load_digits() -> Splits:
    """scikit-learn's 8x8 digits (0..16) as uint8 0..255; a seeded, balanced 50-per-class test set."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        is_test[rng.choice(np.flatnonzero(labels == c), DIGITS_TEST_PER_CLASS, replace=False)] = True
    classes = tuple(str(c) for c in range(10))
    return {"train": ImageSet(images[~is_test], labels[~is_test], classes),
            "test": ImageSet(images[is_test], labels[is_test], classes)}


# ----------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarArchive:
    """Where an official CIFAR python archive lives and which members/keys hold what."""

    url: str
    md5: str
    filename: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: str
    names_key: str


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
CIFAR_ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        url=_TORONTO + "cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        filename="cifar-10-python.tar.gz",
        train_members=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        test_member="cifar-10-batches-py/test_batch", meta_member="cifar-10-batches-py/batches.meta",
        label_key="labels", names_key="label_names"),
    "cifar100": CifarArchive(
        url=_TORONTO + "cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        filename="cifar-100-python.tar.gz", train_members=("cifar-100-python/train",),
        test_member="cifar-100-python/test", meta_member="cifar-100-python/meta",
        label_key="fine_labels", names_key="fine_label_names"),
}

# The only globals a CIFAR batch references: numpy's array reconstruction (old and new module path).
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``_PICKLE_GLOBALS``: a pickle can otherwise run any callable."""

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")  # latin1: Python 2 pickles, as numpy advises
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.source}: refusing to unpickle global {module}.{name}") from None


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _unpickle(data: bytes, source: str) -> dict[str, Any]:
    """Restricted unpickling; keys normalised to str (Python 2 pickles give str, Python 3 bytes)."""
    try:
        obj = _CifarUnpickler(data, source).load()
    except DataError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(f"{source}: not a readable CIFAR batch ({err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def download(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` to ``dest`` through a temp file; a download whose md5 differs is deleted."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.part-")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as err:  # URLError is an OSError; ValueError: malformed URL
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"cannot download {url} to {dest}: {err}") from err
    if digest.hexdigest() != md5:
        Path(tmp).unlink()
        raise DataError(f"md5 mismatch for {url}: expected {md5}, got {digest.hexdigest()}; "
                        f"the download was deleted, {dest} was not written")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, dest)


def _cifar_archive_path(cfg: DataConfig, spec: CifarArchive, cache_dir: Path) -> Path:
    """``cfg.path`` is the archive or its folder (default ``<cache_dir>/downloads``); download if absent."""
    path = Path(cfg.path).expanduser() if cfg.path else cache_dir / "downloads"
    if path.is_dir() or (not path.is_file() and not path.name.endswith((".tar.gz", ".tgz"))):
        path = path / spec.filename
    if path.is_file():
        return path
    if not cfg.download:
        raise DataError(f"{cfg.source} archive not found: {path} (set data.download=true or data.path)")
    download(spec.url, path, spec.md5)
    return path


def _cifar_source(cfg: DataConfig, cache_dir: Path) -> tuple[str, Callable[[Allocate], _Decoded]]:
    spec = CIFAR_ARCHIVES[cfg.source]
    archive = _cifar_archive_path(cfg, spec, cache_dir)
    key = cache_key(cfg.source, file_digest(archive, cache_dir))
    return key, lambda allocate: _decode_cifar(archive, spec)


def _walk_tar(archive: Path, read: Callable[[tarfile.TarInfo], bool]) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """The archive's members in its own order, read in stream mode (a compressed tar cannot seek), each with its
    bytes where ``read(member)`` (a regular file) says so: one member's bytes at a time, never the archive's, and
    nothing is extracted to disk. Nor are the members kept: ``TarFile.next`` appends each to ``members``, which a
    stream never reads back, so that list is emptied as the walk goes."""
    try:
        with tarfile.open(archive, "r|*") as tf:
            while (member := tf.next()) is not None:
                tf.members.clear()
                yield member, tf.extractfile(member).read() if read(member) else None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read tar archive {archive}: {err}") from err


def _read_members(archive: Path, wanted: set[str], parse: Callable[[bytes, str], Any]) -> dict[str, Any]:
    """The ``wanted`` tar members, each parsed by ``parse(bytes, "archive:member")`` as the stream reaches it; a
    member archived twice is its last copy, as tar extracts it, so a copy's parse error waits for the end (as its
    message alone: no bytes are held). A missing member is named first."""
    found: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for member, blob in _walk_tar(archive, lambda m: m.isfile() and PurePosixPath(m.name).as_posix() in wanted):
        if blob is not None:
            name = PurePosixPath(member.name).as_posix()
            found.pop(name, None)  # an earlier copy
            try:
                found[name] = parse(blob, f"{archive}:{name}")
                errors.pop(name, None)
            except DataError as err:
                errors[name] = str(err)
    if missing := sorted(wanted - found.keys() - errors.keys()):
        raise DataError(f"{archive}: missing member(s) {', '.join(missing)}")
    if errors:
        raise DataError(next(iter(errors.values())))
    return found


def _cifar_batch(batch: dict[str, Any], source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's ``data`` [N, 3072] in CHW order -> uint8 [N, 32, 32, 3]; labels -> int64."""
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{source}: batch lacks 'data' or {label_key!r}")
    data, labels = batch["data"], np.asarray(batch[label_key], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{source}: expected uint8 data [N, 3072], got {getattr(data, 'shape', type(data))}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise DataError(f"{source}: labels do not match the data or the {num_classes} class names")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _decode_cifar(archive: Path, spec: CifarArchive) -> _Decoded:
    """The pickled batches, train then test (180 MB at most: decoded in memory), each unpickled as the archive
    stream reaches it."""
    members = _read_members(archive, {*spec.train_members, spec.test_member, spec.meta_member}, _unpickle)
    meta_src = f"{archive}:{spec.meta_member}"
    meta = members[spec.meta_member]
    if spec.names_key not in meta:
        raise DataError(f"{meta_src}: no {spec.names_key!r}")
    classes = tuple(str(_text(n)) for n in meta[spec.names_key])
    parts = [_cifar_batch(members[n], f"{archive}:{n}", spec.label_key, len(classes))
             for n in (*spec.train_members, spec.test_member)]
    n_train = sum(len(labels) for _, labels in parts[:-1])
    return _Decoded(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), n_train, classes)


# ----------------------------------------------------------------------------------- ImageFolder


#: an image's header: PIL's mode, and (width, height)
Peek = tuple[str, tuple[int, int]]


class _Member(NamedTuple):
    """An image inside a tar: the member that holds its bytes (a link's target), found again by its offset in the
    archive on the decode's pass, and the header that the listing's pass read from them."""

    archive: Path
    offset: int
    header: Peek | str  # or why PIL cannot read it


class _File(NamedTuple):
    parts: tuple[str, ...]  # path relative to the folder / archive root
    data: Path | _Member  # a folder's file, or a tar's member, read when it is decoded
    name: str  # for error messages


def _imagefolder_source(cfg: DataConfig, cache_dir: Path) -> tuple[str, Callable[[Allocate], _Decoded]]:
    if not cfg.path:
        raise DataError("data.path is required when data.source is 'imagefolder'")
    root = Path(cfg.path).expanduser()
    if root.is_dir():
        content = folder_digest(root)
    elif root.is_file():
        content = file_digest(root, cache_dir)
    else:
        raise DataError(f"imagefolder path not found: {root}")
    order = _read_train_order(Path(cfg.train_order).expanduser()) if cfg.train_order else None
    # another order is another decode: the order's content enters the key, only where it is set (older keys stay)
    key = cache_key("imagefolder", content, **_size_options(cfg), **({"train_order": order.digest} if order else {}))
    return key, lambda allocate: _decode_imagefolder(root, cfg.image_size, cfg.resize, allocate, order)


def _size_options(cfg: DataConfig) -> dict:
    """The options that shape the decoded images; ``resize`` only where it acts, so that older caches keep
    their keys."""
    resizes = cfg.image_size is not None and cfg.resize != "stretch"
    return {"image_size": cfg.image_size, **({"resize": cfg.resize} if resizes else {})}


def _is_image(parts: tuple[str, ...]) -> bool:
    """Image extension and no hidden component (skips .DS_Store, macOS ``._x.jpg`` tar residue)."""
    return not any(p.startswith(".") for p in parts) and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS


def _safe_parts(name: str, source: Path | str) -> tuple[str, ...]:
    """The components of a tar member's or a list's path; absolute paths and ``..`` are refused as path traversal."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{source}: refusing path {name!r} (absolute or with '..': path traversal)")
    return path.parts


class _Listing(NamedTuple):
    files: list[_File]  # the images
    folders: set[tuple[str, ...]]  # every folder, empty ones included: to tell "empty" from "missing"
    others: list[str]  # the other files (not images, or hidden): to tell "no files" from "no image files"


def _tar_files(archive: Path) -> _Listing:
    """The archive's members in one pass, each image's header read as the stream reaches it and its bytes let go;
    its hard and symbolic links are then resolved inside it (``_add_links``)."""
    listing = _Listing([], set(), [])
    regular: dict[tuple[str, ...], int] = {}  # file -> offset; a name archived twice is its last copy, as tar extracts
    links: dict[tuple[str, ...], tarfile.TarInfo] = {}
    for member, blob in _walk_tar(archive, lambda m: m.isfile() and _is_image(PurePosixPath(m.name).parts)):
        parts = _safe_parts(member.name, archive)
        if member.isdir():
            listing.folders.add(parts)
        elif member.issym() or member.islnk():
            links[parts] = member
        elif member.isfile():
            regular[parts] = member.offset
            if blob is not None:
                member_data = _Member(archive, member.offset, _tar_header(blob))
                listing.files.append(_File(parts, member_data, f"{archive}:{member.name}"))
            else:
                listing.others.append(member.name)
    _add_links(listing, archive, regular, links)
    return listing


def _tar_header(blob: bytes) -> Peek | str:
    """A member's header, or why PIL cannot read it (``_read_headers`` names the image, or each link to it)."""
    try:
        return _peek(blob, "")
    except UnreadableImage as err:
        return err.reason


def _add_links(listing: _Listing, archive: Path, regular: dict[tuple[str, ...], int],
               links: dict[tuple[str, ...], tarfile.TarInfo]) -> None:
    """Each link that names an image becomes a file showing its target's member (whose header is read in one more
    pass when the target's name is not an image's). A link that leaves the archive, loops, points to no member or
    to a folder is refused in one line."""
    if not links:
        return
    folders = listing.folders | {parts[:i] for parts in regular | links.keys() for i in range(1, len(parts))}
    targets = {parts: _link_target(parts, links, archive) for parts in links}
    for parts, target in targets.items():
        where = f"{archive}: link {links[parts].name} -> {links[parts].linkname}"
        if target in folders:
            raise DataError(f"{where} is a link to a folder; imbssl follows the links of an archive to files only: "
                            f"archive the folder itself (tar --dereference)")
        if target not in regular:
            raise DataError(f"{where} points to {'/'.join(target)}, which is not a file of the archive")
    images = {parts: target for parts, target in targets.items() if _is_image(parts)}
    listing.others.extend(links[parts].name for parts in sorted(targets.keys() - images.keys()))
    headers = {f.data.offset: f.data.header for f in listing.files}
    if unread := {regular[target] for target in images.values()} - headers.keys():
        headers.update((member.offset, _tar_header(blob))
                       for member, blob in _walk_tar(archive, lambda m: m.isfile() and m.offset in unread)
                       if blob is not None)
        if gone := next((target for target in images.values() if regular[target] not in headers), None):
            raise _gone(archive, f"{archive}:{'/'.join(gone)}")
    listing.files.extend(_File(parts, _Member(archive, regular[target], headers[regular[target]]),
                               f"{archive}:{links[parts].name}") for parts, target in images.items())


def _link_target(parts: tuple[str, ...], links: dict[tuple[str, ...], tarfile.TarInfo],
                 archive: Path) -> tuple[str, ...]:
    """The member that the link ``parts`` leads to, through any chain of links: a symbolic link's target is relative
    to its folder, a hard link's to the archive's root; one that leaves the archive, or loops, is refused."""
    seen = set()
    while parts in links:
        member = links[parts]
        if parts in seen:
            raise DataError(f"{archive}: link {member.name} -> {member.linkname} loops")
        seen.add(parts)
        start = parts[:-1] if member.issym() else ()
        parts = _inside(start, member, archive)
    return parts


def _inside(start: tuple[str, ...], link: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    """``link``'s target read from the folder ``start``, ``..`` resolved; a target outside the archive is refused."""
    parts = list(start)
    for part in PurePosixPath(link.linkname).parts:
        if part == ".." and parts:
            parts.pop()
        elif part == ".." or part.startswith("/"):
            raise DataError(f"{archive}: refusing link {link.name} -> {link.linkname}: it points outside the archive")
        elif part != ".":
            parts.append(part)
    return tuple(parts)


def _folder_files(root: Path) -> _Listing:
    listing = _Listing([], set(), [])
    for rel, files in walk_folder(root):
        listing.folders.add(rel)
        for name, _ in files:
            parts = (*rel, name)
            full = root.joinpath(*parts)
            if _is_image(parts):
                listing.files.append(_File(parts, full, str(full)))
            else:
                listing.others.append(str(full))
    return listing


def _find_root(files: list[_File], source: Path) -> tuple[str, ...]:
    """``()`` for ``train/<class>/...`` at the top, ``(top,)`` for one extra top folder."""
    if any(len(f.parts) >= 3 and f.parts[0] == "train" for f in files):
        return ()
    tops = sorted({f.parts[0] for f in files if len(f.parts) >= 4 and f.parts[1] == "train"})
    if len(tops) == 1:
        return (tops[0],)
    found = f"several candidates {tops}" if tops else "no train/<class>/<image> files"
    raise DataError(f"{source}: expected [<top>/]train/<class>/<image> and test/ (or val/); {found}")


def guess_source(path: Path) -> str:
    """``imagefolder`` where ``path`` holds ``[<top>/]train/<class>/<image>`` (a folder or an archive), else ``images``:
    what ``data describe --data PATH`` reads a path as when no source is named."""
    path = Path(path).expanduser()
    if path.is_dir():
        tops = [path, *(d for d in path.iterdir() if d.is_dir())]
        return "imagefolder" if any((top / "train").is_dir() for top in tops) else "images"
    try:  # a tar that cannot be read is "images" too: the images source names the problem
        _find_root([_File(PurePosixPath(member.name).parts, path, "")
                    for member, _ in _walk_tar(path, lambda m: False) if member.isfile()], path)
    except DataError:
        return "images"
    return "imagefolder"


def _by_split(listing: _Listing, source: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, _File]]]]:
    """Classes (sorted train folder names) and, per split, sorted (class, file) pairs."""
    files = listing.files
    root = _find_root(files, source)
    depth = len(root)
    under: dict[str, list[tuple[str, _File]]] = {}
    for f in sorted(files, key=lambda f: f.parts):
        if len(f.parts) >= depth + 3 and f.parts[:depth] == root:
            under.setdefault(f.parts[depth], []).append((f.parts[depth + 1], f))
    test_name = "test" if "test" in under else "val"
    if test_name not in under:
        raise DataError(f"{source}: no {'/'.join((*root, 'test'))} (or val) split")
    present = {split: {c for c, _ in under[split]} for split in ("train", test_name)}
    classes = tuple(sorted(present["train"]))
    for split, cls in [*((test_name, c) for c in classes), *(("train", c) for c in sorted(present[test_name]))]:
        if cls not in present[split]:
            folder = (*root, split, cls)
            state = "is empty (no image files)" if folder in listing.folders else "is missing"
            raise DataError(f"{source}: class folder {'/'.join(folder)} {state}; every class needs images in "
                            f"train/ and {test_name}/")
    return classes, {"train": under["train"], "test": under[test_name]}


def _open_image(data: bytes | Path, name: str, load: bool = True) -> Image.Image:
    """The image, decoded; with ``load=False`` only its header is read (mode and size)."""
    try:
        if isinstance(data, Path) and not load:
            return Image.open(data)
        img = Image.open(io.BytesIO(data if isinstance(data, bytes) else data.read_bytes()))
        if load:
            img.load()
    except Image.UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise UnreadableImage(name, "not in an image format PIL reads (corrupt?)") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise UnreadableImage(name, str(err)) from err
    return img


def _peek(data: bytes | Path, name: str) -> Peek:
    """The image's header alone."""
    with _open_image(data, name, load=False) as img:
        return img.mode, img.size


def _as_mode(img: Image.Image, mode: str, name: str) -> tuple[Image.Image, str | None]:
    """``img`` in ``mode`` (L or RGB), and the SCALE_RULES key that scaled it to 8 bits (None for an 8-bit mode).
    Wide greyscale goes through ``_to_8_bits``, where PIL's convert would clip it; every other mode is PIL's
    conversion (RGBA, LA and PA drop the alpha channel, P looks up its palette, 1 is 0 or 255, CMYK is
    (255 - C)(255 - K) / 255, YCbCr is JFIF's in PIL's fixed point)."""
    rule = None
    if img.mode in WIDE_MODES:
        img, rule = _to_8_bits(img, name)
    return (img if img.mode == mode else img.convert(mode)), rule


def _to_8_bits(img: Image.Image, name: str) -> tuple[Image.Image, str]:
    """Wide greyscale as 8-bit L, rounded: 16-bit values (any I;16, an I within 0..65535) as v / 257, exact for
    8-bit values stored as 16-bit; floats within [0, 1] as v * 255; any other I or F by its own min..max (a
    constant one is black). NaN or infinity is unreadable: no rule says what it shows."""
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():
        raise UnreadableImage(name, "a float image holding NaN or infinity")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if img.mode != "F" and low >= 0 and high <= 65535:
        rule, scaled = "16-bit", values / 257
    elif img.mode == "F" and low >= 0 and high <= 1:
        rule, scaled = "unit", values * 255
    else:
        rule, scaled = "range", (values - low) * (255 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8)), rule


def _resized(img: Image.Image, size: int, resize: str) -> Image.Image:
    """``size`` x ``size``: both sides stretched, or the shorter side scaled to ``size`` and the centre kept."""
    if resize == "stretch":
        return img.resize((size, size), Image.Resampling.BILINEAR)
    scale = size / min(img.size)
    width, height = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    return img.resize((width, height), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))


class _Header(NamedTuple):
    file: _File
    mode: str  # PIL's
    size: tuple[int, int]  # width, height


OnUnreadable = Callable[[UnreadableImage], None]


def _read_headers(files: list[_File], on_unreadable: OnUnreadable | None = None) -> list[_Header]:
    """Each image's mode and size, from its header alone. An image PIL cannot read is refused, or, given
    ``on_unreadable``, handed to it and left out."""
    headers = []
    for f in files:
        try:
            headers.append(_Header(f, *_file_header(f)))
        except UnreadableImage as err:
            if on_unreadable is None:
                raise
            on_unreadable(err)
    return headers


def _file_header(f: _File) -> Peek:
    """A folder file's header, read now; a tar member's, as the listing read it."""
    if not isinstance(f.data, _Member):
        return _peek(f.data, f.name)
    if isinstance(f.data.header, str):
        raise UnreadableImage(f.name, f.data.header)
    return f.data.header


def _stored_shape(headers: list[_Header], image_size: int | None) -> tuple[int, int, int]:
    """(height, width, channels) of the stored images: one channel if every image is mode L, else RGB; without
    ``image_size`` every image must have the first one's size, at least MIN_SIDE on a side."""
    if not headers:
        raise DataError("no readable images to decode")
    first = headers[0]
    if image_size is None:
        for h in headers:
            if min(h.size) < MIN_SIDE:
                raise DataError(f"image {h.file.name} is {h.size[0]}x{h.size[1]}, under {MIN_SIDE} px on a side: too "
                                f"small to crop views from as it is; set data.image_size to store every image at one "
                                f"size (upscaling the small ones), or remove it")
            if h.size != first.size:
                raise DataError(f"image {h.file.name} is {h.size[0]}x{h.size[1]} but {first.file.name} is "
                                f"{first.size[0]}x{first.size[1]}; set data.image_size to resize")
    elif small := [h for h in headers if min(h.size) < image_size]:
        smallest = min(small, key=lambda h: min(h.size))
        log.info("%d image(s) have a side under data.image_size=%d and are upscaled to it (the smallest: %s, %dx%d)",
                 len(small), image_size, smallest.file.name, *smallest.size)
    width, height = (image_size, image_size) if image_size is not None else first.size
    return height, width, 1 if all(h.mode == "L" for h in headers) else 3


def _decode_images(files: list[_File], image_size: int | None, resize: str, allocate: Allocate,
                   on_unreadable: OnUnreadable | None = None) -> np.ndarray:
    """Decode straight into ``allocate("images", ...)`` (a memory map of the cache entry), one image at a time: a
    folder's in order, a tar's as its stream holds them, each into its row. An image that fails stops the decode at
    once (a tar's first in the archive's order) unless ``on_unreadable`` is given and PIL cannot read it: then it is
    handed to it, in row order at the end, and left out; the images read fill the first rows, in order, and a spare
    row follows for each one that failed after its header."""
    headers = _read_headers(files, on_unreadable)
    shape = _stored_shape(headers, image_size)
    out = allocate("images", (len(headers), *shape))
    in_order = not headers or not isinstance(headers[0].file.data, _Member)
    failed: dict[int, tuple[str, str]] = {}  # row -> name, reason: not the error, whose frames hold the bytes
    scaled = Counter()
    for rows, data in _image_data([h.file for h in headers]):
        decoded = None  # a member's pixels, decoded once for all the rows that show it (links)
        for row in rows:
            try:
                decoded = decoded or _pixels(data, headers[row].file.name, shape, image_size, resize)
            except UnreadableImage as err:
                if on_unreadable is None:
                    raise
                failed[row] = err.name, err.reason
                continue
            # a folder's rows come in order: each goes straight to its place after the images left out before it
            out[row - len(failed) if in_order else row], rule = decoded
            if rule:
                scaled[rule] += 1
    for row in sorted(failed):
        on_unreadable(UnreadableImage(*failed[row]))
    if not in_order:
        _close_gaps(out, sorted(failed))
    _log_scaled(scaled)
    return out


def _image_data(files: list[_File]) -> Iterator[tuple[list[int], bytes | Path]]:
    """Each image's data and its positions in ``files``: a folder's files one by one, in order; a tar's members in
    one pass, in the archive's order, each member's bytes once for every position that shows it (a link shows its
    target's)."""
    if not files or not isinstance(files[0].data, _Member):
        yield from (([i], f.data) for i, f in enumerate(files))
        return
    archive = files[0].data.archive
    rows: dict[int, list[int]] = {}
    for i, f in enumerate(files):
        rows.setdefault(f.data.offset, []).append(i)
    for member, blob in _walk_tar(archive, lambda m: m.isfile() and m.offset in rows):
        if blob is not None:
            yield rows.pop(member.offset), blob
    if rows:
        raise _gone(archive, files[next(iter(rows.values()))[0]].name)


def _gone(archive: Path, name: str) -> DataError:
    """A member that the listing's pass saw and a later pass of the same archive did not."""
    return DataError(f"{archive} changed while it was read: {name} is gone")


def _pixels(data: bytes | Path, name: str, shape: tuple[int, int, int], image_size: int | None,
            resize: str) -> tuple[np.ndarray, str | None]:
    """One image as ``shape`` (height, width, channels), and the SCALE_RULES key that scaled it to 8 bits."""
    height, width, channels = shape
    img, rule = _as_mode(_open_image(data, name), "L" if channels == 1 else "RGB", name)
    if image_size is not None and img.size != (width, height):
        img = _resized(img, image_size, resize)
    if img.size != (width, height):
        raise DataError(f"cannot decode image {name}: it decodes to {img.width}x{img.height}, its header said "
                        f"{width}x{height}")
    return np.asarray(img).reshape(shape), rule


def _close_gaps(out: np.ndarray, gaps: list[int]) -> None:
    """The rows between the rows ``gaps`` (sorted) moved up over them, run by run in slices of at most MOVE_BYTES
    (numpy copies overlapping slices through a temporary), and the spare rows at the end zeroed."""
    if not gaps:
        return
    step = max(1, MOVE_BYTES // out[0].nbytes)
    for shift, (gap, end) in enumerate(zip(gaps, [*gaps[1:], len(out)]), 1):
        for start in range(gap + 1, end, step):
            stop = min(start + step, end)
            out[start - shift:stop - shift] = out[start:stop]
    out[len(out) - len(gaps):] = 0


def _log_scaled(scaled: Counter) -> None:
    """One line for all the images of more than 8 bits that the decode scaled, counted by SCALE_RULES."""
    if total := sum(scaled.values()):
        rules = ", ".join(f"{scaled[rule]} of {text}" for rule, text in SCALE_RULES.items() if scaled[rule])
        log.info("scaled %d image(s) of more than 8 bits to 8: %s (docs/data.md, Modes)", total, rules)


class _TrainOrder(NamedTuple):
    """A file of image paths, one per line (``data.train_order``; ``data.train_list`` of the images source): line i
    names train image i by its path in the archive or folder."""

    path: Path
    members: list[tuple[str, ...]]  # each line's path components, unique
    digest: str  # of the file's bytes, for the cache key


def _read_train_order(path: Path, key: str = "data.train_order") -> _TrainOrder:
    """The file that ``key`` names, checked line by line before anything is decoded: an empty line, a path outside
    the archive (absolute, ``..``) or a path listed twice is an error naming its line."""
    try:
        blob = path.read_bytes()
        text = blob.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {key} {path}: {err}") from None
    first_line: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{key} {path} line {number}"
        if not line.strip():
            raise DataError(f"{where} is empty: the file lists one training image per line")
        parts = _safe_parts(line, where)
        if (first := first_line.setdefault(parts, number)) != number:
            raise DataError(f"{where}: {line} is listed on line {first} already; every training image is listed once")
    if not first_line:
        raise DataError(f"{key} {path} lists no image")
    return _TrainOrder(path, list(first_line), hashlib.sha256(blob).hexdigest())


def _in_train_order(train: list[tuple[str, _File]], order: _TrainOrder, source: Path) -> list[tuple[str, _File]]:
    """The training images in the order file's order. A line that names no training image, or a training image that
    no line names, is an error: no image is dropped or repeated without a word."""
    by_member = {f.parts: (cls, f) for cls, f in train}
    for number, member in enumerate(order.members, 1):
        if member not in by_member:
            raise DataError(f"data.train_order {order.path} line {number}: {'/'.join(member)} is not a training image "
                            f"of {source} (its training images are named like {'/'.join(train[0][1].parts)})")
    if len(order.members) != len(train):
        listed = set(order.members)
        unlisted = next(member for member in by_member if member not in listed)
        raise DataError(f"data.train_order {order.path} lists {len(order.members):,} images, but {source} has "
                        f"{len(train):,} training images; {'/'.join(unlisted)} is one it leaves out")
    return [by_member[member] for member in order.members]


def _decode_imagefolder(root: Path, image_size: int | None, resize: str, allocate: Allocate,
                        order: _TrainOrder | None = None) -> _Decoded:
    """Both splits decoded together, so they share one image size and channel count; the train split in the order
    file's order where one is given, else sorted by path."""
    classes, splits = _by_split(_tar_files(root) if root.is_file() else _folder_files(root), root)
    train = _in_train_order(splits["train"], order, root) if order else splits["train"]
    pairs = train + splits["test"]
    images = _decode_images([f for _, f in pairs], image_size, resize, allocate)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c, _ in pairs], dtype=np.int64)
    return _Decoded(images, labels, len(train), classes)


# ------------------------------------------------------------------ file lists and iNaturalist JSON


class _Listed(NamedTuple):
    """One split's list: image paths relative to the root, each with the list's own class id."""

    paths: list[str]
    class_ids: list[int]
    names: dict[int, str]  # class id -> name, for the ids the list defines


def _read_file_list(path: Path) -> _Listed:
    """``relative/path label`` lines, as ImageNet-LT and Places-LT ship them (the path may hold spaces)."""
    paths, ids = [], []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdecimal()):
            raise DataError(f"{path} line {number}: expected 'relative/path label' with a label >= 0, got {line!r}")
        paths.append(fields[0])
        ids.append(int(fields[1]))
    if not paths:
        raise DataError(f"{path}: no 'relative/path label' lines")
    return _Listed(paths, ids, {i: str(i) for i in sorted(set(ids))})


def _read_inat_json(path: Path) -> _Listed:
    """iNaturalist's COCO-style annotations: images {id, file_name}, annotations {image_id, category_id},
    categories {id, name}; one annotation per image."""
    try:
        doc = json.loads(_read_text(path))
        files = {image["id"]: image["file_name"] for image in doc["images"]}
        labelled = [note["image_id"] for note in doc["annotations"]]
        labels = {note["image_id"]: note["category_id"] for note in doc["annotations"]}
        names = {category["id"]: str(category.get("name", category["id"])) for category in doc["categories"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not an iNaturalist annotation file (images, annotations, categories): "
                        f"{type(err).__name__} {err}") from None
    if len(labelled) != len(labels):
        repeated = sorted(i for i, n in Counter(labelled).items() if n > 1)[:3]
        raise DataError(f"{path}: image id(s) {repeated} have more than one annotation; imbssl takes one label per "
                        f"image")
    if unlabelled := sorted(files.keys() - labels.keys())[:3]:
        raise DataError(f"{path}: image id(s) {unlabelled} have no annotation (iNat's test2018.json is unlabelled: "
                        f"evaluate on val2018.json)")
    if stray := sorted(set(labels.values()) - names.keys())[:3]:
        raise DataError(f"{path}: annotations name category id(s) {stray} that are not in its categories")
    ids = sorted(files)
    return _Listed([files[i] for i in ids], [labels[i] for i in ids], names)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read list {path}: {err}") from None


def _listed_source(cfg: DataConfig, cache_dir: Path) -> tuple[str, Callable[[Allocate], _Decoded]]:
    if not cfg.path:
        raise DataError(f"data.path (the root the lists are relative to) is required when data.source is "
                        f"{cfg.source!r}")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"{cfg.source} root folder not found: {root}")
    read = _read_file_list if cfg.source == "filelist" else _read_inat_json
    lists = {split: root / Path(name).expanduser() for split, name in zip(SPLITS, (cfg.train_list, cfg.test_list))}
    listed = {split: read(path) for split, path in lists.items()}
    files = {split: _listed_files(root, lists[split], listed[split].paths) for split in SPLITS}
    key = cache_key(cfg.source, _lists_digest([(lists[split], files[split]) for split in SPLITS], cache_dir),
                    **_size_options(cfg))
    return key, lambda allocate: _decode_listed(listed, files, lists, cfg.image_size, cfg.resize, allocate)


def _lists_digest(lists: list[tuple[Path, list[_File]]], cache_dir: Path) -> str:
    """The content of lists and of the files they list, hashed from each list and each file's (size, mtime), not a
    walk of the whole root."""
    stamps = hashlib.sha256()
    for listing, files in lists:
        stamps.update(file_digest(listing, cache_dir).encode())
        for f in files:
            st = f.data.stat()
            stamps.update(f"{'/'.join(f.parts)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())  # moves keep the key
    return stamps.hexdigest()


def _listed_files(root: Path, listing: Path, paths: list[str]) -> list[_File]:
    """The listed images under ``root``; a path outside it (absolute, '..') or a missing file is refused."""
    files = []
    for rel in paths:
        full = root.joinpath(*_safe_parts(rel, listing))
        if not full.is_file():
            raise DataError(f"{listing}: image {rel} not found under {root}")
        files.append(_File(tuple(PurePosixPath(rel).parts), full, str(full)))
    return files


def _decode_listed(listed: dict[str, _Listed], files: dict[str, list[_File]], lists: dict[str, Path],
                   image_size: int | None, resize: str, allocate: Allocate) -> _Decoded:
    """Class ids -> indices in sorted id order; every class needs images in both splits, as in an ImageFolder."""
    names = listed["train"].names
    ids = sorted(names)
    index = {class_id: i for i, class_id in enumerate(ids)}
    for split in SPLITS:
        present = set(listed[split].class_ids)
        if stray := sorted(present - names.keys())[:3]:
            raise DataError(f"{lists[split]}: class id(s) {stray} are not among the train list's classes")
        if empty := [i for i in ids if i not in present][:3]:
            raise DataError(f"{lists[split]}: class id(s) {empty} have no image; every class needs images in the "
                            f"train and test lists")
    images = _decode_images(files["train"] + files["test"], image_size, resize, allocate)
    labels = np.array([index[i] for split in SPLITS for i in listed[split].class_ids], dtype=np.int64)
    return _Decoded(images, labels, len(files["train"]), tuple(names[i] for i in ids))


# -------------------------------------------------------------------------------- unlabelled images


def _images_source(cfg: DataConfig, cache_dir: Path) -> tuple[str, Callable[[Allocate], _Decoded]]:
    root = _images_root(cfg)
    if cfg.train_list:
        content = _lists_digest([_images_list(cfg, root)], cache_dir)
    else:
        content = folder_digest(root) if root.is_dir() else file_digest(root, cache_dir)
    # unreadable: an entry built with skip, which left images out, must not serve a refuse run
    key = cache_key("images", content, **_size_options(cfg), unreadable=cfg.unreadable)
    return key, lambda allocate: _decode_unlabelled(_image_files(cfg), cfg, allocate)


def _images_root(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise DataError("data.path is required when data.source is 'images'")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(f"images path not found: {root}")
    if cfg.train_list and not root.is_dir():
        raise DataError(f"data.train_list names images under a folder, and data.path {root} is not a folder")
    return root


def _images_list(cfg: DataConfig, root: Path) -> tuple[Path, list[_File]]:
    """``data.train_list`` (relative to ``root`` unless absolute) and the files it lists, in its order."""
    listing = root / Path(cfg.train_list).expanduser()
    paths = _read_train_order(listing, "data.train_list")
    return listing, _listed_files(root, listing, ["/".join(parts) for parts in paths.members])


def _image_files(cfg: DataConfig) -> list[_File]:
    """The images source's files: ``data.train_list``'s, or every image of the folder or tar sorted by path."""
    root = _images_root(cfg)
    if cfg.train_list:
        return _images_list(cfg, root)[1]
    listing = _tar_files(root) if root.is_file() else _folder_files(root)
    if not listing.files:
        where = "archive" if root.is_file() else "folder"
        found = (f"no image files among its {len(listing.others):,} files (e.g. {listing.others[0]})" if listing.others
                 else f"no files at all (an empty {where})")
        raise DataError(f"{root}: {found}; data.source images reads files ending in "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))} in any layout, hidden ones excluded")
    return sorted(listing.files, key=lambda f: f.parts)


def _decode_unlabelled(files: list[_File], cfg: DataConfig, allocate: Allocate) -> _Decoded:
    """Every image "train" and unlabelled; with ``data.unreadable: skip``, the ones PIL cannot read are left out,
    each logged, and named in the entry."""
    skipped: list[str] = []

    def skip(err: UnreadableImage) -> None:
        log.warning("%s; left out (data.unreadable=skip)", err)
        skipped.append(err.name)

    try:
        images = _decode_images(files, cfg.image_size, cfg.resize, allocate, skip if cfg.unreadable == "skip" else None)
    except UnreadableImage as err:
        raise DataError(f"{err}; set data.unreadable=skip to leave such images out (each is logged and listed in the "
                        f"run's skipped_images.txt)") from None
    kept = len(files) - len(skipped)
    return _Decoded(images, np.full(kept, UNLABELLED, dtype=np.int64), kept, (), tuple(skipped))


@dataclass(frozen=True)
class ImagesSummary:
    """The images source as ``imbssl data describe`` tells it, from the image headers alone (nothing is decoded or
    cached)."""

    root: Path
    sizes: Counter  # (width, height) -> images
    modes: Counter  # PIL mode -> images
    unreadable: list[UnreadableImage]
    stored: tuple[int, int, int] | str  # (height, width, channels) in the decode cache, or why they cannot be stored
    cache_free: int  # bytes free on the decode cache's disk

    @property
    def count(self) -> int:
        return sum(self.sizes.values())


def describe_images(cfg: DataConfig) -> ImagesSummary:
    """Count, sizes and modes of the images source's images, and the ones PIL cannot read."""
    unreadable: list[UnreadableImage] = []
    headers = _read_headers(_image_files(cfg), unreadable.append)
    try:
        stored: tuple[int, int, int] | str = _stored_shape(headers, cfg.image_size)
    except DataError as err:
        stored = str(err)
    return ImagesSummary(Path(cfg.path).expanduser(), Counter(h.size for h in headers),
                         Counter(h.mode for h in headers), unreadable, stored,
                         free_bytes(Path(cfg.cache_dir).expanduser()))
