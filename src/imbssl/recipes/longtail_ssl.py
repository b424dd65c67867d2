"""The self-supervised methods for long-tailed data side by side, under one protocol: ``imbssl reproduce
longtail-ssl``.

    SimCLR          NT-Xent on two views                                          methods/simclr.py
    SimCLR+TS       SimCLR with a cosine schedule of its temperature (Kukleva et al. 2023)   engine/optim.py
    SDCLR           SimCLR against a pruned copy of the network (Jiang et al. 2021)          methods/sdclr.py
    BCL-I, BCL-D    memorisation-boosted augmentation on SimCLR / SDCLR (Zhou et al. 2022)   methods/bcl.py
    SimSiam, ExCB, PMSN, SimSiam+C+D   the seeds' methods (offline clustering is the pipeline's student)

on one long-tailed subset (the seeds' protocol: Cao et al.'s exponential profile over the whole training split,
named in the report), at equal epochs. Every model gets the same evaluation: the full-shot linear probe on a
balanced labelled set of N images, few-shot probes on balanced sets drawn outside its validation part, the thirds of
the classes (major / minor / rare by pre-training count) and their std, SDCLR's "balancedness".
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, model_validator

from imbssl.config import OptimConfig, SubsetConfig, deep_merge, few_shot_name
from imbssl.engine.distributed import main_only, require_one_process
from imbssl.recipes.experiment_1 import (NamedSubset, by_seed, describe_compute, describe_source, metric_cell,
                                         run_grid, subset_titles)
from imbssl.recipes.experiment_2 import Experiment2Config, pipeline_record
from imbssl.report import format_mean_std, markdown_table, paired_difference, verdict

#: each method's run settings over ``base``: the SimCLR family shares SDCLR's SGD settings (BCL's commands give
#: SimCLR and BCL-I weight decay 5e-4, SDCLR and BCL-D 1e-4), and SimCLR the head of BCL's SimCLR baseline, so SimCLR,
#: +TS and BCL-I differ in the method alone; SDCLR keeps its own code's 3-layer head, BCL-D its 2-layer dual-BN one
SIMCLR_OPTIM = {"name": "sgd", "base_lr": 0.25, "weight_decay": 1e-4}
VARIANTS = {
    "simclr": {"method": {"name": "simclr", "simclr_head": "bcl"}, "optim": SIMCLR_OPTIM},
    "simclr-ts": {"method": {"name": "simclr", "simclr_head": "bcl"},
                  "optim": {**SIMCLR_OPTIM, "temperature_schedule": {"tau_min": 0.1, "tau_max": 1.0,
                                                                     "t_max_epochs": 200}}},
    "sdclr": {"method": {"name": "sdclr"}, "optim": SIMCLR_OPTIM},
    "bcl-i": {"method": {"name": "bcl-i"}, "optim": SIMCLR_OPTIM},
    "bcl-d": {"method": {"name": "bcl-d"}, "optim": SIMCLR_OPTIM},
    "simsiam": {"method": {"name": "simsiam"}},
    "excb": {"method": {"name": "excb"}, "augment": {"local_crops": 2}},
    "pmsn": {"method": {"name": "msn", "prior": {"kind": "power_law", "tau": 0.25}}, "augment": {"local_crops": 2}},
}
#: the offline-clustering pipeline's student, trained from SimSiam's settings (recipes/experiment_2.py)
PIPELINE = "simsiam+c+d"
NAMES = {"simclr": "SimCLR", "simclr-ts": "SimCLR+TS", "sdclr": "SDCLR", "bcl-i": "BCL-I", "bcl-d": "BCL-D",
         "simsiam": "SimSiam", "excb": "ExCB", "pmsn": "PMSN", PIPELINE: "SimSiam+C+D"}

#: BCL's README (MediaBrain-SJTU/BCL at a2342f8): linear top-1 (%) on CIFAR-100-LT split 1, ResNet-18, 2,000 epochs,
#: BCL's protocol (a rho=100 tail drawn outside a 5k validation list; full-shot on the 40k train list, 100/50-shot on
#: its split files); one run
PUBLISHED = {"simclr": (50.7, 46.3, 42.4), "sdclr": (55.0, 49.7, 45.6), "bcl-i": (55.7, 50.1, 45.8),
             "bcl-d": (58.7, 52.6, 48.7)}
PUBLISHED_SETTING = "BCL README, CIFAR-100-LT split 1, BCL's protocol, ResNet-18, 2,000 ep"
#: the order the papers report, worst to best (SDCLR's paper: SDCLR over SimCLR; BCL's README: all four)
PUBLISHED_ORDER = ("simclr", "sdclr", "bcl-i", "bcl-d")


def longtail_subsets() -> list[NamedSubset]:
    return [NamedSubset(key="imbalanced-p100", title="Imbalanced (rho=100, Cao et al.'s profile)",
                        subset=SubsetConfig(profile="exp", imbalance=100)),
            NamedSubset(key="imbalanced-p10", title="Imbalanced (rho=10, Cao et al.'s profile)",
                        subset=SubsetConfig(profile="exp", imbalance=10))]


class LongtailSSLConfig(Experiment2Config):
    """A preset file: ``methods`` (``variants`` by name, and the offline-clustering pipeline) on ``subsets``."""

    methods: list[str] = [*VARIANTS, PIPELINE]
    seeds: list[int] = [0, 1]
    subsets: list[NamedSubset] = Field(default_factory=longtail_subsets)
    subset_keys: list[str] | None = ["imbalanced-p100"]
    variants: dict[str, dict] = Field(default_factory=dict, description="run settings by method name, merged key by "
                                      "key over the built-in VARIANTS (a new name adds a method)")

    @model_validator(mode="after")
    def _check(self) -> "LongtailSSLConfig":  # in place of experiment II's: the pipeline runs on every subset
        known = {*VARIANTS, *self.variants}
        if unknown := set(self.methods) - known - {PIPELINE}:
            raise ValueError(f"methods {sorted(unknown)} are neither variants {sorted(known)} nor {PIPELINE!r}")
        if nameless := [m for m in self.variants if "name" not in self.run_section(m).get("method", {})]:
            raise ValueError(f"variants {nameless} name no method (method: {{name: ...}})")
        if "pipeline_subsets" in self.model_fields_set:
            raise ValueError("pipeline_subsets: longtail-ssl runs the pipeline on every subset it runs")
        self.pipeline_subsets = [s.key for s in self.subsets]
        return self

    def run_section(self, method: str) -> dict:
        variant = deep_merge(VARIANTS.get(method, {}), self.variants.get(method, {}))
        return deep_merge(variant, {"optim": self.method_optim.get(method, {})})

    def few_shot(self) -> list[str]:
        """The few-shot probes' keys in eval.json, in the configured order."""
        return [few_shot_name(spec) for spec in self.eval_settings().few_shot]

    def grid(self) -> "LongtailSSLConfig":
        """The methods that are one pre-training run each (all but the pipeline)."""
        return self.model_copy(update={"methods": [m for m in self.methods if m != PIPELINE]})


def run_experiment(exp: LongtailSSLConfig, out_dir: Path, command: str) -> Path:
    """Train and evaluate every method (finished runs are reused, unfinished ones resumed); returns table.md."""
    if PIPELINE in exp.methods:
        require_one_process(f"the {PIPELINE} pipeline of longtail-ssl (leave it out of methods)")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = run_grid(exp.grid(), out_dir)
    if PIPELINE in exp.methods:
        records += [pipeline_record(exp, subset, PIPELINE, seed, out_dir) for subset in exp.subsets
                    for seed in exp.seeds]
    return write_report(exp, records, out_dir, command)


def _few_shot(spec: str, figure: str = "top1"):
    return lambda record: record.get("few_shot", {}).get(spec, {}).get(figure)


def _values(records: list[dict], subset: str, method: str, value) -> list[float]:
    return [v for v in by_seed(records, subset, method, value).values() if v is not None]


def _cell(records: list[dict], subset: str, method: str, value) -> str:
    values = _values(records, subset, method, value)
    return format_mean_std(values) if values else "n/a"


def probe_table(exp: LongtailSSLConfig, records: list[dict], subset: str) -> str:
    """Per method: full-shot and few-shot top-1, the full-shot thirds and their std (balancedness)."""
    specs = exp.few_shot()
    header = ["method", "full-shot", *specs, "major", "minor", "rare", "thirds std (balancedness)"]
    rows = [[NAMES.get(m, m), metric_cell(records, subset, m, "linear.top1"),
             *(_cell(records, subset, m, _few_shot(spec)) for spec in specs),
             *(metric_cell(records, subset, m, f"linear.thirds.{t}") for t in ("major", "minor", "rare")),
             metric_cell(records, subset, m, "linear.thirds_std")] for m in exp.methods]
    return markdown_table(header, rows)


def published_table(exp: LongtailSSLConfig) -> str:
    rows = [[NAMES[m], *(f"{v:.1f}" for v in PUBLISHED[m])] for m in exp.methods if m in PUBLISHED]
    return markdown_table(["method", *(f"published: {p}" for p in ("full-shot", "100-shot", "50-shot"))], rows)


def ranking(exp: LongtailSSLConfig, records: list[dict], subset: str, value) -> list[str]:
    """The methods, best first, by their mean over seeds."""
    means = {m: _values(records, subset, m, value) for m in exp.methods}
    return sorted((m for m in means if means[m]), key=lambda m: -sum(means[m]) / len(means[m]))


def verdict_lines(exp: LongtailSSLConfig, records: list[dict], subset: str) -> list[str]:
    """Which method leads each probe and by how many seed stds over the next; the papers' order, checked."""
    specs = exp.few_shot()
    probes = {"full-shot": lambda r: r["linear"]["top1"], **{spec: _few_shot(spec) for spec in specs}}
    lines = []
    for probe, value in probes.items():
        order = ranking(exp, records, subset, value)
        if len(order) < 2:
            continue
        lead = verdict(paired_difference(*(by_seed(records, subset, m, value) for m in order[:2])))
        lines.append(f"- {probe}: {NAMES.get(order[0], order[0])} leads {NAMES.get(order[1], order[1])} by {lead}; "
                     f"order {' > '.join(NAMES.get(m, m) for m in order)}")
        ours = [m for m in reversed(order) if m in PUBLISHED_ORDER]
        if len(ours) == len(PUBLISHED_ORDER):
            said = "matches" if tuple(ours) == PUBLISHED_ORDER else "does not match"
            lines.append(f"  - SimCLR < SDCLR < BCL-I < BCL-D (the papers'): ours, worst to best, "
                         f"{' < '.join(NAMES[m] for m in ours)}, {said}")
    return lines


@main_only
def write_report(exp: LongtailSSLConfig, records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md: the probes, thirds and balancedness per subset, the verdicts, the published figures apart."""
    sizes, titles = subset_titles(exp.subsets, records)
    epochs = OptimConfig.model_validate(exp.base.get("optim", {})).epochs
    lines = [f"# Long-tailed SSL methods on {describe_source(exp.base)}: linear top-1 (%), mean ± std over "
             f"{len(exp.seeds)} seed(s), {epochs} epochs each", "", f"Command: `{command}`", "",
             exp.protocol(), "",
             "Thirds: the classes sorted by pre-training count; their std is SDCLR's balancedness (lower is more "
             "balanced).", ""]
    for key, title in titles.items():
        lines += [f"## {title}, N = {sizes[key]:,}", "", probe_table(exp, records, key), "",
                  "Who leads (paired by seed; the lead over the runner-up):", "", *verdict_lines(exp, records, key), ""]
    if exp.base.get("data", {}).get("source", "digits") != "digits" and len(records[0]["classes"]) == 100:
        lines += [f"## Published figures: {PUBLISHED_SETTING} (another protocol, backbone and budget)", "",
                  published_table(exp), ""]
    else:
        lines += [f"The published figures ({PUBLISHED_SETTING}) are left out: they are not of CIFAR-100.", ""]
    lines += [describe_compute(records)]
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table
