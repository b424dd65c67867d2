"""The self-supervised methods for long-tailed data side by side, under one protocol: ``imbssl reproduce
longtail-ssl``.

    SimCLR          NT-Xent on two views                                          methods/simclr.py
    SimCLR+TS       SimCLR with a cosine schedule of its temperature (Kukleva et al. 2023)   engine/schedules.py
    SDCLR           SimCLR against a pruned copy of the network (Jiang et al. 2021)          methods/sdclr.py
    BCL-I, BCL-D    memorisation-boosted augmentation on SimCLR / SDCLR (Zhou et al. 2022)   methods/bcl.py
    Focal           SimCLR with NT-Xent re-weighted as the focal loss (GH's code)            methods/focal.py
    X+GH            Geometric Harmonization on each of the five above (Zhou et al. 2023)     methods/gh.py
    BYOL, DINO, Barlow Twins, VICReg   the general SSL baselines, their authors' heads and optimizers
    SimSiam, ExCB, PMSN, SimSiam+C+D   the seeds' methods (offline clustering is the pipeline's student)

on one long-tailed subset (the seeds' protocol: Cao et al.'s exponential profile over the whole training split,
named in the report), at equal epochs. Every model gets the same evaluation: the full-shot linear probe on a
balanced labelled set of N images, few-shot probes on balanced sets drawn outside its validation part, the thirds of
the classes (major / minor / rare by pre-training count) and their std, SDCLR's "balancedness".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from imbssl.config import OfflineClusteringSettings, OptimConfig, SubsetConfig, few_shot_name
from imbssl.recipes.experiment_2 import PIPELINE, PIPELINE_LABELS, offline_clustering_cells
from imbssl.recipes.grid import Cell, Metric, Results, paper_dataset
from imbssl.recipes.subsets import NamedSubset, SubsetGrid, linear_group, linear_top1, thirds_std
from imbssl.report import markdown_table, verdict, verdict_cell

#: each method's run settings over ``base``: the SimCLR family shares SDCLR's SGD settings (BCL's commands give
#: SimCLR and BCL-I weight decay 5e-4, SDCLR and BCL-D 1e-4), and SimCLR the head of BCL's SimCLR baseline, so SimCLR,
#: +TS and BCL-I differ in the method alone; SDCLR keeps its own code's 3-layer head, BCL-D its 2-layer dual-BN one
SIMCLR_OPTIM = {"name": "sgd", "base_lr": 0.25, "weight_decay": 1e-4}
VARIANTS = {
    "simclr": {"method": {"name": "simclr", "head": "bcl"}, "optim": SIMCLR_OPTIM},
    "simclr-ts": {"method": {"name": "simclr", "head": "bcl"},
                  "optim": {**SIMCLR_OPTIM, "temperature_schedule": {"tau_min": 0.1, "tau_max": 1.0,
                                                                     "t_max_epochs": 200}}},
    "sdclr": {"method": {"name": "sdclr"}, "optim": SIMCLR_OPTIM},
    "bcl-i": {"method": {"name": "bcl-i"}, "optim": SIMCLR_OPTIM},
    "bcl-d": {"method": {"name": "bcl-d"}, "optim": SIMCLR_OPTIM},
    "focal": {"method": {"name": "focal"}, "optim": SIMCLR_OPTIM},  # GH's code's head (BCL's) and tau 0.2
    "simsiam": {"method": {"name": "simsiam"}},
    "excb": {"method": {"name": "excb"}, "augment": {"local_crops": 2}},
    "pmsn": {"method": {"name": "msn", "prior": {"kind": "power_law", "tau": 0.25}}, "augment": {"local_crops": 2}},
    "byol": {"method": {"name": "byol"}},  # its authors' LARS (methods/byol.py), where the SimCLR family share SGD
    "barlow-twins": {"method": {"name": "barlow-twins"}},  # their LARS and lrs (methods/barlow_twins.py), as BYOL
    "vicreg": {"method": {"name": "vicreg"}},  # their LARS (methods/vicreg.py), as BYOL
    "dino": {"method": {"name": "dino"}, "augment": {"local_crops": 2}},  # their AdamW (methods/dino.py), as ExCB
}
#: GH (methods/gh.py) on each contrastive method, at their README's CIFAR-100-LT flags (--warm_up 500 --target_dim
#: 100, which needs proj_dim >= 100); a preset of shorter runs sets method.gh.warm_up below its epochs
GH_ON = {"simclr": "SimCLR", "focal": "Focal", "sdclr": "SDCLR", "bcl-i": "BCL-I", "bcl-d": "BCL-D"}
VARIANTS |= {f"{name}+gh": {**VARIANTS[name], "method": {**VARIANTS[name]["method"], "gh": {}}} for name in GH_ON}
#: what the tables call the variants that are not a method of the same name; SimSiam+C+D is the offline-clustering
#: pipeline's student, trained from SimSiam's settings (recipes/experiment_2.py)
LABELS = {"simclr-ts": "SimCLR+TS", "pmsn": "PMSN", PIPELINE: PIPELINE_LABELS[PIPELINE],
          **{f"{name}+gh": f"{label}+GH" for name, label in GH_ON.items()}}

#: BCL's README (MediaBrain-SJTU/BCL at a2342f8): linear top-1 (%) on CIFAR-100-LT split 1, ResNet-18, 2,000 epochs,
#: BCL's protocol (a rho=100 tail drawn outside a 5k validation list; full-shot on the 40k train list, 100/50-shot on
#: its split files); one run
PUBLISHED = {"simclr": (50.7, 46.3, 42.4), "sdclr": (55.0, 49.7, 45.6), "bcl-i": (55.7, 50.1, 45.8),
             "bcl-d": (58.7, 52.6, 48.7)}
PUBLISHED_SETTING = "BCL README, CIFAR-100-LT split 1, BCL's protocol, ResNet-18, 2,000 ep"
PUBLISHED_PROBES = ("full-shot", "100-shot", "50-shot")
#: the order the papers report, worst to best (SDCLR's paper: SDCLR over SimCLR; BCL's README: all four)
PUBLISHED_ORDER = ("simclr", "sdclr", "bcl-i", "bcl-d")


def longtail_subsets() -> list[NamedSubset]:
    return [NamedSubset(key="imbalanced-p100", title="Imbalanced (rho=100, Cao et al.'s profile)",
                        subset=SubsetConfig(profile="exp", imbalance=100)),
            NamedSubset(key="imbalanced-p10", title="Imbalanced (rho=10, Cao et al.'s profile)",
                        subset=SubsetConfig(profile="exp", imbalance=10))]


def published_figures(method: str) -> list[str]:
    """BCL's README figures of ``method`` (full-shot, 100-shot, 50-shot), or n/a where it reports none."""
    return [f"{v:.1f}" for v in PUBLISHED[method]] if method in PUBLISHED else ["n/a"] * len(PUBLISHED_PROBES)


def few_shot_top1(spec: str) -> Metric:
    return lambda cell: cell.eval.few_shot[spec].top1 if spec in cell.eval.few_shot else None


class LongtailSSLConfig(SubsetGrid):
    """A preset file: ``methods`` (the built-in variants, those of ``method_settings``, and the offline-clustering
    pipeline, which runs on every subset) on ``subsets``."""

    NAME: ClassVar[str] = "longtail-ssl"
    PRESETS: ClassVar[str] = "longtail-ssl"
    TITLE: ClassVar[str] = "Long-tailed SSL methods"
    MEASURE: ClassVar[str] = "linear top-1 (%)"
    LABELS: ClassVar[dict[str, str]] = LABELS
    BUILT_IN: ClassVar[dict[str, dict]] = VARIANTS
    PIPELINES: ClassVar[tuple[str, ...]] = (PIPELINE,)

    methods: list[str] = Field([*VARIANTS, PIPELINE], min_length=1)
    seeds: list[int] = Field([0, 1], min_length=1)
    subsets: list[NamedSubset] = Field(default_factory=longtail_subsets)
    subset_keys: list[str] | None = ["imbalanced-p100"]
    pipeline: OfflineClusteringSettings = OfflineClusteringSettings()

    def cells(self, out_dir: Path) -> list[Cell]:
        """One pre-training run per (subset, method, seed), then the pipeline's on every subset."""
        cells = self.pretrain_cells(out_dir)
        if PIPELINE in self.methods:
            cells += [cell for subset in self.subsets for seed in self.seeds
                      for cell in offline_clustering_cells(self, out_dir, subset, seed, self.pipeline, (PIPELINE,))]
        return cells

    def few_shot(self) -> list[str]:
        """The few-shot probes' keys in eval.json, in the configured order."""
        return [few_shot_name(spec) for spec in self.eval_settings().few_shot]

    def probes(self) -> dict[str, Metric]:
        """The probes by their column name: a split file's ``<n>shot`` list (BCL's cifar100_split1_test_100shot.npy)
        as ``<n>-shot`` where no other probe has that name; the protocol line names the files."""
        names = self.few_shot()
        short = {name: f"{match[1]}-shot" if (match := re.fullmatch(r".*?(\d+)shot", name)) else name
                 for name in names}
        clash = {label for label in short.values() if [*short.values(), *names].count(label) > 1}
        return {"full-shot": linear_top1,
                **{name if short[name] in clash else short[name]: few_shot_top1(name) for name in names}}

    def probe_table(self, results: Results, subset: str, published: bool) -> str:
        """Per method: full-shot and few-shot top-1, the full-shot thirds and their std (balancedness); with
        ``published``, BCL's figures in their own columns."""
        header = ["method", *self.probes(), "major", "minor", "rare", "thirds std (balancedness)"]
        metrics = [*self.probes().values(), *(linear_group(t) for t in ("major", "minor", "rare")), thirds_std]
        rows = [[self.label(m), *(results.cell(metric, subset=subset, method=m) for metric in metrics)]
                for m in self.methods]
        if published:
            header += [f"BCL README: {probe}" for probe in PUBLISHED_PROBES]
            rows = [row + published_figures(m) for row, m in zip(rows, self.methods)]
        return markdown_table(header, rows)

    def published_setting(self, subset: str) -> str:
        """Where BCL's figures were measured, and whether the runs of ``subset`` follow the same protocol."""
        named = next(s for s in self.subsets if s.key == subset).subset
        same = named.profile == "index_file" and self.eval_settings().labelled_index_file is not None
        return (f"The published columns: {PUBLISHED_SETTING}, one run. These runs: "
                f"{'the same split files,' if same else 'another protocol,'} another backbone and budget.")

    def gh_gains(self, results: Results, subset: str) -> str | None:
        """Each method's paired gain from GH (X+GH - X) per probe, a table: does category-level uniformity help
        here? None when no method runs both with GH and without."""
        pairs = [(method, base) for method in self.methods
                 if (base := method.removesuffix("+gh")) != method and base in self.methods]
        if not pairs:
            return None
        probes = self.probes()
        rows = [[f"{self.label(method)} - {self.label(base)}",
                 *(verdict_cell(results.paired(metric, {"subset": subset, "method": method},
                                               {"subset": subset, "method": base}))
                   for metric in probes.values())] for method, base in pairs]
        return markdown_table(["GH's gain, points", *probes], rows)

    def ranking(self, results: Results, subset: str, metric: Metric) -> list[str]:
        """The methods, best first, by their mean over seeds."""
        means = {m: values for m in self.methods if (values := results.values(metric, subset=subset, method=m))}
        return sorted(means, key=lambda m: -sum(means[m]) / len(means[m]))

    def lead_table(self, results: Results, subset: str) -> str | None:
        """Each probe's leader (the best mean) against every other method, paired by seed: is its lead shown?"""
        metrics = self.probes()
        leaders = {probe: order[0] for probe, metric in metrics.items()
                   if len(order := self.ranking(results, subset, metric)) > 1}
        if not leaders:
            return None
        rows = [[self.label(method), *("leads" if method == leader else
                                       verdict_cell(results.paired(metrics[probe], {"subset": subset, "method": leader},
                                                                   {"subset": subset, "method": method}))
                                       for probe, leader in leaders.items())]
                for method in self.methods if results.values(linear_top1, subset=subset, method=method)]
        header = ["each method", *(f"{probe}: {self.label(leader)} -" for probe, leader in leaders.items())]
        return markdown_table(header, rows)

    def verdict_lines(self, results: Results, subset: str) -> list[str]:
        """Which method leads each probe and by how much over the next (paired by seed); the papers' order,
        checked."""
        lines = []
        for probe, metric in self.probes().items():
            order = self.ranking(results, subset, metric)
            if len(order) < 2:
                continue
            lead = verdict(results.paired(metric, {"subset": subset, "method": order[0]},
                                          {"subset": subset, "method": order[1]}))
            lines.append(f"- {probe}: {self.label(order[0])} leads {self.label(order[1])} by {lead}; "
                         f"order {' > '.join(map(self.label, order))}")
            ours = [m for m in reversed(order) if m in PUBLISHED_ORDER]
            if len(ours) == len(PUBLISHED_ORDER):
                said = "matches" if tuple(ours) == PUBLISHED_ORDER else "does not match"
                lines.append(f"  - SimCLR < SDCLR < BCL-I < BCL-D (the papers'): ours, worst to best, "
                             f"{' < '.join(map(self.label, ours))}, {said}")
        return lines

    def title(self, results: Results) -> str:
        epochs = OptimConfig.model_validate(self.base.get("optim", {})).epochs
        return f"{super().title(results)}, {epochs} epochs each"

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """The probes, thirds and balancedness per subset beside BCL's published figures (CIFAR-100 runs alone), the
        verdicts and GH's gains."""
        sizes, titles = self.subset_titles(results)
        published = paper_dataset(results.cells[0].eval.classes) == "cifar100"
        lines = [self.protocol(), "",
                 "Thirds: the classes sorted by pre-training count; their std is SDCLR's balancedness (lower is more "
                 "balanced).", ""]
        if not published:
            lines += [f"The published figures ({PUBLISHED_SETTING}) are left out: they are not of CIFAR-100.", ""]
        for key, title in titles.items():
            lines += [f"## {title}, N = {sizes[key]:,}", "", *([self.published_setting(key), ""] if published else []),
                      self.probe_table(results, key, published), "",
                      "Who leads (paired by seed; the lead over the runner-up):", "",
                      *self.verdict_lines(results, key), ""]
            if leads := self.lead_table(results, key):
                lines += ["The leader's lead over each method (points, paired by seed; the mean, its 95% interval over "
                          "the seeds, and the verdict):", "", leads, ""]
            if gains := self.gh_gains(results, key):
                lines += ["GH's gain (X+GH - X, paired by seed; the mean, its 95% interval over the seeds, and the "
                          "verdict):", "", gains, ""]
        return lines
