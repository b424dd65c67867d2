"""Figures: class distributions of the subsets (paper Figure 1), per-class accuracy of runs, clusters (Figure 3) and
their sizes.

Figures are drawn on ``matplotlib.figure.Figure`` objects, which render with Agg, rather than
through ``pyplot``: no global backend switch, no figure registry to leak, safe on headless machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.decomposition import PCA


def _grouped_bars(ax: Axes, series: dict[str, Sequence[float | None]], class_names: Sequence[str]) -> None:
    """One bar per (class, series), series side by side within each class slot; None draws no bar."""
    positions = np.arange(len(class_names))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
    if len(class_names) > 20:  # e.g. CIFAR-100: vertical, small names so they do not overlap
        ax.set_xticks(positions, class_names, rotation=90, fontsize=6)
    else:
        ax.set_xticks(positions, class_names, rotation=30, ha="right", rotation_mode="anchor")


def _legend(fig: Figure, handles: list, labels: list[str]) -> None:
    """Legend below the axes, where it can hide neither bars nor the title (above, it overlapped the suptitle)."""
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)


def _save(fig: Figure, path: str | Path, title: str) -> Path:
    """Title the figure with what it shows, then write it as PNG, creating the parent folder."""
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=150, bbox_inches="tight")
    return path


def _figure(num_classes: int) -> Figure:
    """A figure wide enough for ``num_classes`` bar groups, capped so 100 classes stay printable."""
    return Figure(figsize=(min(max(6.0, 0.6 * num_classes), 20.0), 4.5), layout="constrained")


def plot_class_distributions(
    counts: dict[str, Sequence[int]], class_names: Sequence[str], path: str | Path, *, title: str
) -> Path:
    """Images per class for each subset (e.g. imbalanced p=10, balanced rs.20K, balanced full)."""
    fig = _figure(len(class_names))
    ax = fig.subplots()
    _grouped_bars(ax, counts, class_names)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    _legend(fig, *ax.get_legend_handles_labels())
    return _save(fig, path, title)


def plot_per_class_accuracy(
    acc: dict[str, Sequence[float | None]],
    class_names: Sequence[str],
    path: str | Path,
    train_counts: Sequence[int] | None = None,
    *,
    title: str,
) -> Path:
    """Per-class accuracy (%) of several runs; ``train_counts`` adds a line on a twin axis to show the tail."""
    fig = _figure(len(class_names))
    ax = fig.subplots()
    _grouped_bars(ax, acc, class_names)
    ax.set_ylim(0, 100)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    handles, labels = ax.get_legend_handles_labels()
    if train_counts is not None:
        twin = ax.twinx()
        (line,) = twin.plot(np.arange(len(class_names)), train_counts, "k.--", label="train images")
        twin.set_ylabel("train images per class")
        twin.set_ylim(bottom=0)
        handles, labels = handles + [line], labels + [line.get_label()]
    _legend(fig, handles, labels)
    return _save(fig, path, title)


def plot_clusters_pca(features: np.ndarray, assignments: np.ndarray, path: str | Path,
                      labels: np.ndarray | None = None, class_names: Sequence[str] | None = None, *,
                      title: str) -> Path:
    """Features projected to 2-d by PCA, coloured by cluster (paper Figure 3) and, given labels, by class beside it."""
    points = PCA(n_components=2).fit_transform(features)
    panels = [("cluster", assignments, None)]
    if labels is not None:
        panels.append(("class", labels, class_names))
    fig = Figure(figsize=(5.0 * len(panels), 4.5), layout="constrained")
    for ax, (title, colour, names) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        for value in np.unique(colour):
            member = colour == value
            ax.scatter(points[member, 0], points[member, 1], s=2, alpha=0.5,
                       label=names[value] if names is not None else f"{title} {value}")
        ax.set_title(f"by {title}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=5, fontsize="small", frameon=False)
    return _save(fig, path, title)


def plot_cluster_sizes(sizes: dict[str, Sequence[float]], path: str | Path, *, title: str) -> Path:
    """Relative cluster sizes (share / target share), largest first, one curve per run (ExCB paper, Figure 5).

    The y axis is linear up to 1, the target, and logarithmic above, so a collapsed run's giant clusters and a
    balanced run's near-1 sizes fit one plot; empty clusters are the zeros at the right, counted in the legend.
    """
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, relative in sizes.items():
        relative = np.sort(np.asarray(relative, dtype=float))[::-1]
        ax.plot(np.arange(1, len(relative) + 1), relative, label=f"{label} ({int((relative == 0).sum())} empty)")
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8, label="target size")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("cluster, largest first")
    ax.set_ylabel("relative size")
    _legend(fig, *ax.get_legend_handles_labels())
    return _save(fig, path, title)


def plot_sorted_sizes(sizes: dict[str, Sequence[int]], path: str | Path, *, title: str) -> Path:
    """Group sizes, largest first, one curve per partition (k-means clusters, classes), on a log axis: a long tail
    is a falling line, a balanced set a flat one. Empty groups have no point; the legend counts them."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, values in sizes.items():
        values = np.sort(np.asarray(values, dtype=float))[::-1]
        ranks, filled = np.arange(1, len(values) + 1), values > 0
        empty = f", {int((~filled).sum())} empty" if not filled.all() else ""
        ax.plot(ranks[filled], values[filled], marker="o", markersize=3, label=f"{label}{empty}")
    ax.set_yscale("log")
    ax.set_xlabel("group, largest first")
    ax.set_ylabel("images")
    _legend(fig, *ax.get_legend_handles_labels())
    return _save(fig, path, title)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), each row as shares of its class, so that a tail
    class's few images read as clearly as the head's many; classes in index order, head first on CIFAR-LT."""
    confusion = np.asarray(confusion, dtype=float)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * len(class_names)), 16.0)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, label="share of the true class")
    if len(class_names) <= 20:
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(ticks, class_names)
    ax.set_xlabel("pseudo-label")
    ax.set_ylabel("true class")
    return _save(fig, path, title)


def plot_prior_fit(shares: dict[str, Sequence[float]], priors: dict[str, Sequence[float]], path: str | Path, *,
                   title: str) -> Path:
    """Each run's cluster shares, largest first (solid), beside its prior sorted the same way (dashed, same colour),
    on log scales: how far a uniform prior flattens a long tail, and whether a power law follows it. Empty
    clusters have no point on a log scale; the legend counts them."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, values in shares.items():
        values = np.asarray(values, dtype=float)
        ranks = np.arange(1, len(values) + 1)
        filled = values > 0
        (line,) = ax.plot(ranks[filled], values[filled], label=f"{label} ({int((~filled).sum())} empty)")
        ax.plot(ranks, priors[label], linestyle="--", linewidth=0.8, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster, largest first")
    ax.set_ylabel("share of the images (dashed: the prior)")
    ax.legend(fontsize="small", frameon=False, loc="lower left")
    return _save(fig, path, title)
