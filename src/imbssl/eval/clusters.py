"""How well unsupervised clusters follow the classes: sizes, purity and NMI; and how unequal a partition's sizes
are, which needs no labels.

Labels are only read here, to judge a clustering after the fact; no training step ever sees them.

    purity = 1/N sum_k max_c n_kc          (n_kc: images of class c in cluster k)
    NMI    = I(clusters; classes) / mean(H(clusters), H(classes))   (arithmetic mean, scikit-learn's default)
    relative size of cluster k = (n_k / N) / t_k   (t_k: its target share, 1/K when balanced; ExCB Fig. 4c, 5)

    imbalance          = max_k n_k / min_k n_k over the non-empty groups (rho of a long-tailed set)
    effective number   = exp(H(p)),  H(p) = -sum_k p_k log p_k,  p_k = n_k / N   (Hill's number of order 1)
    normalised entropy = H(p) / log K
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from imbssl.cluster import kmeans
from imbssl.configbase import ConfigError


def contingency(assignments: np.ndarray, labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """[k, C] counts n_kc of class c in cluster k."""
    table = np.zeros((k, num_classes), dtype=np.int64)
    np.add.at(table, (assignments, labels), 1)
    return table


def purity(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose class is the majority class of their cluster (1 = every cluster is one class)."""
    table = contingency(assignments, labels, assignments.max() + 1, labels.max() + 1)
    return float(table.max(axis=1).sum() / len(labels))


def nmi(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information between clusters and classes (0 = independent, 1 = the same partition)."""
    return float(normalized_mutual_info_score(labels, assignments))


def cluster_report(assignments: np.ndarray, k: int, labels: np.ndarray | None = None,
                   class_names: Sequence[str] | None = None) -> dict:
    """JSON-serialisable summary: sizes always; purity, NMI and per-cluster class counts when labels exist."""
    report: dict = {"k": k, "sizes": np.bincount(assignments, minlength=k).tolist()}
    if labels is not None:
        names = list(class_names) if class_names is not None else [str(c) for c in range(labels.max() + 1)]
        table = contingency(assignments, labels, k, len(names))
        report.update(purity=purity(assignments, labels), nmi=nmi(assignments, labels),
                      class_counts=[dict(zip(names, row.tolist())) for row in table])
    return report


def relative_sizes(assignments: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each cluster's share of the assignments over its target share: 1 is on target, 0 empty (Fig. 4c, 5)."""
    return np.bincount(assignments, minlength=len(target)) / len(assignments) / target


def cluster_statistics(assignments: np.ndarray, target: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """The extreme relative sizes, the number of empty clusters, and purity and NMI when labels are known."""
    relative = relative_sizes(assignments, target)
    stats = {"cluster_size_min": float(relative.min()), "cluster_size_max": float(relative.max()),
             "empty_clusters": int((relative == 0).sum())}
    if labels is not None:
        stats.update(purity=purity(assignments, labels), nmi=nmi(assignments, labels))
    return stats


def size_profile(sizes: np.ndarray) -> dict:
    """The sizes n_k of K groups, largest first, and how unequal they are (the module's formulas)."""
    sizes = np.sort(np.asarray(sizes, dtype=np.int64))[::-1]
    filled = sizes[sizes > 0]
    shares = filled / filled.sum()
    entropy = float(-(shares * np.log(shares)).sum())
    return {"sorted_sizes": sizes.tolist(), "imbalance": float(filled[0] / filled[-1]),
            "effective_number": float(np.exp(entropy)), "normalised_entropy": float(entropy / np.log(len(sizes))),
            "empty": int((sizes == 0).sum())}


def check_cluster_count(k: int, num_images: int) -> None:
    """The feature clusters' k-means needs an image per cluster at least."""
    if num_images < k:
        raise ConfigError(f"eval.feature_clusters.k={k}: more clusters than the {num_images} pre-training images; "
                          f"set it lower")


def feature_clusters(features: np.ndarray | torch.Tensor, k: int, seed: int, labels: np.ndarray | None = None,
                     num_classes: int = 0) -> dict:
    """Spherical k-means of ``features`` (cosine: l2-normalised) into ``k`` clusters, and the size profile of the
    clusters; with ``labels``, that of the ``num_classes`` classes beside it, and NMI and purity."""
    check_cluster_count(k, len(features))
    assignments = kmeans(features, k, spherical=True, seed=seed).assignments
    report = {"k": k, "seed": seed, "images": len(assignments),
              "clusters": size_profile(np.bincount(assignments, minlength=k))}
    if labels is not None:
        report.update(classes=size_profile(np.bincount(labels, minlength=num_classes)), nmi=nmi(assignments, labels),
                      purity=purity(assignments, labels))
    return report
