"""The pre-training grids' common schema: methods x subsets of the training pool x seeds, every run evaluated with
one protocol (pipelines/evaluate.py). Experiment I and II, ExCB, the priors and longtail-ssl are such grids.

The subset itself is fixed across seeds ("rs." is "a randomly rescaled, fixed dataset" in the offline-clustering
paper); the seed changes initialisation, batches and augmentations.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imbssl.config import (EvalConfig, OfflineClusteringConfig, OfflineClusteringSettings, RunConfig, SubsetConfig,
                           deep_merge, is_split_file, validate_tree)
from imbssl.data import load_splits, select_subset
from imbssl.eval.metrics import THIRDS
from imbssl.methods import METHODS
from imbssl.recipes.grid import Cell, GridConfig, Metric, Results
from imbssl.report import markdown_table


def linear_top1(cell) -> float:
    return cell.eval.linear.top1


def linear_group(group: str) -> Metric:
    """The full-shot probe's accuracy on a group: many, medium, few, or a third (major, minor, rare)."""
    if group in THIRDS:
        return lambda cell: getattr(cell.eval.linear.thirds, group)
    return lambda cell: getattr(cell.eval.linear, group)


def thirds_std(cell) -> float | None:
    return cell.eval.linear.thirds_std


class NamedSubset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    title: str
    subset: SubsetConfig


def paper_subsets(seed: int = 0) -> list[NamedSubset]:
    """The five subsets of the offline-clustering paper's Table 2, in its row order; rs.* match the exponential
    profile's N."""
    def make(key: str, title: str, **kw) -> NamedSubset:
        return NamedSubset(key=key, title=title, subset=SubsetConfig(seed=seed, **kw))

    return [
        make("imbalanced-p10", "Imbalanced (p=10)", profile="exp", imbalance=10),
        make("imbalanced-p100", "Imbalanced (p=100)", profile="exp", imbalance=100),
        make("balanced-rs-p10", "Balanced (rs.{n})", profile="balanced", imbalance=10),
        make("balanced-rs-p100", "Balanced (rs.{n})", profile="balanced", imbalance=100),
        make("balanced-full", "Balanced (full)", profile="full"),
    ]


def is_paper_subset(subset: NamedSubset) -> bool:
    """Whether ``subset`` is the Table 2 subset of its key (the paper's profile and imbalance)."""
    return any(p.key == subset.key and p.subset == subset.subset.model_copy(update={"seed": 0})
               for p in paper_subsets())


class SubsetGrid(GridConfig):
    """A pre-training grid: ``methods`` (imbssl methods, or variants of one in ``method_settings``) on ``subsets``,
    each run's config ``base`` with the method's settings; ``base.method`` keys go to the methods that have them."""

    #: the grid's methods that are not one pre-training run each (experiment II's pipelines)
    PIPELINES: ClassVar[tuple[str, ...]] = ()

    methods: list[str] = Field(min_length=1)
    subsets: list[NamedSubset] = Field(default_factory=paper_subsets)
    subset_keys: list[str] | None = Field(None, description="run only these subsets, in this order (None = all)")

    @model_validator(mode="after")
    def _check_grid(self) -> "SubsetGrid":
        if self.subset_keys is not None:
            by_key = {s.key: s for s in self.subsets}
            if unknown := [k for k in self.subset_keys if k not in by_key]:
                raise ValueError(f"subset_keys {unknown} are not among the subsets {sorted(by_key)}")
            self.subsets, self.subset_keys = [by_key[k] for k in self.subset_keys], None
        known = {*self.BUILT_IN, *self.method_settings}
        if unknown := [m for m in self.methods if m not in known | set(METHODS) | set(self.PIPELINES)]:
            raise ValueError(f"methods {unknown} are neither variants ({', '.join(sorted(known)) or 'none'}) nor "
                             f"methods ({', '.join([*METHODS, *self.PIPELINES])})")
        return self

    def run_config(self, subset: NamedSubset, method: str, seed: int) -> RunConfig:
        name = f"{subset.key}/{method}/seed{seed}"
        tree = deep_merge(self.run_tree(self.base, method),
                          {"name": name, "seed": seed, "data": {"subset": subset.subset.model_dump()}})
        return validate_tree(RunConfig, tree, origin=f"{self.NAME} run {name}")

    def pretrain_cell(self, out_dir: Path, subset: NamedSubset, method: str, seed: int) -> Cell:
        cfg = self.run_config(subset, method, seed)
        return Cell(axes={"subset": subset.key, "method": method}, seed=seed, kind="pretrain", config=cfg,
                    run_dir=out_dir / "runs" / cfg.name)

    def pretrain_cells(self, out_dir: Path) -> list[Cell]:
        """Every (subset, method, seed) of the grid's methods that are one pre-training run each."""
        return [self.pretrain_cell(out_dir, subset, method, seed) for subset in self.subsets for method in self.methods
                if method not in self.PIPELINES for seed in self.seeds]

    def pipeline_cell(self, out_dir: Path, subset: NamedSubset, variant: str, seed: int,
                      settings: OfflineClusteringSettings, base_from: Path | None = None) -> Cell:
        """The offline-clustering pipeline ``variant`` on ``subset``, SimSiam's run settings its base."""
        name = f"{subset.key}/{variant}/seed{seed}"
        base = self.run_config(subset, "simsiam", seed).model_copy(update={"name": name})
        cfg = OfflineClusteringConfig.model_validate({**settings.model_dump(), "base": base.model_dump()})
        return Cell(axes={"subset": subset.key, "method": variant}, seed=seed, kind="pipeline", config=cfg,
                    run_dir=out_dir / "runs" / name, base_dir=base_from)

    def eval_settings(self) -> EvalConfig:
        """The evaluation every run of the grid gets (``base.eval``)."""
        return EvalConfig.model_validate(self.base.get("eval", {}))

    def protocol(self) -> str:
        """The CIFAR-LT protocol the grid follows, in words, for its report."""
        order = self.base.get("data", {}).get("train_order")
        return (describe_protocol(self.subsets[0].subset, self.eval_settings())
                + (f" Train indices follow the order file {Path(order).name}." if order else ""))

    def thirds_table(self, results: Results, titles: dict[str, str], sizes: dict[str, int],
                     methods: list[str]) -> str:
        """The headline group split: accuracy on the major, minor and rare thirds of the classes (sorted by their
        pre-training count) and the std of the three, per method: how the long-tailed SSL literature reports."""
        header = ["Subset", "N"] + [f"{self.label(m)} {part}" for m in methods for part in (*THIRDS, "std")]
        metrics = [*(linear_group(t) for t in THIRDS), thirds_std]
        rows = [[titles[k], f"{sizes[k]:,}"] + [results.cell(metric, subset=k, method=m) for m in methods
                                               for metric in metrics] for k in titles]
        return markdown_table(header, rows)

    def accuracy_rows(self, results: Results, titles: dict[str, str], sizes: dict[str, int], methods: list[str],
                      metric: Metric = linear_top1) -> list[list[str]]:
        return [[titles[k], f"{sizes[k]:,}"] + [results.cell(metric, subset=k, method=m) for m in methods]
                for k in titles]

    def subset_titles(self, results: Results) -> tuple[dict[str, int], dict[str, str]]:
        """Each subset's N and its title with N filled in ('Balanced (rs.12K)'), by subset key."""
        sizes = {s.key: sum(next(c.eval for c in results.select(subset=s.key)).pretrain_class_counts)
                 for s in self.subsets}
        return sizes, {s.key: s.title.format(n=short_count(sizes[s.key])) for s in self.subsets}


def short_count(n: int) -> str:
    """12406 -> '12K', as the paper names its rescaled subsets."""
    return f"{n // 1000}K" if n >= 1000 else str(n)


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


def describe_subsets(base: RunConfig, subsets: list[NamedSubset]) -> tuple[list[str], dict[str, list[int]]]:
    """Class names and the per-class counts of each subset of the configured training pool (no training)."""
    train = load_splits(base.data)["train"]
    counts = {}
    for s in subsets:
        c = np.bincount(train.labels[select_subset(train.labels, s.subset)], minlength=len(train.classes)).tolist()
        counts[s.title.format(n=short_count(sum(c)))] = c
    return list(train.classes), counts
