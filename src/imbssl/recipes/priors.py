"""Uniform against power-law cluster priors, on long-tailed and balanced images: ``imbssl reproduce priors``.

The seed ("The hidden uniform cluster prior in self-supervised learning", Assran et al. 2023) argues that the
uniform prior of MSN-like objectives fights long-tailed data, and that PMSN's power-law prior helps there
without hurting balanced data. Every comparison here changes the prior alone:

    MSN  (uniform)   against   PMSN (power law, tau)        methods/msn.py
    ExCB (uniform)   against   ExCB toward a power law      methods/excb.py, with method.prior

on a long-tailed subset and on its balanced, N-matched control, beside SimSiam and SimCLR when listed. The
grid runner and evaluation are experiment I's (the ExCB grid's variants), so the numbers sit beside them.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from imbssl.engine.distributed import main_only
from imbssl.recipes.excb import ExcbExperimentConfig
from imbssl.recipes.experiment_1 import (by_seed, describe_compute, describe_source, metric_cell, subset_titles,
                                        thirds_table)
from imbssl.report import markdown_table, paired_difference, plot_prior_fit, verdict


def _power_law(method: str, tau: float) -> dict:
    return {"name": method, "prior": {"kind": "power_law", "tau": tau}}


TAUS = (0.25, 0.5, 1.0)
#: msn-sinkhorn is MSN as its published config runs it (use_sinkhorn: true): Sinkhorn balances the targets,
#: which a non-uniform prior cannot have, so PMSN's counterpart is msn, which differs from it in the prior alone.
VARIANTS = {"simsiam": {"name": "simsiam"}, "simclr": {"name": "simclr"}, "msn": {"name": "msn"},
            "msn-sinkhorn": {"name": "msn", "sinkhorn": True},
            **{f"pmsn-{tau:g}": _power_law("msn", tau) for tau in TAUS}, "excb": {"name": "excb"},
            **{f"excb-power-{tau:g}": _power_law("excb", tau) for tau in TAUS}}
#: (metric in a run's record, column title) for the methods that learn clusters
PRIOR_COLUMNS = [("linear.top1", "linear top-1"), ("pretrain.prior_kl", "KL(p̄ ‖ prior), training"),
                 ("clusters.kl_to_prior", "KL(sizes ‖ prior)"),
                 ("clusters.empty_clusters", "empty"), ("clusters.cluster_size_max", "largest / its target"),
                 ("clusters.purity", "purity"), ("clusters.nmi", "NMI")]
NOTE = ("Sizes are the final clustering of the pre-training images (each image's most similar centroid or prototype, "
        "no balancing); KL(sizes ‖ prior) is 0 when they follow the prior exactly, and 'largest' is the largest "
        "cluster's share over its own target share. KL(p̄ ‖ prior), training, is MSN's regulariser itself, the last "
        "epoch's mean: p̄ is a batch's mean soft prediction of the anchors, so it can sit near the prior while the "
        "hard assignments crowd into a few prototypes (ExCB has no such term: n/a).")


class PriorsExperimentConfig(ExcbExperimentConfig):
    """A preset file: experiment I's grid over ``variants`` (method settings by name) on long-tailed subsets and
    their balanced controls."""

    methods: list[str] = ["msn", "pmsn-0.25", "excb", "excb-power-0.25"]
    subset_keys: list[str] | None = ["imbalanced-p100", "balanced-rs-p100"]
    variants: dict[str, dict] = Field(default_factory=lambda: dict(VARIANTS))

    def resolved_method(self, method: str):
        """The method section a run of ``method`` trains with: its variant's keys over ``base.method`` and --set."""
        return self.run_config(self.subsets[0], method, self.seeds[0]).method

    def uniform_counterpart(self, method: str) -> str | None:
        """The listed variant of the same method with the uniform prior, for a variant with another prior."""
        resolved = self.resolved_method(method)
        if resolved.prior.kind == "uniform":
            return None
        listed = ((m, self.resolved_method(m)) for m in self.methods)
        return next((m for m, other in listed if other.name == resolved.name
                     and other.prior.kind == "uniform" and not other.sinkhorn), None)


def verdict_lines(exp: PriorsExperimentConfig, records: list[dict], titles: dict[str, str]) -> list[str]:
    """Each non-uniform prior against its uniform counterpart, per subset: linear top-1 and the rare third."""
    lines = []
    for method in exp.methods:
        baseline = exp.uniform_counterpart(method)
        if baseline is None:
            continue
        lines.append(f"- {method} against {baseline} (paired by seed; + = the non-uniform prior does better):")
        for key, title in titles.items():
            top1, rare = (paired_difference(by_seed(records, key, method, value),
                                            by_seed(records, key, baseline, value))
                          for value in (lambda r: r["linear"]["top1"], lambda r: r["linear"]["thirds"]["rare"]))
            lines.append(f"  - {title}: linear top-1 {verdict(top1)}; rare third {verdict(rare)}")
    return lines


def run_experiment(exp: PriorsExperimentConfig, out_dir: Path, command: str) -> Path:
    """Train and evaluate the grid (finished runs are reused); returns table.md."""
    from imbssl.recipes.experiment_1 import run_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    return write_report(exp, run_grid(exp, out_dir), out_dir, command)


@main_only
def write_report(exp: PriorsExperimentConfig, records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md (accuracy, thirds, cluster fit to the prior, verdicts), one prior-fit figure per subset."""
    sizes, titles = subset_titles(exp.subsets, records)
    accuracy = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, "linear.top1") for m in exp.methods]
                for k in titles]
    clustering = [m for m in exp.methods if any("clusters" in r for r in records if r["method"] == m)]
    lines = [f"# Cluster priors on {describe_source(exp.base)}: mean ± std over {len(exp.seeds)} seed(s)", "",
             f"Command: `{command}`", "", exp.protocol(), "", NOTE, "",
             "## Linear top-1", "", markdown_table(["Subset", "N"] + exp.methods, accuracy), "",
             "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
             thirds_table(records, titles, sizes, exp.methods, {}), "",
             "## Does a non-uniform prior help on long-tailed data, and hurt on balanced data?", "",
             *verdict_lines(exp, records, titles), ""]
    for key, title in titles.items():
        rows = [[m] + [metric_cell(records, key, m, metric) for metric, _ in PRIOR_COLUMNS] for m in clustering]
        lines += [f"## {title}: the clusters against the prior", "",
                  markdown_table(["variant"] + [t for _, t in PRIOR_COLUMNS], rows), ""]
        first = {m: next(r for r in records if r["subset"] == key and r["method"] == m) for m in clustering}
        plot_prior_fit({m: run["clusters"]["sorted_shares"] for m, run in first.items()},
                       {m: run["clusters"]["sorted_prior"] for m, run in first.items()},
                       out_dir / f"prior_fit-{key}.png",
                       title=f"Cluster shares vs prior, {title}, seed {exp.seeds[0]}")
    lines += [describe_compute(records)]
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table
