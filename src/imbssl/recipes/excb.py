"""ExCB against two baselines on the same long-tailed images, plus a K ablation: ``imbssl reproduce excb``.

Three variants of one method (methods/excb.py), differing only in how the teacher avoids collapse:

    ExCB             the balancing operator B on the EMA cluster sizes (the paper)
    no balancing     nothing: the teacher is free to pile the images into a few clusters
    DINO centring    the teacher's similarities minus an EMA of their batch mean, no explicit sizes

They run on CIFAR-10-LT p=100 and p=10 and on balanced rs.12K with experiment I's protocol and epoch
budget, so their numbers sit beside SimSiam and SimCLR there. The K ablation repeats ExCB at several K
on one subset; its run at the grid's K is the grid's own.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imbssl.config import deep_merge
from imbssl.recipes.grid import Cell, CellRecord, Results
from imbssl.recipes.subsets import NamedSubset, SubsetGrid, paper_subsets
from imbssl.report import markdown_table, plot_cluster_sizes

VARIANTS = {"excb": {"method": {"name": "excb"}},
            "excb-no-balancing": {"method": {"name": "excb", "balancing": "none"}},
            "dino-centering": {"method": {"name": "excb", "balancing": "centering"}}}
SUBSETS = ("imbalanced-p100", "imbalanced-p10", "balanced-rs-p100")
#: the K ablation's runs other than the grid's K: excb-K128, ...
ABLATION_RUN = re.compile(r"excb-K(\d+)")

#: (figure of a run's record, column title): accuracy, the final clustering (evaluate, Fig. 5) and the
#: teacher's assignments during the last epoch (training, Fig. 4).
CLUSTER_COLUMNS = [
    (lambda c: c.eval.linear.top1, "linear top-1"),
    (lambda c: c.eval.knn[20].top1 if 20 in c.eval.knn else None, "k-NN (k=20)"),
    (lambda c: c.eval.clusters.empty_clusters, "empty (final)"),
    (lambda c: c.eval.clusters.cluster_size_max, "largest (final)"),
    (lambda c: c.eval.clusters.purity, "purity"), (lambda c: c.eval.clusters.nmi, "NMI"),
    (lambda c: c.pretrain.figure("teacher_confidence"), "c_avg"),
    (lambda c: c.pretrain.figure("view_agreement"), "a_avg"),
    (lambda c: c.pretrain.figure("cluster_size_min"), "smallest (train)"),
    (lambda c: c.pretrain.figure("cluster_size_max"), "largest (train)"),
    (lambda c: c.pretrain.figure("empty_clusters"), "empty (train)"),
]
SIZES_NOTE = ("Sizes are relative to the target size N/K (1 = on target). Final: the teacher's most similar centroid "
              "for every pre-training image, without balancing (`imbssl evaluate`, paper Fig. 5). Train: its "
              "assignments of the global views during the last epoch (Fig. 4c). c_avg and a_avg: Eq. 11 and 12, "
              "averaged over that epoch. Purity and NMI: of the final clustering against the labels.")


class KAblation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subset: str = "imbalanced-p100"
    num_clusters: list[int] = Field(min_length=3)


class ExcbExperimentConfig(SubsetGrid):
    """A preset file: the pre-training grid over ExCB's variants (``method_settings`` by name) and the K ablation."""

    NAME: ClassVar[str] = "excb"
    PRESETS: ClassVar[str] = "experiment-excb"
    TITLE: ClassVar[str] = "ExCB and its baselines"
    BUILT_IN: ClassVar[dict[str, dict]] = VARIANTS

    methods: list[str] = Field(list(VARIANTS), min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    subsets: list[NamedSubset] = Field(default_factory=lambda: [s for s in paper_subsets() if s.key in SUBSETS])
    k_ablation: KAblation | None = None

    @model_validator(mode="after")
    def _check(self) -> "ExcbExperimentConfig":
        if self.k_ablation and self.k_ablation.subset not in {s.key for s in self.subsets}:
            raise ValueError(f"k_ablation.subset {self.k_ablation.subset!r} is not one of the subsets")
        return self

    def settings(self, method: str) -> dict:
        """A K-ablation run (excb-K128) is ExCB at that K."""
        if found := ABLATION_RUN.fullmatch(method):
            return deep_merge(super().settings("excb"), {"method": {"num_clusters": int(found[1])}})
        return super().settings(method)

    def main_k(self) -> int:
        return self.run_config(self.subsets[0], "excb", self.seeds[0]).method.num_clusters

    def ablation_runs(self) -> list[str]:
        """The K ablation's variant of each K, in its order: the grid's own ExCB at the grid's K."""
        main = self.main_k()
        return ["excb" if k == main else f"excb-K{k}" for k in self.k_ablation.num_clusters] if self.k_ablation else []

    def cells(self, out_dir: Path) -> list[Cell]:
        """The grid, then the K ablation's runs at other K than the grid's."""
        cells = self.pretrain_cells(out_dir)
        if self.k_ablation:
            subset = next(s for s in self.subsets if s.key == self.k_ablation.subset)
            cells += [self.pretrain_cell(out_dir, subset, run, seed) for run in self.ablation_runs() if run != "excb"
                      for seed in self.seeds]
        return cells

    def variant_table(self, results: Results, subset: str, methods: list[str]) -> str:
        rows = [[self.label(m)] + [results.cell(metric, subset=subset, method=m) for metric, _ in CLUSTER_COLUMNS]
                for m in methods]
        return markdown_table(["variant"] + [title for _, title in CLUSTER_COLUMNS], rows)

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """Accuracy, cluster statistics per subset, the K ablation; Fig.-5-style size plots."""
        sizes, titles = self.subset_titles(results)
        lines = [self.protocol(), "", SIZES_NOTE, "", "## Linear top-1", "",
                 markdown_table(["Subset", "N", *map(self.label, self.methods)],
                                self.accuracy_rows(results, titles, sizes, self.methods)), "",
                 "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
                 self.thirds_table(results, titles, sizes, self.methods), ""]
        for key, title in titles.items():
            lines += [f"## {title}: accuracy and clusters", "", self.variant_table(results, key, self.methods), ""]
            plot_cluster_sizes(size_curves(results, key, self.methods, self.label),
                               out_dir / f"cluster_sizes-{key}.png",
                               title=f"Final relative cluster sizes on {title}, seed {self.seeds[0]}")
        if self.k_ablation:
            subset, runs = self.k_ablation.subset, self.ablation_runs()
            ks = ", ".join(str(k) for k in self.k_ablation.num_clusters)
            lines += [f"## K ablation on {titles[subset]} (K = {ks}; {self.label('excb')} is the grid's own run)", "",
                      self.variant_table(results, subset, runs), ""]
            plot_cluster_sizes(size_curves(results, subset, runs, self.label), out_dir / "cluster_sizes-k-ablation.png",
                               title=f"Final relative cluster sizes on {titles[subset]} by K, seed {self.seeds[0]}")
        return lines


def size_curves(results: Results, subset: str, methods: list[str], label) -> dict[str, list[float]]:
    """Each method's final sorted relative cluster sizes on ``subset``, from its first seed's run."""
    first: dict[str, CellRecord] = {m: results.select(subset=subset, method=m)[0] for m in methods}
    return {label(m): run.eval.clusters.sorted_relative_sizes for m, run in first.items()}
