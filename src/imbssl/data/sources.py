"""Image sources: scikit-learn digits, CIFAR-10/100 python archives, ImageFolder trees or tars, and
the long-tailed benchmarks' file lists (ImageNet-LT, Places-LT) and iNaturalist's annotation JSON.

Every source yields the full "train" and "test" pools as uint8 ``[N, H, W, C]`` images with
int64 labels. CIFAR and ImageFolder sources are decoded once and then served as read-only
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from imbssl.config import LISTED_SOURCES, DataConfig
from imbssl.data.cache import Allocate, cache_key, file_digest, folder_digest, load_or_build
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


class DataError(ImbsslError, RuntimeError):
    """Input data that cannot be used as given; the message names the file, folder or class."""


@dataclass(frozen=True)
class ImageSet:
    """One split: uint8 images ``[N, H, W, C]`` (C in {1, 3}, possibly a read-only memmap),
    int64 labels ``[N]`` indexing ``classes``."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"images must be uint8 [N, H, W, C] with C in (1, 3), got {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise DataError(f"labels must be int64 [{len(images)}], got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"labels outside 0..{len(self.classes) - 1}")

    def class_counts(self) -> np.ndarray:
        """Images per class index, zeros included."""
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
    else:
        key, build = _cifar_source(cfg, cache_dir)
    return _cached(cache_dir, key, build)


class _Decoded(NamedTuple):
    """Both splits of a source in one array, as the cache stores them: the first ``n_train`` rows are "train"."""

    images: np.ndarray
    labels: np.ndarray
    n_train: int
    classes: tuple[str, ...]


def _cached(cache_dir: Path, key: str, build: Callable[[Allocate], _Decoded]) -> Splits:
    """A source's decode, cached: ``images`` and ``labels`` arrays, split by ``n_train``; labels are copied into
    memory (they are small)."""

    def build_arrays(allocate: Allocate) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        start = time.perf_counter()
        decoded = build(allocate)
        log.info("decoded %s in %.1f s", key, time.perf_counter() - start)
        return ({"images": decoded.images, "labels": decoded.labels},
                {"classes": list(decoded.classes), "n_train": decoded.n_train})

    arrays, meta = load_or_build(cache_dir, key, build_arrays)
    images, labels, n, classes = arrays["images"], np.array(arrays["labels"]), meta["n_train"], tuple(meta["classes"])
    return {"train": ImageSet(images[:n], labels[:n], classes), "test": ImageSet(images[n:], labels[n:], classes)}


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


def _read_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """The ``wanted`` tar members' bytes, read in memory (nothing is extracted to disk)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                name = PurePosixPath(member.name).as_posix()
                if name in wanted and member.isfile():
                    found[name] = tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read tar archive {archive}: {err}") from err
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"{archive}: missing member(s) {', '.join(missing)}")
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
    """The pickled batches, train then test (180 MB at most: decoded in memory)."""
    members = _read_members(archive, {*spec.train_members, spec.test_member, spec.meta_member})
    meta_src = f"{archive}:{spec.meta_member}"
    meta = _unpickle(members[spec.meta_member], meta_src)
    if spec.names_key not in meta:
        raise DataError(f"{meta_src}: no {spec.names_key!r}")
    classes = tuple(str(_text(n)) for n in meta[spec.names_key])
    parts = [_cifar_batch(_unpickle(members[n], f"{archive}:{n}"), f"{archive}:{n}", spec.label_key, len(classes))
             for n in (*spec.train_members, spec.test_member)]
    n_train = sum(len(labels) for _, labels in parts[:-1])
    return _Decoded(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), n_train, classes)


# ----------------------------------------------------------------------------------- ImageFolder


class _File(NamedTuple):
    parts: tuple[str, ...]  # path relative to the folder / archive root
    data: bytes | Path  # tar members are read in memory, folder files on decode
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


def _tar_files(archive: Path) -> _Listing:
    listing = _Listing([], set())
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                parts = _safe_parts(member.name, archive)
                if member.isdir():
                    listing.folders.add(parts)
                elif member.isfile() and _is_image(parts):
                    listing.files.append(_File(parts, tf.extractfile(member).read(), f"{archive}:{member.name}"))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read tar archive {archive}: {err}") from err
    return listing


def _folder_files(root: Path) -> _Listing:
    listing = _Listing([], set())
    for dirpath, _, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        listing.folders.add(rel)
        for name in filenames:
            parts = (*rel, name)
            if _is_image(parts):
                full = Path(dirpath, name)
                listing.files.append(_File(parts, full, str(full)))
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


def _open_image(f: _File, load: bool = True) -> Image.Image:
    """The image, decoded; with ``load=False`` only its header is read (mode and size)."""
    try:
        if isinstance(f.data, Path) and not load:
            return Image.open(f.data)
        img = Image.open(io.BytesIO(f.data if isinstance(f.data, bytes) else f.data.read_bytes()))
        if load:
            img.load()
    except Image.UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise DataError(f"cannot decode image {f.name}: not in an image format PIL reads (corrupt?)") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DataError(f"cannot decode image {f.name}: {err}") from err
    return img


def _resized(img: Image.Image, size: int, resize: str) -> Image.Image:
    """``size`` x ``size``: both sides stretched, or the shorter side scaled to ``size`` and the centre kept."""
    if resize == "stretch":
        return img.resize((size, size), Image.Resampling.BILINEAR)
    scale = size / min(img.size)
    width, height = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    return img.resize((width, height), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))


def _stored_shape(files: list[_File], image_size: int | None) -> tuple[int, int, int]:
    """(height, width, channels) of the stored images, from the headers alone: one channel if every image is
    mode L, else RGB; without ``image_size`` every image must have the first one's size."""
    if not files:
        raise DataError("no images to decode")
    grey, size, first = True, None, files[0].name
    for f in files:
        with _open_image(f, load=False) as img:
            grey = grey and img.mode == "L"
            size = size or img.size
            if image_size is None and img.size != size:
                raise DataError(f"image {f.name} is {img.width}x{img.height} but {first} is {size[0]}x{size[1]}; "
                                f"set data.image_size to resize")
    width, height = (image_size, image_size) if image_size is not None else size
    return height, width, 1 if grey else 3


def _decode_images(files: list[_File], image_size: int | None, resize: str, allocate: Allocate) -> np.ndarray:
    """Decode straight into ``allocate("images", ...)`` (a memory map of the cache entry), one image at a time."""
    height, width, channels = _stored_shape(files, image_size)
    mode = "L" if channels == 1 else "RGB"
    out = allocate("images", (len(files), height, width, channels))
    for i, f in enumerate(files):
        img = _open_image(f)
        if img.mode != mode:
            img = img.convert(mode)
        if image_size is not None and img.size != (width, height):
            img = _resized(img, image_size, resize)
        if img.size != (width, height):
            raise DataError(f"cannot decode image {f.name}: it decodes to {img.width}x{img.height}, its header "
                            f"said {width}x{height}")
        out[i] = np.asarray(img).reshape(height, width, channels)
    return out


class _TrainOrder(NamedTuple):
    """An order file: line i names train image i by its path in the archive or folder."""

    path: Path
    members: list[tuple[str, ...]]  # each line's path components, unique
    digest: str  # of the file's bytes, for the cache key


def _read_train_order(path: Path) -> _TrainOrder:
    """``data.train_order``, checked line by line before anything is decoded: an empty line, a path outside the
    archive (absolute, ``..``) or a path listed twice is an error naming its line."""
    try:
        blob = path.read_bytes()
        text = blob.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data.train_order {path}: {err}") from None
    first_line: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"data.train_order {path} line {number}"
        if not line.strip():
            raise DataError(f"{where} is empty: the file lists one training image per line")
        parts = _safe_parts(line, where)
        if (first := first_line.setdefault(parts, number)) != number:
            raise DataError(f"{where}: {line} is listed on line {first} already; every training image is listed once")
    if not first_line:
        raise DataError(f"data.train_order {path} lists no image")
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
    # The key hashes the lists and the listed files' (size, mtime), not a walk of the whole root.
    stamps = hashlib.sha256()
    for split in SPLITS:
        stamps.update(file_digest(lists[split], cache_dir).encode())
        for f in files[split]:
            st = f.data.stat()
            stamps.update(f"{'/'.join(f.parts)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())  # moves keep the key
    key = cache_key(cfg.source, stamps.hexdigest(), **_size_options(cfg))
    return key, lambda allocate: _decode_listed(listed, files, lists, cfg.image_size, cfg.resize, allocate)


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
