"""Tests of imbssl.report: mean ± std formatting, Markdown tables and PNG figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from imbssl.eval import accuracy_report
from imbssl.recipes.experiment_1 import Experiment1Config
from imbssl.recipes.grid import CellRecord, Results, write_report
from imbssl.recipes.subsets import paper_subsets
from imbssl.records import EvalRecord, PretrainRecord
from imbssl.report import (format_mean_std, markdown_table, mean_std, paired_difference, plot_class_distributions,
                           plot_per_class_accuracy)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_std_uses_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([81.16]) == (81.16, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_difference_pairs_by_seed_and_skips_missing_sides():
    ours, theirs = {0: 52.0, 1: 50.5, 2: None, 3: 49.0}, {0: 51.0, 1: 51.0, 2: 50.0, 4: 48.0}
    assert paired_difference(ours, theirs) == {0: 1.0, 1: -0.5}  # seed 2 has no value of ours, 3 and 4 no pair


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
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OTHER_IMAGES = [f"c{i}" for i in range(10)]
P10_COUNTS = [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
P100_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
TRAINED = PretrainRecord.read(Path(__file__).parent / "data" / "format-0" / "pretrain.json")


def _record(subset: str, method: str, seed: int, counts: list[int], classes: list[str]) -> CellRecord:
    """An evaluated run as the grid reads it, with predictions right on every other test image."""
    target = np.repeat(np.arange(10), 10)
    pred = np.where(np.arange(100) % 2 == seed % 2, target, (target + 1) % 10)
    report = accuracy_report(pred, target, np.array(counts), classes)
    evaluated = EvalRecord(labelled_train=90, labelled_val=10, test=100, pretrain_class_counts=counts,
                           classes=classes, linear={**report, "val_top1": 50.0, "selected": {"lr": 0.1}},
                           knn={20: report, 200: report}, wall_s=1.0)
    return CellRecord(axes={"subset": subset, "method": method}, seed=seed, kind="pretrain",
                      run_dir=f"r/{subset}/{method}/{seed}", pretrain=TRAINED, eval=evaluated)


@pytest.mark.parametrize("classes", [CIFAR10, OTHER_IMAGES])
def test_experiment_1_report_headlines_thirds_and_labels_the_paper(tmp_path, monkeypatch, classes):
    titles = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.append(fig._suptitle.get_text()))
    subsets = [s for s in paper_subsets() if s.key in ("imbalanced-p10", "imbalanced-p100")]
    exp = Experiment1Config(base={"data": {"source": "imagefolder", "path": "images"}}, methods=["simsiam"],
                            seeds=[0, 1], subsets=subsets)
    records = [_record(key, "simsiam", seed, counts, classes)
               for key, counts in (("imbalanced-p10", P10_COUNTS), ("imbalanced-p100", P100_COUNTS))
               for seed in (0, 1)]
    results = Results(recipe="experiment-1", command="imbssl reproduce experiment-1", cells=records)
    table = write_report(exp, results, tmp_path).read_text()
    assert ("paper, CIFAR-10, ResNet-18, 300 ep: SimSiam" in table and "81.16" in table) == (classes == CIFAR10)
    assert ("left out" in table) == (classes != CIFAR10)  # an ImageFolder of other images: no paper column
    assert table.index("by thirds") < table.index("k-NN")  # the headline group split comes first
    assert "SimSiam major | SimSiam minor | SimSiam rare | SimSiam std" in table
    p10_row = next(line for line in table.split("## linear, few-shot")[1].splitlines() if "p=10" in line)
    assert "n/a (no class with < 20 images)" in p10_row  # at p=10 every class has 500 images or more
    medium_p10 = next(line for line in table.split("## linear, medium-shot")[1].splitlines() if "p=10" in line)
    assert "n/a (no class with 20-100 images)" in medium_p10
    assert Results.read(tmp_path) == results
    assert titles and all(titles), titles  # every figure says what it shows
    assert any("mean over 2 seed(s)" in t and "SimSiam" in t for t in titles)
