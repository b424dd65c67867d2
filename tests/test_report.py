"""Tests of imbssl.report: mean ± std formatting, Markdown tables and PNG figures."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from imbssl.eval import accuracy_report
from imbssl.recipes.experiment_1 import Experiment1Config, paper_subsets, write_report
from imbssl.report import (format_mean_std, markdown_table, mean_std, paired_difference, plot_class_distributions,
                           plot_per_class_accuracy, verdict)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_std_uses_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([81.16]) == (81.16, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_difference_pairs_by_seed_and_skips_missing_sides():
    ours, theirs = {0: 52.0, 1: 50.5, 2: None, 3: 49.0}, {0: 51.0, 1: 51.0, 2: 50.0, 4: 48.0}
    assert paired_difference(ours, theirs) == {0: 1.0, 1: -0.5}  # seed 2 has no value of ours, 3 and 4 no pair


def test_verdict_counts_seed_stds():
    assert verdict({0: 2.0, 1: 2.2}) == "+2.10 ± 0.14 points (14.8 seed stds): holds"
    assert verdict({0: -2.0, 1: -2.2}).endswith("the opposite holds")
    assert verdict({0: 1.0, 1: -0.4}) == "+0.30 ± 0.99 points (0.3 seed stds): not shown at this scale"
    assert verdict({0: 1.0}) == "+1.00 points (one seed: no std, not shown)"
    assert verdict({}) == "not measured"


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
    path = plot_class_distributions(counts, names, tmp_path / "figs" / "dist.png", title="t")
    assert path == tmp_path / "figs" / "dist.png" and _is_png(path)


def test_plot_per_class_accuracy(tmp_path):
    names = ["a", "b", "c", "d"]
    acc = {"SimSiam p=100": [90.0, 70.0, None, 20.0], "SimSiam rs.12K": [80.0, 79.0, 78.0, 77.0]}
    with_counts = plot_per_class_accuracy(acc, names, tmp_path / "acc.png", train_counts=[500, 100, 50, 10], title="t")
    without = plot_per_class_accuracy(acc, names, tmp_path / "acc_plain.png", title="t")
    assert _is_png(with_counts) and _is_png(without)


# -- experiment I's report ------------------------------------------------------------------------
CLASSES = [f"c{i}" for i in range(10)]
P10_COUNTS = [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
P100_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _record(subset: str, method: str, seed: int, counts: list[int]) -> dict:
    """An evaluated run as run_grid returns it, with predictions right on every other test image."""
    target = np.repeat(np.arange(10), 10)
    pred = np.where(np.arange(100) % 2 == seed % 2, target, (target + 1) % 10)
    report = accuracy_report(pred, target, np.array(counts), CLASSES)
    return {"subset": subset, "title": "t", "method": method, "seed": seed, "run_dir": f"r/{subset}/{method}/{seed}",
            "pretrain_wall_s": 1.0, "hardware": "cpu", "pretrain_class_counts": counts, "classes": CLASSES,
            "linear": report, "knn20": report, "knn200": report, "wall_s": 1.0}


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_experiment_1_report_headlines_thirds_and_labels_the_paper(tmp_path, monkeypatch, source):
    titles = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.append(fig._suptitle.get_text()))
    subsets = [s for s in paper_subsets() if s.key in ("imbalanced-p10", "imbalanced-p100")]
    exp = Experiment1Config(base={"data": {"source": source}}, methods=["simsiam"], seeds=[0, 1], subsets=subsets)
    records = [_record(key, "simsiam", seed, counts) for key, counts in (("imbalanced-p10", P10_COUNTS),
                                                                         ("imbalanced-p100", P100_COUNTS))
               for seed in (0, 1)]
    table = write_report(exp, records, tmp_path, "imbssl reproduce experiment-1").read_text()
    assert ("paper, CIFAR-10, ResNet-18, 300 ep: SimSiam" in table and "81.16" in table) == (source != "digits")
    assert ("left out" in table) == (source == "digits")
    assert table.index("by thirds") < table.index("k-NN")  # the headline group split comes first
    assert "SimSiam major | SimSiam minor | SimSiam rare | SimSiam std" in table
    p10_row = next(line for line in table.split("## linear, few-shot")[1].splitlines() if "p=10" in line)
    assert "n/a (no class with < 20 images)" in p10_row  # at p=10 every class has 500 images or more
    medium_p10 = next(line for line in table.split("## linear, medium-shot")[1].splitlines() if "p=10" in line)
    assert "n/a (no class with 20-100 images)" in medium_p10
    assert titles and all(titles), titles  # every figure says what it shows
    assert any("mean over 2 seed(s)" in t and "SimSiam" in t for t in titles)
