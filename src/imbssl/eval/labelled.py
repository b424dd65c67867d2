"""The paper's fine-tuning protocol: a balanced labelled set drawn from the training pool.

Every pre-trained model (imbalanced or not) is fine-tuned on a *balanced* labelled set of the
same size, so that differences in Table 2 come from pre-training alone. A per-class held-out
validation part is used for hyper-parameter / epoch selection, keeping the test set untouched.
"""
from __future__ import annotations

import numpy as np


def _per_class_quota(num_classes: int, size: int) -> np.ndarray:
    """``size // C`` per class; the ``size % C`` leftover images go one each to the first classes."""
    quota = np.full(num_classes, size // num_classes, dtype=np.int64)
    quota[: size % num_classes] += 1
    return quota


def _val_count(n: int, val_fraction: float) -> int:
    """At least one validation image per class, and at least one left for training."""
    return min(max(1, round(val_fraction * n)), n - 1)


def balanced_labelled_split(
    labels: np.ndarray, size: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a balanced labelled set of ``size`` images and split it per class into train / val.

    ``labels`` are the labels of the whole training pool; the returned indices point into it.
    Classes are the distinct label values, in ascending order. A class with fewer images than its
    quota contributes all it has (the set stays balanced rather than topping up other classes, so
    it may hold fewer than ``size`` images). Returns sorted, disjoint ``(train_idx, val_idx)``.
    """
    labels = np.asarray(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    classes, available = np.unique(labels, return_counts=True)
    quota = np.minimum(_per_class_quota(len(classes), size), available)
    if quota.min() < 2:
        raise ValueError(
            f"a labelled set of {size} images leaves fewer than 2 images for some class "
            "(need one for training and one for validation)"
        )
    rng = np.random.default_rng(seed)
    return _cut_per_class([rng.permutation(np.flatnonzero(labels == cls))[:n] for cls, n in zip(classes, quota)],
                          val_fraction)


def _cut_per_class(members: list[np.ndarray], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each class's shuffled labelled images: the first ``_val_count`` validate, the rest train; sorted
    ``(train_idx, val_idx)``."""
    cuts = [_val_count(len(m), val_fraction) for m in members]
    return (np.sort(np.concatenate([m[n:] for m, n in zip(members, cuts)])),
            np.sort(np.concatenate([m[:n] for m, n in zip(members, cuts)])))


def split_per_class(labels: np.ndarray, labelled: np.ndarray, val_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A given labelled set (a split file's) cut per class into train / val as ``balanced_labelled_split`` cuts
    the sets it draws: sorted, disjoint ``(train_idx, val_idx)`` indices into the pool."""
    labels, labelled = np.asarray(labels), np.asarray(labelled, dtype=np.int64)
    classes, counts = np.unique(labels[labelled], return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"the labelled set holds {counts.min()} image of class {classes[counts.argmin()]}: a class "
                         f"needs one to train the probe and one to validate it")
    rng = np.random.default_rng(seed)
    return _cut_per_class([rng.permutation(labelled[labels[labelled] == cls]) for cls in classes], val_fraction)


def held_out_validation(labels: np.ndarray, subset: np.ndarray, per_class: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A balanced validation set of ``per_class`` images per class for supervised training on ``subset``.

    Images of the training pool outside ``subset`` are used first, so the long-tailed training set stays
    as built (Cao et al.'s profile uses every image of the head class, so some class always lacks them);
    what a class still needs is taken out of ``subset``, at most half of that class's training images.
    Returns sorted ``(train_idx, val_idx)``, both into ``labels``.
    """
    labels, subset = np.asarray(labels), np.asarray(subset)
    rng = np.random.default_rng(seed)
    in_subset = np.zeros(len(labels), dtype=bool)
    in_subset[subset] = True
    val, taken = [], []
    for cls in np.unique(labels[subset]):
        outside = rng.permutation(np.flatnonzero((labels == cls) & ~in_subset))[:per_class]
        inside = rng.permutation(subset[labels[subset] == cls])
        missing = min(per_class - len(outside), len(inside) // 2)
        val += [outside, inside[:missing]]
        taken.append(inside[:missing])
    train = np.setdiff1d(subset, np.concatenate(taken))
    return np.sort(train), np.sort(np.concatenate(val))


def shots_per_class(spec: str, pool_size: int, num_classes: int) -> int:
    """'100-shot' -> 100; '1%' -> 1% of the training pool, spread evenly over the classes (SDCLR's 1% probe:
    5 images per class on CIFAR-100's 50k, 50 on CIFAR-10's)."""
    if spec.endswith("%"):
        return max(1, round(float(spec[:-1]) / 100 * pool_size / num_classes))
    return int(spec.removesuffix("-shot"))


def few_shot_set(labels: np.ndarray, shots: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """A balanced labelled set of ``shots`` images per class from the pool outside ``exclude`` (the validation
    part that selects the probe), so few-shot figures are never selected on their own training images.
    A class with fewer than ``shots`` images left is an error naming it, not a silently smaller class."""
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), dtype=bool)
    allowed[np.asarray(exclude, dtype=np.int64)] = False
    rng = np.random.default_rng([3, seed])  # its own stream: the full-shot split's draws stay as they were
    chosen = []
    for cls in np.unique(labels):
        candidates = np.flatnonzero((labels == cls) & allowed)
        if len(candidates) < shots:
            raise ValueError(f"a {shots}-shot labelled set needs {shots} images of class {cls}, but only "
                             f"{len(candidates)} are outside the validation part")
        chosen.append(rng.permutation(candidates)[:shots])
    return np.sort(np.concatenate(chosen))
