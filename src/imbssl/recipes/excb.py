"""ExCB against two baselines on the same long-tailed images, plus a K ablation: ``imbssl reproduce excb``.

Three variants of one method (methods/excb.py), differing only in how the teacher avoids collapse:

    ExCB             the balancing operator B on the EMA cluster sizes (the paper)
    no balancing     nothing: the teacher is free to pile the images into a few clusters
    DINO centring    the teacher's similarities minus an EMA of their batch mean, no explicit sizes

They run on CIFAR-10-LT p=100 and p=10 and on balanced rs.12K with experiment I's protocol and epoch
budget (the grid runner and evaluation are experiment I's), so their numbers sit beside SimSiam and
SimCLR there. The K ablation repeats ExCB at several K on one subset.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imbssl.engine.distributed import main_only
from imbssl.pipelines.pretrain import SUMMARY_FILE
from imbssl.recipes.experiment_1 import (Experiment1Config, NamedSubset, describe_compute, describe_source,
                                         metric_cell, paper_subsets, run_grid, subset_titles, thirds_table)
from imbssl.report import markdown_table, plot_cluster_sizes

VARIANTS = {"excb": {"name": "excb"},
            "excb-no-balancing": {"name": "excb", "balancing": "none"},
            "dino-centering": {"name": "excb", "balancing": "centering"}}
SUBSETS = ("imbalanced-p100", "imbalanced-p10", "balanced-rs-p100")

#: (metric in a run's record, column title): accuracy, the final clustering (evaluate, Fig. 5) and the
#: teacher's assignments during the last epoch (training, Fig. 4).
CLUSTER_COLUMNS = [
    ("linear.top1", "linear top-1"), ("knn20.top1", "k-NN (k=20)"),
    ("clusters.empty_clusters", "empty (final)"), ("clusters.cluster_size_max", "largest (final)"),
    ("clusters.purity", "purity"), ("clusters.nmi", "NMI"),
    ("training.teacher_confidence", "c_avg"), ("training.view_agreement", "a_avg"),
    ("training.cluster_size_min", "smallest (train)"), ("training.cluster_size_max", "largest (train)"),
    ("training.empty_clusters", "empty (train)"),
]
SIZES_NOTE = ("Sizes are relative to the target size N/K (1 = on target). Final: the teacher's most similar centroid "
              "for every pre-training image, without balancing (`imbssl evaluate`, paper Fig. 5). Train: its "
              "assignments of the global views during the last epoch (Fig. 4c). c_avg and a_avg: Eq. 11 and 12, "
              "averaged over that epoch. Purity and NMI: of the final clustering against the labels.")


class KAblation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subset: str = "imbalanced-p100"
    num_clusters: list[int] = Field(min_length=3)


class ExcbExperimentConfig(Experiment1Config):
    """A preset file: experiment I's grid over ``variants`` of ExCB (method settings by name), and the K ablation."""

    methods: list[str] = list(VARIANTS)
    seeds: list[int] = [0]
    subsets: list[NamedSubset] = Field(default_factory=lambda: [s for s in paper_subsets() if s.key in SUBSETS])
    variants: dict[str, dict] = Field(default_factory=lambda: dict(VARIANTS))
    k_ablation: KAblation | None = None

    @model_validator(mode="after")
    def _check(self) -> "ExcbExperimentConfig":
        if unknown := set(self.methods) - set(self.variants):
            raise ValueError(f"methods {sorted(unknown)} are not among the variants {sorted(self.variants)}")
        if self.k_ablation and self.k_ablation.subset not in {s.key for s in self.subsets}:
            raise ValueError(f"k_ablation.subset {self.k_ablation.subset!r} is not one of the subsets")
        return self

    def method_section(self, method: str) -> dict:
        return self.variants[method]

    def ablation_grid(self) -> "ExcbExperimentConfig":
        """ExCB at each K of the ablation on its subset; the run at the main grid's K is the main grid's own."""
        subset = next(s for s in self.subsets if s.key == self.k_ablation.subset)
        main_k = self.run_config(subset, "excb", self.seeds[0]).method.num_clusters
        variants = {("excb" if k == main_k else f"excb-K{k}"): {**self.variants["excb"], "num_clusters": k}
                    for k in self.k_ablation.num_clusters}
        return self.model_copy(update={"subsets": [subset], "methods": list(variants), "variants": variants,
                                       "k_ablation": None})


def run_experiment(exp: ExcbExperimentConfig, out_dir: Path, command: str) -> Path:
    """Train and evaluate the grid and the K ablation (finished runs are reused); returns table.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = run_grid(exp, out_dir)
    ablation = exp.ablation_grid() if exp.k_ablation else None
    ablation_records = run_grid(ablation, out_dir) if ablation else []
    for record in records + ablation_records:
        record["training"] = json.loads((Path(record["run_dir"]) / SUMMARY_FILE).read_text())
    return write_report(exp, records, ablation, ablation_records, out_dir, command)


def _variant_table(records: list[dict], subset: str, methods: list[str]) -> str:
    rows = [[m] + [metric_cell(records, subset, m, metric) for metric, _ in CLUSTER_COLUMNS] for m in methods]
    return markdown_table(["variant"] + [title for _, title in CLUSTER_COLUMNS], rows)


def _size_curves(records: list[dict], subset: str, methods: list[str]) -> dict[str, list[float]]:
    """Each method's final sorted relative cluster sizes on ``subset``, from its first seed's run."""
    first_runs = {m: next(r for r in records if r["subset"] == subset and r["method"] == m) for m in methods}
    return {m: run["clusters"]["sorted_relative_sizes"] for m, run in first_runs.items()}


@main_only
def write_report(exp: ExcbExperimentConfig, records: list[dict], ablation: ExcbExperimentConfig | None,
                 ablation_records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md (accuracy, cluster statistics per subset, K ablation), Fig.-5-style size plots, results.json."""
    sizes, titles = subset_titles(exp.subsets, records)
    accuracy = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, "linear.top1") for m in exp.methods]
                for k in titles]
    lines = [f"# ExCB and its baselines on {describe_source(exp.base)}: mean ± std over {len(exp.seeds)} seed(s)", "",
             f"Command: `{command}`", "", exp.protocol(), "", SIZES_NOTE, "",
             "## Linear top-1", "", markdown_table(["Subset", "N"] + exp.methods, accuracy), "",
             "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
             thirds_table(records, titles, sizes, exp.methods, {}), ""]
    for key, title in titles.items():
        lines += [f"## {title}: accuracy and clusters", "", _variant_table(records, key, exp.methods), ""]
        plot_cluster_sizes(_size_curves(records, key, exp.methods), out_dir / f"cluster_sizes-{key}.png",
                           title=f"Final relative cluster sizes on {title}, seed {exp.seeds[0]}")
    if ablation:
        subset = ablation.subsets[0].key
        ks = ", ".join(str(k) for k in exp.k_ablation.num_clusters)
        lines += [f"## K ablation on {titles[subset]} (K = {ks}; `excb` is the main grid's K)", "",
                  _variant_table(ablation_records, subset, ablation.methods), ""]
        plot_cluster_sizes(_size_curves(ablation_records, subset, ablation.methods),
                           out_dir / "cluster_sizes-k-ablation.png",
                           title=f"Final relative cluster sizes on {titles[subset]} by K, seed {exp.seeds[0]}")
    lines += [describe_compute(list({r["run_dir"]: r for r in records + ablation_records}.values()))]
    (out_dir / "results.json").write_text(json.dumps({"grid": records, "k_ablation": ablation_records}, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table
