"""Uniform against power-law cluster priors, on long-tailed and balanced images: ``imbssl reproduce priors``.

The seed ("The hidden uniform cluster prior in self-supervised learning", Assran et al. 2023) argues that the
uniform prior of MSN-like objectives fights long-tailed data, and that PMSN's power-law prior helps there
without hurting balanced data. Every comparison here changes the prior alone:

    MSN  (uniform)   against   PMSN (power law, tau)        methods/msn.py
    ExCB (uniform)   against   ExCB toward a power law      methods/excb.py, with method.prior

on a long-tailed subset and on its balanced, N-matched control, beside SimSiam and SimCLR when listed, with
experiment I's evaluation, so the numbers sit beside them.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from imbssl.recipes.excb import SUBSETS
from imbssl.recipes.grid import Cell, Results
from imbssl.recipes.subsets import NamedSubset, SubsetGrid, linear_group, linear_top1, paper_subsets
from imbssl.report import markdown_table, plot_prior_fit, verdict


def _power_law(method: str, tau: float) -> dict:
    return {"method": {"name": method, "prior": {"kind": "power_law", "tau": tau}}}


TAUS = (0.25, 0.5, 1.0)
#: msn-sinkhorn is MSN as its published config runs it (use_sinkhorn: true): Sinkhorn balances the targets,
#: which a non-uniform prior cannot have, so PMSN's counterpart is msn, which differs from it in the prior alone.
VARIANTS = {"msn-sinkhorn": {"method": {"name": "msn", "sinkhorn": True}},
            **{f"pmsn-{tau:g}": _power_law("msn", tau) for tau in TAUS},
            **{f"excb-power-{tau:g}": _power_law("excb", tau) for tau in TAUS}}
#: (figure of a run's record, column title) for the methods that learn clusters
PRIOR_COLUMNS = [(linear_top1, "linear top-1"),
                 (lambda c: c.pretrain.figure("prior_kl"), "KL(p̄ ‖ prior), training"),
                 (lambda c: c.eval.clusters.kl_to_prior, "KL(sizes ‖ prior)"),
                 (lambda c: c.eval.clusters.empty_clusters, "empty"),
                 (lambda c: c.eval.clusters.cluster_size_max, "largest / its target"),
                 (lambda c: c.eval.clusters.purity, "purity"), (lambda c: c.eval.clusters.nmi, "NMI")]
NOTE = ("Sizes are the final clustering of the pre-training images (each image's most similar centroid or prototype, "
        "no balancing); KL(sizes ‖ prior) is 0 when they follow the prior exactly, and 'largest' is the largest "
        "cluster's share over its own target share. KL(p̄ ‖ prior), training, is MSN's regulariser itself, the last "
        "epoch's mean: p̄ is a batch's mean soft prediction of the anchors, so it can sit near the prior while the "
        "hard assignments crowd into a few prototypes (ExCB has no such term: n/a).")


class PriorsExperimentConfig(SubsetGrid):
    """A preset file: the pre-training grid over methods and their prior variants (``method_settings`` by name) on
    long-tailed subsets and their balanced controls."""

    NAME: ClassVar[str] = "priors"
    PRESETS: ClassVar[str] = "priors"
    TITLE: ClassVar[str] = "Cluster priors"
    BUILT_IN: ClassVar[dict[str, dict]] = VARIANTS

    methods: list[str] = Field(["msn", "pmsn-0.25", "excb", "excb-power-0.25"], min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    subsets: list[NamedSubset] = Field(default_factory=lambda: [s for s in paper_subsets() if s.key in SUBSETS])
    subset_keys: list[str] | None = ["imbalanced-p100", "balanced-rs-p100"]

    def cells(self, out_dir: Path) -> list[Cell]:
        return self.pretrain_cells(out_dir)

    def resolved_method(self, method: str):
        """The method section a run of ``method`` trains with: its settings over ``base.method`` and --set."""
        return self.run_config(self.subsets[0], method, self.seeds[0]).method

    def uniform_counterpart(self, method: str) -> str | None:
        """The listed variant of the same method with the uniform prior, for a variant with another prior."""
        resolved = self.resolved_method(method)
        if "prior" not in type(resolved).model_fields or resolved.prior.kind == "uniform":  # SimSiam, SimCLR: none
            return None
        listed = ((m, self.resolved_method(m)) for m in self.methods)
        return next((m for m, other in listed if other.name == resolved.name and other.prior.kind == "uniform"
                     and not getattr(other, "sinkhorn", False)), None)  # a key of MSN's section alone

    def verdict_lines(self, results: Results, titles: dict[str, str]) -> list[str]:
        """Each non-uniform prior against its uniform counterpart, per subset: linear top-1 and the rare third."""
        lines = []
        for method in self.methods:
            baseline = self.uniform_counterpart(method)
            if baseline is None:
                continue
            lines.append(f"- {method} against {baseline} (paired by seed; + = the non-uniform prior does better):")
            for key, title in titles.items():
                top1, rare = (verdict(results.paired(metric, {"subset": key, "method": method},
                                                     {"subset": key, "method": baseline}))
                              for metric in (linear_top1, linear_group("rare")))
                lines.append(f"  - {title}: linear top-1 {top1}; rare third {rare}")
        return lines

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """Accuracy, thirds, the clusters' fit to the prior, the verdicts; one prior-fit figure per subset."""
        sizes, titles = self.subset_titles(results)
        clustering = [m for m in self.methods if all(c.eval.clusters for c in results.select(method=m))]
        lines = [self.protocol(), "", NOTE, "", "## Linear top-1", "",
                 markdown_table(["Subset", "N", *map(self.label, self.methods)],
                                self.accuracy_rows(results, titles, sizes, self.methods)), "",
                 "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
                 self.thirds_table(results, titles, sizes, self.methods), "",
                 "## Does a non-uniform prior help on long-tailed data, and hurt on balanced data?", "",
                 *self.verdict_lines(results, titles), ""]
        for key, title in titles.items():
            rows = [[self.label(m)] + [results.cell(metric, subset=key, method=m) for metric, _ in PRIOR_COLUMNS]
                    for m in clustering]
            lines += [f"## {title}: the clusters against the prior", "",
                      markdown_table(["variant"] + [t for _, t in PRIOR_COLUMNS], rows), ""]
            first = {self.label(m): results.select(subset=key, method=m)[0].eval.clusters for m in clustering}
            plot_prior_fit({m: clusters.sorted_shares for m, clusters in first.items()},
                           {m: clusters.sorted_prior for m, clusters in first.items()},
                           out_dir / f"prior_fit-{key}.png",
                           title=f"Cluster shares vs prior, {title}, seed {self.seeds[0]}")
        return lines
