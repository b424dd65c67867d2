"""Long-tailed and balanced subsets of a training pool, reproducible from a seed.

Counts are computed per class *rank* (rank 0 = head) and then assigned to class indices,
either in index order or through a seeded permutation, so the same profile can be laid over
different head classes. Images are drawn per class from a seeded generator; the result is a
sorted index array that can be saved and shared (``save_indices``) to reuse a split exactly.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from imbssl.config import SubsetConfig, UnlabeledConfig
from imbssl.data.sources import DataError
from imbssl.errors import naming_the_file

log = logging.getLogger(__name__)

# Independent random streams per purpose, so toggling ``permute_classes`` does not change
# which images are drawn for a class with an unchanged count.
_PERMUTE_STREAM = 0
_SELECT_STREAM = 1
_UNLABELED_STREAM = 2


def exp_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """Exponential profile (Eq. 1 of the paper): ``int(n_max * p ** (-c / (C - 1)))`` for rank c.

    Truncation with ``int()`` follows the community CIFAR-10-LT code, so CIFAR-10 with
    n_max=5000 gives 20,431 images at p=10 and 12,406 at p=100. The paper prints 12,409 for
    p=100; that is a slip: truncation, rounding and ceiling give 12,406, 12,408 and 12,414.
    """
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    return np.array([int(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)],
                    dtype=np.int64)


def step_counts(n_max: int, num_classes: int, imbalance: float, minority_fraction: float) -> np.ndarray:
    """Step profile: the first ``round(C * (1 - minority_fraction))`` ranks keep ``n_max``,
    the rest get ``int(n_max / imbalance)``."""
    n_major = round(num_classes * (1.0 - minority_fraction))
    counts = np.full(num_classes, int(n_max / imbalance), dtype=np.int64)
    counts[:n_major] = n_max
    return counts


def balanced_counts(total: int, num_classes: int) -> np.ndarray:
    """``total`` spread as evenly as possible; the remainder goes one each to the first ranks."""
    counts = np.full(num_classes, total // num_classes, dtype=np.int64)
    counts[: total % num_classes] += 1
    return counts


def _rank_counts(cfg: SubsetConfig, n_max: int, num_classes: int) -> np.ndarray:
    if cfg.profile == "exp":
        return exp_counts(n_max, num_classes, cfg.imbalance)
    if cfg.profile == "step":
        return step_counts(n_max, num_classes, cfg.imbalance, cfg.minority_fraction)
    # balanced: by default as many images as the exp profile at the same p ("rs.20K", "rs.12K")
    total = cfg.total if cfg.total is not None else int(exp_counts(n_max, num_classes, cfg.imbalance).sum())
    return balanced_counts(total, num_classes)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def class_ranks(cfg: SubsetConfig, num_classes: int) -> np.ndarray:
    """``ranks[r]`` is the class index given rank r (0 = head): seeded permutation or index order."""
    if cfg.permute_classes:
        return _rng(cfg.seed, _PERMUTE_STREAM).permutation(num_classes).astype(np.int64)
    return np.arange(num_classes, dtype=np.int64)


def subset_counts(cfg: SubsetConfig, available: np.ndarray) -> np.ndarray:
    """Images to keep per class index, given the per-class ``available`` counts of the pool.

    ``n_max`` is ``cfg.head_count``, or else the smallest available count, so that a profile never asks for
    more than every class holds; a count that does not fit is an error, not a silent cap.
    """
    available = np.asarray(available, dtype=np.int64)
    if cfg.profile == "full":
        return available.copy()
    if cfg.profile == "index_file":
        raise DataError(f"the index_file profile takes its images from {cfg.index_file}, not from per-class counts")
    n_max = cfg.head_count if cfg.head_count is not None else int(available.min())
    ranked = _rank_counts(cfg, n_max, len(available))
    counts = np.empty_like(available)
    counts[class_ranks(cfg, len(available))] = ranked
    short = np.flatnonzero(counts > available)
    if short.size:
        c = int(short[0])
        raise DataError(f"subset profile {cfg.profile!r} asks for {counts[c]} images of class {c}, "
                        f"but the pool has only {available[c]}")
    if (empty := np.flatnonzero(counts == 0)).size:  # int() truncates a small tail share to nothing
        log.warning("subset profile %r leaves %d of %d classes with 0 images (class %s): raise "
                    "data.subset.head_count or lower data.subset.imbalance to keep them", cfg.profile, empty.size,
                    len(counts), ", ".join(map(str, empty)))
    return counts


def select_subset(labels: np.ndarray, cfg: SubsetConfig) -> np.ndarray:
    """Sorted int64 indices into ``labels`` realising ``subset_counts``, drawn with ``cfg.seed``.

    One seeded permutation of the pool, grouped stably by class, gives each class a random
    order; the first ``count`` of each group are kept. Same seed, same indices.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if cfg.profile == "full":
        return np.arange(len(labels), dtype=np.int64)
    if cfg.profile == "index_file":
        return read_split_file(cfg.index_file, len(labels))
    available = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
    counts = subset_counts(cfg, available)
    perm = _rng(cfg.seed, _SELECT_STREAM).permutation(len(labels))
    grouped = perm[np.argsort(labels[perm], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(available)[:-1]])
    chosen = [grouped[s : s + k] for s, k in zip(starts, counts)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_split_file(path: str | os.PathLike[str], pool_size: int) -> np.ndarray:
    """Sorted indices into a train split of ``pool_size`` images from a split file: SDCLR's and BCL's ``.npy``
    arrays, a text file of one index per line, or imbssl's own ``.npz`` / ``.json``. Indices out of range or
    repeated are an error naming the first, so a split file of another dataset or order is not silently used."""
    path = Path(path).expanduser()
    if path.suffix in (".npz", ".json"):
        indices = load_indices(path)
    else:
        if not path.is_file():
            raise DataError(f"split file not found: {path}")
        try:
            indices = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64,
                                                                                                   ndmin=1)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"cannot read split file {path}: not an array of integer indices ({err})") from None
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.size == 0 or indices.dtype.kind not in "iu":
        raise DataError(f"split file {path} does not hold a non-empty 1-D array of integer indices")
    if (bad := indices[(indices < 0) | (indices >= pool_size)]).size:
        raise DataError(f"split file {path}: index {int(bad[0])} is outside the train split's {pool_size} images "
                        f"(a split file of another dataset?)")
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"split file {path}: index {int(unique[counts > 1][0])} appears {int(counts.max())} times")
    return unique.astype(np.int64)


def unlabeled_counts(labeled_counts: np.ndarray, ranks: np.ndarray, cfg: UnlabeledConfig) -> np.ndarray:
    """D_U's count per class index: ``size_factor * |D_L|`` images spread over an exponential profile of ratio
    rho_U, ``int(total * rho_U^(-r/(C-1)) / sum_r' rho_U^(-r'/(C-1)))`` for rank r, with D_L's class ranks.

    The seed's code (``get_img_num_per_cls_unlabeled``) fixes the total, so the rho_U columns of its Table 1 differ
    in balance, not in size; at rho_U = rho the head is ``size_factor`` times D_L's head.
    """
    total, num_classes = cfg.size_factor * int(np.sum(labeled_counts)), len(labeled_counts)
    shares = cfg.imbalance ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    counts = np.empty(num_classes, dtype=np.int64)
    counts[ranks] = (total * shares / shares.sum()).astype(np.int64)
    return counts


def labeled_unlabeled_split(labels: np.ndarray, labeled: SubsetConfig, unlabeled: UnlabeledConfig,
                            reserve_per_class: int, class_names: tuple[str, ...] | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint D_L, reserved and D_U parts of one training pool, as sorted index arrays.

    D_L is ``select_subset(labels, labeled)``. The rest of each class, in an order seeded by ``labeled.seed``,
    gives first ``reserve_per_class`` images (a validation set) and then D_U's count (``unlabeled_counts``). So
    D_L and the reserve do not depend on D_U's settings, and runs that differ only in D_U share them. A class
    that cannot hold its part is an error that names it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    labeled_idx = select_subset(labels, labeled)
    num_classes = int(labels.max()) + 1
    labeled_counts = np.bincount(labels[labeled_idx], minlength=num_classes)
    wanted = unlabeled_counts(labeled_counts, class_ranks(labeled, num_classes), unlabeled)
    in_labeled = np.zeros(len(labels), dtype=bool)
    in_labeled[labeled_idx] = True
    order = _rng(labeled.seed, _UNLABELED_STREAM).permutation(len(labels))
    reserved, unlabeled_idx = [], []
    for c in range(num_classes):
        rest = order[(labels[order] == c) & ~in_labeled[order]]
        if len(rest) < reserve_per_class + wanted[c]:
            name = f" ({class_names[c]!r})" if class_names else ""
            raise DataError(f"the unlabeled part (rho_U={unlabeled.imbalance:g}, {unlabeled.size_factor:g} x "
                            f"{labeled_idx.size} images) asks for {wanted[c]} images of class {c}{name}, but the pool "
                            f"has {len(rest) - reserve_per_class} left after its {labeled_counts[c]} labeled and "
                            f"{reserve_per_class} validation images; lower data.subset.head_count or "
                            f"unlabeled.size_factor")
        reserved.append(rest[:reserve_per_class])
        unlabeled_idx.append(rest[reserve_per_class:reserve_per_class + wanted[c]])
    return labeled_idx, np.sort(np.concatenate(unlabeled_idx)), np.sort(np.concatenate(reserved))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in index meta")


def save_indices(path: str | os.PathLike[str], indices: np.ndarray, meta: dict[str, Any]) -> None:
    """Write indices plus meta (profile, counts, seed...) as ``.npz`` or ``.json``, atomically.

    Meta is stored as JSON text in both formats so the ``.npz`` loads without pickle.
    """
    path = Path(path)
    indices = np.asarray(indices, dtype=np.int64)
    meta_text = json.dumps(meta, default=_jsonable, sort_keys=True)
    if path.suffix not in (".npz", ".json"):
        raise DataError(f"index file {path} must end in .npz or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with naming_the_file(path), os.fdopen(fd, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, indices=indices, meta=np.array(meta_text))
            else:
                f.write(json.dumps({"indices": indices.tolist(), "meta": json.loads(meta_text)}).encode())
        os.chmod(tmp, 0o644)  # meant to be shared; mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_index_file(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"index file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z["indices"], json.loads(str(z["meta"]))
        blob = json.loads(path.read_text())
        return np.asarray(blob["indices"]), blob["meta"]
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        # numpy's advice on random bytes (unpickle them) must not reach the user: say what is wrong instead.
        detail = "" if "pickle" in str(err) else f" ({err})"
        raise DataError(f"cannot read index file {path}: empty, truncated or not an index file{detail}") from err


def load_indices(path: str | os.PathLike[str]) -> np.ndarray:
    """Indices written by ``save_indices``, checked to be a 1-D non-negative int64 array."""
    indices, _ = _read_index_file(Path(path))
    if indices.ndim != 1 or (indices.size and (indices.dtype.kind not in "iu" or indices.min() < 0)):
        raise DataError(f"index file {path} does not hold a 1-D array of non-negative integers")
    return indices.astype(np.int64)


def load_index_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta dict stored next to the indices (profile, counts, seed...)."""
    return _read_index_file(Path(path))[1]
