"""Experiment II of the offline-clustering paper (Table 3): SimSiam+C+D and SimSiam+D against the baselines.

    SimSiam+C+D   the offline-clustering pipeline (pipelines/offline_clustering.py) with K clusters
    SimSiam+D     the same pipeline with K = 1: distillation from the base and one expert trained on
                  all of D, so whatever it gains over SimSiam comes without clustering; its base stage
                  is +C+D's, copied
    baselines     experiment I's SimCLR and SimSiam runs (its grid runner), on the same subsets, seeds
                  and run settings; reused from an experiment I report folder when one is given

The pipelines run on the imbalanced subsets; the balanced rs. rows carry the baselines for
reference, as in the paper. Every model is evaluated with experiment I's protocol.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from imbssl.config import OfflineClusteringConfig, OfflineClusteringSettings
from imbssl.engine.distributed import require_one_process
from imbssl.pipelines.evaluate import EVAL_FILE, evaluate_run
from imbssl.pipelines.offline_clustering import BUDGET_FILE, run_pipeline
from imbssl.pipelines.pretrain import BACKBONE_FILE, SUMMARY_FILE
from imbssl.recipes.experiment_1 import METHOD_NAMES as EXPERIMENT_1_NAMES
from imbssl.recipes.experiment_1 import (PAPER_LEFT_OUT, PAPER_SETTING, Experiment1Config, NamedSubset, by_seed,
                                         describe_compute, describe_source, metric_cell, paper_subsets, run_grid,
                                         shows_paper_columns, subset_titles, thirds_table)
from imbssl.report import format_mean_std, markdown_table, paired_difference, plot_per_class_accuracy

# Table 3 of the paper: linear top-1 (%), 300 epochs in all, ResNet-18.
PAPER_TABLE_3 = {
    "imbalanced-p10": {"simclr": 66.52, "simsiam": 81.16, "simsiam+c+d": 83.35, "simsiam+d": 80.98},
    "imbalanced-p100": {"simclr": 62.18, "simsiam": 68.54, "simsiam+c+d": 69.62, "simsiam+d": 68.21},
    "balanced-rs-p10": {"simclr": 71.25, "simsiam": 87.14},
    "balanced-rs-p100": {"simclr": 69.82, "simsiam": 79.23},
}
VARIANTS = ("simsiam+c+d", "simsiam+d")
METHOD_NAMES = {**EXPERIMENT_1_NAMES, "simsiam+c+d": "SimSiam+C+D", "simsiam+d": "SimSiam+D"}


class Experiment2Config(Experiment1Config):
    """A preset: experiment I's grid for the baselines plus the pipeline settings and where the pipelines run.

    The presets take ``base`` and ``seeds`` from experiment I's preset of the same name (``base_from``),
    so the baselines are experiment I's runs and an experiment I report folder can supply them.
    """

    subsets: list[NamedSubset] = Field(default_factory=lambda: [s for s in paper_subsets() if s.key in PAPER_TABLE_3])
    pipeline: OfflineClusteringSettings = OfflineClusteringSettings()
    pipeline_subsets: list[str] = Field(["imbalanced-p10", "imbalanced-p100"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "Experiment2Config":
        if unknown := set(self.pipeline_subsets) - {s.key for s in self.subsets}:
            raise ValueError(f"pipeline_subsets {sorted(unknown)} are not among the subsets")
        return self

    def pipeline_config(self, subset: NamedSubset, variant: str, seed: int) -> OfflineClusteringConfig:
        """SimSiam's experiment I run settings as the pipeline's base; "+D" is the pipeline with K = 1."""
        name = f"{subset.key}/{variant}/seed{seed}"
        base = self.run_config(subset, "simsiam", seed).model_copy(update={"name": name})
        k = self.pipeline.k if variant == "simsiam+c+d" else 1
        return OfflineClusteringConfig.model_validate({**self.pipeline.model_dump(), "k": k, "base": base.model_dump()})


def run_experiment(exp: Experiment2Config, out_dir: Path, baselines_dir: Path | None = None) -> list[dict]:
    """Records of every evaluated model; finished runs and pipelines are reused, interrupted ones resumed."""
    require_one_process("imbssl reproduce experiment-2 (the offline-clustering pipeline)")
    records = run_grid(exp, baselines_dir or out_dir)
    for subset in exp.subsets:
        if subset.key in exp.pipeline_subsets:
            records += [pipeline_record(exp, subset, variant, seed, out_dir) for variant in VARIANTS
                        for seed in exp.seeds]
    return records


def pipeline_record(exp: Experiment2Config, subset: NamedSubset, variant: str, seed: int, out_dir: Path) -> dict:
    """One pipeline's record for the tables, running (or resuming) it and evaluating its student first if needed."""
    cfg = exp.pipeline_config(subset, variant, seed)
    root = out_dir / "runs" / cfg.base.name
    if variant != VARIANTS[0]:
        _share_base(out_dir / "runs" / exp.pipeline_config(subset, VARIANTS[0], seed).base.name, root)
    if not (root / BUDGET_FILE).exists():
        run_pipeline(cfg, root, resume=True)
    if not (root / EVAL_FILE).exists():
        evaluate_run(root)
    budget = json.loads((root / BUDGET_FILE).read_text())
    return {"subset": subset.key, "title": subset.title, "method": variant, "seed": seed, "run_dir": str(root),
            "pretrain_wall_s": budget["wall_s"], "budget": budget,
            "hardware": json.loads((root / "distill" / SUMMARY_FILE).read_text())["hardware"],
            "clusters": json.loads((root / "divide" / "report.json").read_text()),
            **json.loads((root / EVAL_FILE).read_text())}


def _share_base(source: Path, root: Path) -> None:
    """Both variants start with the same base stage (SimSiam on D, same settings and seed): copy a finished one
    rather than train it twice. Its pretrain.json still counts its cost in the pipeline's budget."""
    if (source / "base" / BACKBONE_FILE).exists() and not (root / "base").exists():
        partial = root / ".base.tmp"  # renamed when complete: a killed copy never looks like a finished stage
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source / "base", partial)
        os.replace(partial, root / "base")


def _paper(subset: str, method: str) -> str:
    value = PAPER_TABLE_3.get(subset, {}).get(method)
    return "n/a" if value is None else f"{value:.2f}"


def _gain(records: list[dict], subset: str, method: str, over: str = "simsiam") -> str:
    """Mean ± std over seeds of the paired difference (pp) between ``method`` and ``over`` at the same seed."""
    top1 = [by_seed(records, subset, m, lambda r: r["linear"]["top1"]) for m in (method, over)]
    diffs = list(paired_difference(*top1).values())
    return format_mean_std(diffs) if diffs else "n/a"


def write_report(exp: Experiment2Config, records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md shaped like Table 3, the gains over SimSiam, the clusters, the budget, per-class figures."""
    methods = [*exp.methods, *VARIANTS]
    sizes, titles = subset_titles(exp.subsets, records)
    names = [METHOD_NAMES.get(m, m) for m in methods]
    paper = shows_paper_columns(exp.base, records)
    lines = [f"# Experiment II on {describe_source(exp.base)}: linear top-1 (%), mean ± std over "
             f"{len(exp.seeds)} seed(s)", "", f"Command: `{command}`", "", exp.protocol(), ""]
    if not paper:
        lines += [PAPER_LEFT_OUT.format(source=describe_source(exp.base)), ""]
    rows = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, "linear.top1") for m in methods]
            + ([_paper(k, m) for m in methods] if paper else []) for k in titles]
    lines += [markdown_table(["Subset", "N", *names, *(f"{PAPER_SETTING}: {n}" for n in names if paper)], rows), "",
              "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
              thirds_table(records, titles, sizes, methods, METHOD_NAMES), ""]
    rows = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, "knn20.top1") for m in methods] for k in titles]
    lines += ["## k-NN (k=20) top-1", "", markdown_table(["Subset", "N", *names], rows), ""]

    pipelined = [k for k in titles if k in exp.pipeline_subsets]
    rows = [[titles[k], _gain(records, k, "simsiam+c+d"), _gain(records, k, "simsiam+d")]
            + ([f"{PAPER_TABLE_3[k]['simsiam+c+d'] - PAPER_TABLE_3[k]['simsiam']:+.2f}"] if paper else [])
            for k in pipelined]
    lines += ["## Gain over SimSiam (pp, linear top-1): paired by seed, mean ± std of the differences", "",
              markdown_table(["Subset", "SimSiam+C+D", "SimSiam+D", *([f"{PAPER_SETTING}: SimSiam+C+D"] if paper
                                                                      else [])], rows), ""]
    rows = [[titles[k], str(next(r["clusters"]["sizes"] for r in records
                                 if r["subset"] == k and r["method"] == "simsiam+c+d")),
             metric_cell(records, k, "simsiam+c+d", "clusters.purity"),
             metric_cell(records, k, "simsiam+c+d", "clusters.nmi")] for k in pipelined]
    lines += [f"## Clusters of the divide stage (K={exp.pipeline.k}; labels only judge them)", "",
              markdown_table(["Subset", "sizes (first seed)", "purity", "NMI"], rows), ""]
    lines += [_describe_budget(exp, records), "", describe_compute(records)]

    classes = records[0]["classes"]
    for k in pipelined:
        per_class = {METHOD_NAMES[m]: np.mean([[r["linear"]["per_class"][c] for c in classes] for r in records
                                               if r["subset"] == k and r["method"] == m], axis=0).tolist()
                     for m in ("simsiam", *VARIANTS)}
        plot_per_class_accuracy(per_class, classes, out_dir / f"per_class_accuracy-{k}.png",
                                title=f"Linear top-1 per class on {titles[k]}, mean over {len(exp.seeds)} seed(s)")
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def _describe_budget(exp: Experiment2Config, records: list[dict]) -> str:
    """The pipelines' images seen per stage, in epochs over D, beside the baselines' epochs."""
    budgets = [r["budget"] for r in records if r["method"] in VARIANTS]
    epochs = {stage: np.mean([b["epochs_of_D"][stage] for b in budgets]) for stage in budgets[0]["epochs_of_D"]}
    stages = ", ".join(f"{stage} {value:.2f}" for stage, value in epochs.items())
    baseline = exp.run_config(exp.subsets[0], "simsiam", exp.seeds[0]).optim.epochs
    return (f"Budget in images seen / N (epochs over D): {stages}, total {sum(epochs.values()):.2f} "
            f"(settings {exp.pipeline.epochs.base} + {exp.pipeline.epochs.expert} + {exp.pipeline.epochs.distill}; "
            f"full batches only), against {baseline} epochs for each baseline.")
