"""Experiment I of the offline-clustering paper (Table 2): how class imbalance hurts SimCLR and SimSiam.

Five pre-training subsets x two methods x several seeds. Every run is evaluated with the same
protocol (pipelines/evaluate.py); the subset itself is fixed across seeds ("rs." is "a randomly
rescaled, fixed dataset"), the seed changes initialisation, batches and augmentations.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imbssl.config import (ConfigError, EvalConfig, RunConfig, SubsetConfig, build_config, deep_merge,
                           is_split_file)
from imbssl.data import load_splits, select_subset
from imbssl.engine.distributed import main_only
from imbssl.pipelines.evaluate import EVAL_FILE, evaluate_run
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.runfolder import RUN_CONFIG, changed_keys, read_saved_config
from imbssl.eval.metrics import THIRDS
from imbssl.report import format_mean_std, markdown_table, plot_class_distributions, plot_per_class_accuracy

log = logging.getLogger(__name__)

#: how the paper columns are headed: what they were measured on, which is never what a CPU preset trains.
PAPER_SETTING = "paper, CIFAR-10, ResNet-18, 300 ep"
PAPER_LEFT_OUT = "The paper's figures (CIFAR-10, ResNet-18, 300 epochs) are left out: {source} is not comparable."
#: why a many/medium/few cell is empty: the standard thresholds (eval/metrics.py) leave the group without a class.
EMPTY_GROUP = {"many": "no class with > 100 images", "medium": "no class with 20-100 images",
               "few": "no class with < 20 images"}

# Table 2 of the paper: linear top-1 (%) after 300 epochs, ResNet-18, batch 1024.
PAPER_TABLE_2 = {
    "imbalanced-p10": {"simclr": 66.52, "simsiam": 81.16},
    "imbalanced-p100": {"simclr": 62.18, "simsiam": 68.54},
    "balanced-rs-p10": {"simclr": 71.25, "simsiam": 87.14},
    "balanced-rs-p100": {"simclr": 69.82, "simsiam": 79.23},
    "balanced-full": {"simclr": 73.57, "simsiam": 90.40},
}


METHOD_NAMES = {"simclr": "SimCLR", "simsiam": "SimSiam"}


class NamedSubset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    title: str
    subset: SubsetConfig


def paper_subsets(seed: int = 0) -> list[NamedSubset]:
    """The five subsets of Table 2, in its row order; rs.* match the exponential profile's N."""
    def make(key: str, title: str, **kw) -> NamedSubset:
        return NamedSubset(key=key, title=title, subset=SubsetConfig(seed=seed, **kw))

    return [
        make("imbalanced-p10", "Imbalanced (p=10)", profile="exp", imbalance=10),
        make("imbalanced-p100", "Imbalanced (p=100)", profile="exp", imbalance=100),
        make("balanced-rs-p10", "Balanced (rs.{n})", profile="balanced", imbalance=10),
        make("balanced-rs-p100", "Balanced (rs.{n})", profile="balanced", imbalance=100),
        make("balanced-full", "Balanced (full)", profile="full"),
    ]


class Experiment1Config(BaseModel):
    """A preset file: the runs' shared config plus the grid."""

    model_config = ConfigDict(extra="forbid")
    base: dict = Field(default_factory=dict, description="a RunConfig tree shared by every run")
    methods: list[str] = ["simclr", "simsiam"]
    seeds: list[int] = [0, 1, 2]
    subsets: list[NamedSubset] = Field(default_factory=paper_subsets)
    subset_keys: list[str] | None = Field(None, description="run only these subsets, in this order (None = all)")
    method_optim: dict[str, dict] = Field(default_factory=dict,
                                          description="optim keys of one method over base.optim, e.g. SimSiam's lr")

    @model_validator(mode="after")
    def _select_subsets(self) -> "Experiment1Config":
        if self.subset_keys is not None:
            by_key = {s.key: s for s in self.subsets}
            if unknown := [k for k in self.subset_keys if k not in by_key]:
                raise ValueError(f"subset_keys {unknown} are not among the subsets {sorted(by_key)}")
            self.subsets, self.subset_keys = [by_key[k] for k in self.subset_keys], None
        return self

    def method_section(self, method: str) -> dict:
        """What a run of ``method`` sets over ``base.method``: the name; grids of variants of one method add more."""
        return {"name": method}

    def run_section(self, method: str) -> dict:
        """What a run of ``method`` sets over ``base``: its method section and optim keys; a grid whose variants
        differ in more (the augmentation, an engine schedule) sets those too."""
        return {"optim": self.method_optim.get(method, {}), "method": self.method_section(method)}

    def run_config(self, subset: NamedSubset, method: str, seed: int) -> RunConfig:
        tree = deep_merge(deep_merge(self.base, self.run_section(method)),
                          {"name": f"{subset.key}/{method}/seed{seed}", "seed": seed,
                           "data": {"subset": subset.subset.model_dump()}})
        return build_config(tree, origin=f"experiment-1 run {subset.key}/{method}/seed{seed}")

    def eval_settings(self) -> EvalConfig:
        """The evaluation every run of the grid gets (``base.eval``)."""
        return EvalConfig.model_validate(self.base.get("eval", {}))

    def protocol(self) -> str:
        """The CIFAR-LT protocol the grid follows, in words (``describe_protocol``), for its report."""
        return describe_protocol(self.subsets[0].subset, self.eval_settings())


def run_grid(exp: Experiment1Config, out_dir: Path) -> list[dict]:
    """Pre-train and evaluate every (subset, method, seed); finished runs are reused, interrupted ones resumed."""
    records = []
    for subset in exp.subsets:
        for method in exp.methods:
            for seed in exp.seeds:
                cfg = exp.run_config(subset, method, seed)
                run_dir = out_dir / "runs" / cfg.name
                check_same_run(run_dir, cfg)
                if not (run_dir / EVAL_FILE).exists():
                    if not (run_dir / BACKBONE_FILE).exists():
                        pretrain(cfg, run_dir, resume=True)
                    main_only(evaluate_run)(run_dir)
                trained, evaluated = (json.loads((run_dir / name).read_text()) for name in ("pretrain.json", EVAL_FILE))
                records.append({"subset": subset.key, "title": subset.title, "method": method, "seed": seed,
                                "run_dir": str(run_dir), "pretrain_wall_s": trained["wall_s_this_call"],
                                "hardware": trained.get("hardware", "not recorded"), "pretrain": trained,
                                **evaluated})
    return records


#: settings that do not change what a run computes, so a finished run is reused whatever they say
WHERE_NOT_WHAT = ("data.cache_dir", "data.download", "train.progress", "train.log_every", "train.checkpoint_every",
                  "train.checkpoint_every_s", "train.dist_timeout_s")


def check_same_run(run_dir: Path, cfg: RunConfig) -> None:
    """A grid reuses a finished run of the same name only when it was trained with these settings: another
    backbone, data or method under the same report folder is an error naming the keys, not a stale number."""
    if not (run_dir / EVAL_FILE).exists():
        return  # unfinished runs are checked by pretrain's own resume
    saved = read_saved_config(run_dir / RUN_CONFIG, RunConfig)
    changed = {k: v for k, v in changed_keys(saved, cfg).items() if k not in WHERE_NOT_WHAT}
    if changed:
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changed.items())
        raise ConfigError(f"{run_dir} holds a finished run trained with other settings: {listed}; give this grid "
                          f"another --out")


def metric_cell(records: list[dict], subset: str, method: str, metric: str) -> str:
    """Mean ± std over the seeds of ``metric`` (a dotted path into the records, e.g. "linear.top1"), or "n/a",
    with the reason when the metric is a many/medium/few group that holds no class."""
    values = [_metric(r, metric) for r in records if r["subset"] == subset and r["method"] == method]
    values = [v for v in values if v is not None]
    if values:
        return format_mean_std(values)
    group = metric.rsplit(".", 1)[-1]
    return f"n/a ({EMPTY_GROUP[group]})" if group in EMPTY_GROUP else "n/a"


def thirds_table(records: list[dict], titles: dict[str, str], sizes: dict[str, int], methods: list[str],
                 names: dict[str, str], protocol: str = "linear") -> str:
    """The headline group split: accuracy on the major, minor and rare thirds of the classes (sorted by their
    pre-training count) and the std of the three, per method: how the long-tailed SSL literature reports."""
    header = ["Subset", "N"] + [f"{names.get(m, m)} {part}" for m in methods for part in (*THIRDS, "std")]
    rows = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, f"{protocol}.{metric}") for m in methods
                                           for metric in (*(f"thirds.{t}" for t in THIRDS), "thirds_std")]
            for k in titles]
    return markdown_table(header, rows)


def shows_paper_columns(base: dict, records: list[dict]) -> bool:
    """The paper's CIFAR-10 figures sit beside runs on 10-class image data, never beside digits (8x8, grey)."""
    return base.get("data", {}).get("source", "digits") != "digits" and len(records[0]["classes"]) == 10


def by_seed(records: list[dict], subset: str, method: str, value) -> dict[int, float | None]:
    """seed -> value(record) of ``method``'s runs on ``subset``, to pair with another method's by seed."""
    return {r["seed"]: value(r) for r in records if r["subset"] == subset and r["method"] == method}


def _metric(record: dict, metric: str) -> float | None:
    node = record
    for part in metric.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _paper(subset: str, method: str) -> str:
    value = PAPER_TABLE_2.get(subset, {}).get(method)
    return "n/a" if value is None else f"{value:.2f}"


def _short(n: int) -> str:
    """12406 -> '12K', as the paper names its rescaled subsets."""
    return f"{n // 1000}K" if n >= 1000 else str(n)


def subset_titles(subsets: list[NamedSubset], records: list[dict]) -> tuple[dict[str, int], dict[str, str]]:
    """Each subset's N and its title with N filled in ('Balanced (rs.12K)'), by subset key."""
    sizes = {r["subset"]: sum(r["pretrain_class_counts"]) for r in records}
    return sizes, {s.key: s.title.format(n=_short(sizes[s.key])) for s in subsets}


def describe_source(base: dict) -> str:
    """'imagefolder (cifar10-jpg.tar.gz)': the data a grid's base config trains on, for report titles."""
    data = base.get("data", {})
    return data.get("source", "digits") + (f" ({Path(data['path']).name})" if data.get("path") else "")


def describe_protocol(subset: SubsetConfig, ev: EvalConfig) -> str:
    """Which CIFAR-LT protocol the runs follow, in words: mixing the two is a known source of unfair comparisons."""
    if subset.profile == "index_file":
        trained = f"SDCLR's and BCL's split files (pre-training on {Path(subset.index_file).name})"
    else:
        trained = "the seeds' (Cao et al.'s CIFAR-LT profiles, drawn from the whole training split)"
    full = (f"the labelled list {Path(ev.labelled_index_file).name}" if ev.labelled_index_file
            else "a balanced labelled set of N images")
    val = (f"the validation list {Path(ev.val_index_file).name}" if ev.val_index_file
           else f"{ev.linear.val_fraction:g} of the labelled set per class")
    files = [Path(s).name for s in ev.few_shot if is_split_file(s)]
    drawn = [s for s in ev.few_shot if not is_split_file(s)]
    few = ", ".join(files + ([f"{', '.join(drawn)} (balanced, drawn outside the validation part)"] if drawn else []))
    return f"Protocol: {trained}. Full-shot probe: {full}; few-shot probes: {few or 'none'}; probes selected on {val}."


def describe_compute(records: list[dict]) -> str:
    """One line with the runs' summed pre-training and evaluation time and the hardware they ran on."""
    train_s = sum(r["pretrain_wall_s"] for r in records)
    eval_s = sum(r.get("wall_s", 0.0) for r in records)
    hardware = sorted({r["hardware"] for r in records})
    return (f"{len(records)} runs: pre-training {train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min "
            f"(sum over runs) on {'; '.join(hardware)}.")


@main_only
def write_report(exp: Experiment1Config, records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md shaped like Table 2, more tables per protocol, and the two figures."""
    seeds = len(exp.seeds)
    sizes, titles = subset_titles(exp.subsets, records)
    source = describe_source(exp.base)
    lines = [f"# Experiment I on {source}: linear top-1 (%), mean ± std over {seeds} seed(s)", "",
             f"Command: `{command}`", "", exp.protocol(), ""]

    header = ["Subset", "N"] + [METHOD_NAMES.get(m, m) for m in exp.methods]
    rows = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, "linear.top1") for m in exp.methods]
            for k in titles]
    if shows_paper_columns(exp.base, records):
        header += [f"{PAPER_SETTING}: {METHOD_NAMES.get(m, m)}" for m in exp.methods]
        rows = [row + [_paper(k, m) for m in exp.methods] for row, k in zip(rows, titles)]
    else:
        lines += [PAPER_LEFT_OUT.format(source=source), ""]
    lines += [markdown_table(header, rows), "",
              "## Linear top-1 by thirds of the classes (major / minor / rare by pre-training count)", "",
              thirds_table(records, titles, sizes, exp.methods, METHOD_NAMES), ""]
    for metric, title in [("knn20.top1", "k-NN (k=20) top-1"), ("knn200.top1", "k-NN (k=200) top-1"),
                          ("linear.many", "linear, many-shot classes (> 100 images)"),
                          ("linear.medium", "linear, medium-shot classes (20-100 images)"),
                          ("linear.few", "linear, few-shot classes (< 20 images)")]:
        rows = [[titles[k], f"{sizes[k]:,}"] + [metric_cell(records, k, m, metric) for m in exp.methods]
                for k in titles]
        lines += [f"## {title}", "", markdown_table(header[:2 + len(exp.methods)], rows), ""]
    lines += [describe_compute(records)]

    classes = records[0]["classes"]
    plot_class_distributions({titles[k]: next(r["pretrain_class_counts"] for r in records if r["subset"] == k)
                              for k in titles}, classes, out_dir / "distributions.png",
                             title=f"Pre-training images per class, {source}")
    for m in exp.methods:
        per_class = {titles[k]: np.mean([[r["linear"]["per_class"][c] for c in classes] for r in records
                                         if r["subset"] == k and r["method"] == m], axis=0).tolist()
                     for k in titles}
        plot_per_class_accuracy(per_class, classes, out_dir / f"per_class_accuracy-{m}.png",
                                title=f"Linear top-1 per class, {METHOD_NAMES.get(m, m)}, mean over {seeds} seed(s), "
                                      f"{source}")
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def describe_subsets(base: RunConfig, subsets: list[NamedSubset]) -> tuple[list[str], dict[str, list[int]]]:
    """Class names and the per-class counts of each subset of the configured training pool (no training)."""
    train = load_splits(base.data)["train"]
    counts = {}
    for s in subsets:
        c = np.bincount(train.labels[select_subset(train.labels, s.subset)], minlength=len(train.classes)).tolist()
        counts[s.title.format(n=_short(sum(c)))] = c
    return list(train.classes), counts
