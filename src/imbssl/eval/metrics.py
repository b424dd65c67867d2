"""Accuracy summaries for long-tailed evaluation: per class, many/medium/few shot, and thirds."""
from __future__ import annotations

from typing import Sequence

import numpy as np

THIRDS = ("major", "minor", "rare")


def _per_class_accuracy(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy (%) of each class; None for a class absent from ``target``."""
    accs: list[float | None] = []
    for cls in range(num_classes):
        mask = target == cls
        accs.append(float(np.mean(pred[mask] == cls) * 100.0) if mask.any() else None)
    return accs


def balanced_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean per-class accuracy (%) over the classes present in ``target``: top-1 as a balanced set would give it."""
    per_class = _per_class_accuracy(np.asarray(pred), np.asarray(target), int(np.max(target)) + 1)
    return float(np.mean([acc for acc in per_class if acc is not None]))


def _group_accuracy(per_class: list[float | None], members: Sequence[int]) -> float | None:
    """Mean of the members' per-class accuracies, so every class weighs the same whatever its test size."""
    values = [per_class[cls] for cls in members if per_class[cls] is not None]
    return float(np.mean(values)) if values else None


def _shot_groups(train_counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict[str, list[int]]:
    """Many (> many_threshold), medium (few_threshold..many_threshold) and few (< few_threshold) shot classes."""
    classes = np.arange(len(train_counts))
    return {
        "many": classes[train_counts > many_threshold].tolist(),
        "medium": classes[(train_counts >= few_threshold) & (train_counts <= many_threshold)].tolist(),
        "few": classes[train_counts < few_threshold].tolist(),
    }


def thirds_of_classes(train_counts: np.ndarray) -> dict[str, list[int]]:
    """Classes by descending train count (ties: lower index first) cut into three near-equal groups.

    ``np.array_split`` gives the extra classes to the first groups (10 classes -> 4, 3, 3).
    """
    order = np.argsort(-train_counts, kind="stable")
    return {name: part.tolist() for name, part in zip(THIRDS, np.array_split(order, 3))}


def accuracy_report(
    pred: np.ndarray,
    target: np.ndarray,
    train_counts: np.ndarray,
    class_names: Sequence[str],
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict:
    """JSON-serialisable accuracy summary (all accuracies in percent).

    ``top1`` is over test images; group accuracies average per-class accuracies. ``train_counts``
    are the per-class counts of the (pre-)training set that defines head and tail. Groups with
    no class (or no tested class) report None. ``thirds_std`` is the population std of the three
    thirds accuracies, the balancedness measure of the long-tailed SSL literature (SDCLR, BCL).
    ``groups`` lists the class names in each group.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    train_counts = np.asarray(train_counts)
    if pred.shape != target.shape or len(target) == 0:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be equal, non-empty shapes")
    if len(train_counts) != len(class_names):
        raise ValueError(f"{len(train_counts)} train counts for {len(class_names)} class names")
    per_class = _per_class_accuracy(pred, target, len(class_names))
    groups = {**_shot_groups(train_counts, many_threshold, few_threshold), **thirds_of_classes(train_counts)}
    group_acc = {name: _group_accuracy(per_class, members) for name, members in groups.items()}
    thirds = {name: group_acc[name] for name in THIRDS}
    present = [acc for acc in thirds.values() if acc is not None]
    return {
        "top1": float(np.mean(pred == target) * 100.0),
        "per_class": dict(zip(class_names, per_class)),
        "many": group_acc["many"],
        "medium": group_acc["medium"],
        "few": group_acc["few"],
        "thirds": thirds,
        "thirds_std": float(np.std(present)) if present else None,
        "groups": {name: [class_names[cls] for cls in members] for name, members in groups.items()},
    }
