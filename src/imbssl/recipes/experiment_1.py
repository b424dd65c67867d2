"""Experiment I of the offline-clustering paper (Table 2): how class imbalance hurts SimCLR and SimSiam.

Five pre-training subsets x two methods x several seeds (recipes/subsets.py), every run evaluated with the same
protocol (pipelines/evaluate.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from imbssl.recipes.grid import Cell, Results, paper_dataset
from imbssl.recipes.subsets import SubsetGrid, is_paper_subset, linear_group
from imbssl.report import markdown_table, plot_class_distributions, plot_per_class_accuracy

#: how the paper columns are headed: what they were measured on, which is never what a CPU preset trains.
PAPER_SETTING = "paper, CIFAR-10, ResNet-18, 300 ep"
PAPER_LEFT_OUT = "The paper's figures (CIFAR-10, ResNet-18, 300 epochs) are left out: {source} is not comparable."
#: why a many/medium/few cell is empty: the standard thresholds (eval/metrics.py) leave the group without a class.
EMPTY_GROUP = {"many": "no class with > 100 images", "medium": "no class with 20-100 images",
               "few": "no class with < 20 images"}
GROUP_TITLES = {"many": "many-shot classes (> 100 images)", "medium": "medium-shot classes (20-100 images)",
                "few": "few-shot classes (< 20 images)"}

# Table 2 of the paper: linear top-1 (%) after 300 epochs, ResNet-18, batch 1024.
PAPER_TABLE_2 = {
    "imbalanced-p10": {"simclr": 66.52, "simsiam": 81.16},
    "imbalanced-p100": {"simclr": 62.18, "simsiam": 68.54},
    "balanced-rs-p10": {"simclr": 71.25, "simsiam": 87.14},
    "balanced-rs-p100": {"simclr": 69.82, "simsiam": 79.23},
    "balanced-full": {"simclr": 73.57, "simsiam": 90.40},
}


class Experiment1Config(SubsetGrid):
    """A preset file: the runs' shared config plus the grid."""

    NAME: ClassVar[str] = "experiment-1"
    PRESETS: ClassVar[str] = "experiment-1"
    TITLE: ClassVar[str] = "Experiment I"
    MEASURE: ClassVar[str] = "linear top-1 (%)"
    #: the paper's figures by subset key and method
    PAPER_TABLE: ClassVar[dict[str, dict[str, float]]] = PAPER_TABLE_2

    methods: list[str] = Field(["simclr", "simsiam"], min_length=1)

    def cells(self, out_dir: Path) -> list[Cell]:
        return self.pretrain_cells(out_dir)

    def paper_columns(self, results: Results) -> bool:
        """Table 2's figures are of CIFAR-10: they sit beside runs on CIFAR-10 alone."""
        return paper_dataset(results.cells[0].eval.classes) == "cifar10"

    def paper_value(self, key: str, method: str) -> float | None:
        """The paper's figure of ``method`` on the subset ``key``, when the grid's subset of that key is the paper's."""
        subset = next(s for s in self.subsets if s.key == key)
        return self.PAPER_TABLE.get(key, {}).get(method) if is_paper_subset(subset) else None

    def paper_figure(self, key: str, method: str) -> str:
        value = self.paper_value(key, method)
        return "n/a" if value is None else f"{value:.2f}"

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """Table 2's layout, more tables per protocol, the two figures."""
        sizes, titles = self.subset_titles(results)
        names = [self.label(m) for m in self.methods]
        lines = [self.protocol(), ""]
        header, rows = ["Subset", "N", *names], self.accuracy_rows(results, titles, sizes, self.methods)
        if self.paper_columns(results):
            header += [f"{PAPER_SETTING}: {name}" for name in names]
            rows = [row + [self.paper_figure(k, m) for m in self.methods] for row, k in zip(rows, titles)]
        else:
            lines += [PAPER_LEFT_OUT.format(source=self.source()), ""]
        lines += [markdown_table(header, rows), "",
                  "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
                  self.thirds_table(results, titles, sizes, self.methods), ""]
        tables = [(lambda cell, k=k: cell.eval.knn[k].top1 if k in cell.eval.knn else None, f"k-NN (k={k}) top-1")
                  for k in self.eval_settings().knn_k]
        for metric, title in tables:
            lines += [f"## {title}", "", markdown_table(["Subset", "N", *names],
                                                        self.accuracy_rows(results, titles, sizes, self.methods,
                                                                           metric)), ""]
        for group, title in GROUP_TITLES.items():
            rows = [[titles[k], f"{sizes[k]:,}"] + [group_cell(results, k, m, group) for m in self.methods]
                    for k in titles]
            lines += [f"## linear, {title}", "", markdown_table(["Subset", "N", *names], rows), ""]
        self.draw_figures(results, titles, out_dir)
        return lines

    def draw_figures(self, results: Results, titles: dict[str, str], out_dir: Path) -> None:
        """distributions.png, and per_class_accuracy-METHOD.png for each method."""
        classes = results.cells[0].eval.classes
        plot_class_distributions({titles[k]: results.select(subset=k)[0].eval.pretrain_class_counts for k in titles},
                                 classes, out_dir / "distributions.png",
                                 title=f"Pre-training images per class, {self.source()}")
        for m in self.methods:
            per_class = {titles[k]: np.mean([[c.eval.linear.per_class[name] for name in classes]
                                             for c in results.select(subset=k, method=m)], axis=0).tolist()
                         for k in titles}
            plot_per_class_accuracy(per_class, classes, out_dir / f"per_class_accuracy-{m}.png",
                                    title=f"Linear top-1 per class, {self.label(m)}, mean over {len(self.seeds)} "
                                          f"seed(s), {self.source()}")


def group_cell(results: Results, subset: str, method: str, group: str) -> str:
    """Mean ± std of the probe's accuracy on a many/medium/few group, or "n/a" with the reason: no class in it."""
    cell = results.cell(linear_group(group), subset=subset, method=method)
    return f"n/a ({EMPTY_GROUP[group]})" if cell == "n/a" else cell
