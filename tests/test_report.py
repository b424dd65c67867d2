"""Tests of imbssl.report: mean ± std formatting, Markdown tables and PNG figures."""
from __future__ import annotations

import pytest

from imbssl.report import format_mean_std, markdown_table, mean_std, plot_class_distributions, plot_per_class_accuracy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_std_uses_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([81.16]) == (81.16, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_format_mean_std():
    assert format_mean_std([80.74, 81.58]) == "81.16 ± 0.59"
    assert format_mean_std([81.16]) == "81.16"
    assert format_mean_std([1.0, 2.0, 3.0], digits=1) == "2.0 ± 1.0"
    assert format_mean_std([505]) == "505"  # counts: no decimals for one run
    assert format_mean_std([3, 4, 5]) == "4.0 ± 1.0"


def test_markdown_table():
    table = markdown_table(["Subset", "N", "SimSiam"], [["Imbalanced (p=10)", "20K", "81.16"], ["a|b", "1", "2"]])
    assert table == (
        "| Subset | N | SimSiam |\n"
        "| --- | --- | --- |\n"
        "| Imbalanced (p=10) | 20K | 81.16 |\n"
        "| a\\|b | 1 | 2 |"
    )
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]])


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_class_distributions(tmp_path):
    names = [f"c{i}" for i in range(10)]
    counts = {
        "imbalanced p=10": [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
        "balanced rs.20K": [2043] * 10,
        "balanced full": [5000] * 10,
    }
    path = plot_class_distributions(counts, names, tmp_path / "figs" / "dist.png")
    assert path == tmp_path / "figs" / "dist.png" and _is_png(path)


def test_plot_per_class_accuracy(tmp_path):
    names = ["a", "b", "c", "d"]
    acc = {"SimSiam p=100": [90.0, 70.0, None, 20.0], "SimSiam rs.12K": [80.0, 79.0, 78.0, 77.0]}
    with_counts = plot_per_class_accuracy(acc, names, tmp_path / "acc.png", train_counts=[500, 100, 50, 10])
    without = plot_per_class_accuracy(acc, names, tmp_path / "acc_plain.png")
    assert _is_png(with_counts) and _is_png(without)
