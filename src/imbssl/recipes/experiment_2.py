"""Experiment II of the offline-clustering paper (Table 3): SimSiam+C+D and SimSiam+D against the baselines.

    SimSiam+C+D   the offline-clustering pipeline (pipelines/offline_clustering.py) with K clusters
    SimSiam+D     the same pipeline with K = 1: distillation from the base and one expert trained on
                  all of D, so whatever it gains over SimSiam comes without clustering; its base stage
                  is +C+D's, copied
    baselines     experiment I's SimCLR and SimSiam runs, on the same subsets, seeds and run settings;
                  reused from an experiment I report folder when one is given (``baselines_from``)

The pipelines run on the imbalanced subsets; the balanced rs. rows carry the baselines for
reference, as in the paper. Every model is evaluated with experiment I's protocol.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field, model_validator

from imbssl.config import OfflineClusteringSettings
from imbssl.recipes.experiment_1 import PAPER_LEFT_OUT, PAPER_SETTING, Experiment1Config
from imbssl.recipes.grid import Cell, Results
from imbssl.recipes.subsets import NamedSubset, linear_top1, paper_subsets
from imbssl.report import markdown_table, plot_per_class_accuracy, verdict

# Table 3 of the paper: linear top-1 (%), 300 epochs in all, ResNet-18.
PAPER_TABLE_3 = {
    "imbalanced-p10": {"simclr": 66.52, "simsiam": 81.16, "simsiam+c+d": 83.35, "simsiam+d": 80.98},
    "imbalanced-p100": {"simclr": 62.18, "simsiam": 68.54, "simsiam+c+d": 69.62, "simsiam+d": 68.21},
    "balanced-rs-p10": {"simclr": 71.25, "simsiam": 87.14},
    "balanced-rs-p100": {"simclr": 69.82, "simsiam": 79.23},
}
PIPELINE, WITHOUT_CLUSTERS = "simsiam+c+d", "simsiam+d"
VARIANTS = (PIPELINE, WITHOUT_CLUSTERS)
#: what the tables call the two pipelines (in every recipe that runs them)
PIPELINE_LABELS = {PIPELINE: "SimSiam+C+D", WITHOUT_CLUSTERS: "SimSiam+D"}


def offline_clustering_cells(grid: Experiment1Config, out_dir: Path, subset: NamedSubset, seed: int,
                             settings: OfflineClusteringSettings, variants: tuple[str, ...] = VARIANTS) -> list[Cell]:
    """SimSiam+C+D (and SimSiam+D, the pipeline with K = 1 that starts from +C+D's base stage) on ``subset``."""
    cells = [grid.pipeline_cell(out_dir, subset, PIPELINE, seed, settings)]
    if WITHOUT_CLUSTERS in variants:
        cells.append(grid.pipeline_cell(out_dir, subset, WITHOUT_CLUSTERS, seed, settings.model_copy(update={"k": 1}),
                                        base_from=cells[0].run_dir / "base"))
    return cells


class Experiment2Config(Experiment1Config):
    """A preset: experiment I's grid for the baselines plus the pipeline settings and where the pipelines run.

    The presets take ``base``, ``seeds`` and ``method_settings`` from experiment I's preset of the same name
    (``base_from``), so the baselines are experiment I's runs and an experiment I report folder can supply them.
    """

    NAME: ClassVar[str] = "experiment-2"
    PRESETS: ClassVar[str] = "experiment-2"
    TITLE: ClassVar[str] = "Experiment II"
    LABELS: ClassVar[dict[str, str]] = PIPELINE_LABELS
    PAPER_TABLE: ClassVar[dict[str, dict[str, float]]] = PAPER_TABLE_3

    subsets: list[NamedSubset] = Field(default_factory=lambda: [s for s in paper_subsets() if s.key in PAPER_TABLE_3])
    pipeline: OfflineClusteringSettings = OfflineClusteringSettings()
    pipeline_subsets: list[str] = Field(["imbalanced-p10", "imbalanced-p100"], min_length=1)
    baselines_from: str | None = Field(None, description="an experiment-1 report folder of the same preset: its runs "
                                                          "are the baselines (missing ones are trained there)")

    @model_validator(mode="after")
    def _check(self) -> "Experiment2Config":
        if unknown := set(self.pipeline_subsets) - {s.key for s in self.subsets}:
            raise ValueError(f"pipeline_subsets {sorted(unknown)} are not among the subsets")
        return self

    def cells(self, out_dir: Path) -> list[Cell]:
        """The baselines (in ``baselines_from`` when given), then each pipeline subset's two variants by seed."""
        cells = self.pretrain_cells(Path(self.baselines_from) if self.baselines_from else out_dir)
        for subset in self.subsets:
            if subset.key in self.pipeline_subsets:
                cells += [cell for seed in self.seeds
                          for cell in offline_clustering_cells(self, out_dir, subset, seed, self.pipeline)]
        return cells

    def paper_gain(self, key: str) -> str:
        """The paper's gain of SimSiam+C+D over SimSiam on the subset ``key``."""
        ours, theirs = self.paper_value(key, PIPELINE), self.paper_value(key, "simsiam")
        return "n/a" if ours is None or theirs is None else f"{ours - theirs:+.2f}"

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """Table 3's layout, the gains over SimSiam, the clusters, the budget, per-class figures."""
        methods = [*self.methods, *VARIANTS]
        sizes, titles = self.subset_titles(results)
        names = [self.label(m) for m in methods]
        paper = self.paper_columns(results)
        lines = [self.protocol(), ""]
        if not paper:
            lines += [PAPER_LEFT_OUT.format(source=self.source()), ""]
        rows = [row + ([self.paper_figure(k, m) for m in methods] if paper else [])
                for row, k in zip(self.accuracy_rows(results, titles, sizes, methods), titles)]
        lines += [markdown_table(["Subset", "N", *names, *(f"{PAPER_SETTING}: {n}" for n in names if paper)], rows), "",
                  "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
                  self.thirds_table(results, titles, sizes, methods), ""]
        pipelined = [k for k in titles if k in self.pipeline_subsets]
        rows = [[titles[k], *(verdict(results.paired(linear_top1, {"subset": k, "method": m},
                                                     {"subset": k, "method": "simsiam"})) for m in VARIANTS)]
                + ([self.paper_gain(k)] if paper else [])
                for k in pipelined]
        lines += ["## Gain over SimSiam (points of linear top-1): paired by seed, with the 95% t interval", "",
                  markdown_table(["Subset", *(self.label(m) for m in VARIANTS),
                                  *([f"{PAPER_SETTING}: {self.label(PIPELINE)}"] if paper else [])], rows), ""]
        rows = [[titles[k], str(results.select(subset=k, method=PIPELINE)[0].divide.sizes),
                 results.cell(lambda c: c.divide.purity, subset=k, method=PIPELINE),
                 results.cell(lambda c: c.divide.nmi, subset=k, method=PIPELINE)] for k in pipelined]
        lines += [f"## Clusters of the divide stage (K={self.pipeline.k}; labels only judge them)", "",
                  markdown_table(["Subset", "sizes (first seed)", "purity", "NMI"], rows), "",
                  self.describe_budget(results), ""]
        self.draw_per_class(results, titles, pipelined, out_dir)
        return lines

    def describe_budget(self, results: Results) -> str:
        """The pipelines' images seen per stage, in epochs over D, beside the baselines' epochs."""
        budgets = [cell.budget for cell in results.select(kind="pipeline")]
        epochs = {stage: np.mean([b.epochs_of_D[stage] for b in budgets]) for stage in budgets[0].epochs_of_D}
        stages = ", ".join(f"{stage} {value:.2f}" for stage, value in epochs.items())
        baseline = self.run_config(self.subsets[0], "simsiam", self.seeds[0]).optim.epochs
        stage_epochs = self.pipeline.epochs
        return (f"Budget in images seen / N (epochs over D): {stages}, total {sum(epochs.values()):.2f} "
                f"(settings {stage_epochs.base} + {stage_epochs.expert} + {stage_epochs.distill}; full batches only), "
                f"against {baseline} epochs for each baseline.")

    def draw_per_class(self, results: Results, titles: dict[str, str], pipelined: list[str], out_dir: Path) -> None:
        classes = results.cells[0].eval.classes
        for k in pipelined:
            per_class = {self.label(m): np.mean([[c.eval.linear.per_class[name] for name in classes]
                                                 for c in results.select(subset=k, method=m)], axis=0).tolist()
                         for m in ("simsiam", *VARIANTS)}
            plot_per_class_accuracy(per_class, classes, out_dir / f"per_class_accuracy-{k}.png",
                                    title=f"Linear top-1 per class on {titles[k]}, mean over {len(self.seeds)} "
                                          f"seed(s)")
