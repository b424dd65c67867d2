"""Table 2 of "Rethinking the value of labels" (Yang & Xu 2020): long-tailed losses from scratch vs from SSP.

Self-supervised pre-training (SSP) runs on the long-tailed training set itself, without its labels; a
classifier is then trained on the same set with its labels, from that initialisation, with each loss.
The grid is (imbalance rho) x (SSP: none or an imbssl method) x (loss) x (seed); the seed's SSP is
Rotation, and every other imbssl SSL method is a column beyond the paper. SSP run s initialises the
classifiers of seed s, so differences are paired by seed.

    runs/rho100/ssp-rotation/seed0/            an SSP run (backbone.pt)
    runs/rho100/ce/ssp-rotation/seed0/         a classifier run (train.json)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imbssl.config import (ConfigError, OfflineClusteringConfig, RunConfig, SupervisedConfig, deep_merge, load_yaml,
                           validate_tree)
from imbssl.engine.distributed import main_only, require_one_process
from imbssl.pipelines.evaluate import EVAL_FILE, evaluate_run
from imbssl.pipelines.offline_clustering import run_pipeline
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.runfolder import RUN_CONFIG
from imbssl.pipelines.train import TRAIN_FILE, train
from imbssl.recipes.experiment_1 import METHOD_NAMES, describe_source
from imbssl.report import format_mean_std, markdown_table, paired_difference, plot_per_class_accuracy, verdict

log = logging.getLogger(__name__)

#: the losses of Table 2 (and beyond it) as LossConfig keys over the base config's loss section
LOSSES: dict[str, dict] = {
    "ce": {}, "cb-ce": {"reweight": "cb"}, "focal": {"name": "focal"}, "cb-focal": {"name": "focal", "reweight": "cb"},
    "ce-drw": {"deferral": "drw"}, "ce-drs": {"deferral": "drs"}, "ldam": {"name": "ldam"},
    "ldam-drw": {"name": "ldam", "deferral": "drw"}, "la": {"name": "logit_adjusted"},
}
#: rows read from another run's train.json: cRT and post-hoc logit adjustment re-use the CE run's main stage
DERIVED_ROWS = {"crt": ("ce", "crt"), "ce-posthoc-la": ("ce", "posthoc_logit_adjusted")}
ROW_NAMES = {"ce": "CE", "cb-ce": "CB-CE", "focal": "Focal", "cb-focal": "CB-Focal", "ce-drw": "CE-DRW",
             "ce-drs": "CE-DRS", "ldam": "LDAM", "ldam-drw": "LDAM-DRW", "la": "LA loss (Menon et al.)",
             "crt": "cRT (Kang et al.)", "ce-posthoc-la": "CE + post-hoc LA (Menon et al.)"}
SSP_NAMES = {"none": "scratch", "offline-clustering": "SimSiam+C+D", **METHOD_NAMES, "rotation": "Rotation",
             "moco": "MoCo v2", "excb": "ExCB"}

#: the paper's figures are the best test accuracy over the 200 epochs: Yang & Xu's train.py, as LDAM-DRW's
#: cifar_train.py, keeps best_acc1 = max(acc1, best_acc1) of each epoch's test accuracy (imbssl selects on validation)
PAPER_SETTING = "paper, ResNet-32, 200 ep, best test epoch"
#: Table 2's top-1 test error (%), by dataset, rho, row and SSP (the paper's SSP is Rotation on CIFAR-LT)
PAPER_TABLE2: dict[str, dict[int, dict[tuple[str, str], float]]] = {}
_PAPER_ROWS = [("ce", "none"), ("cb-ce", "none"), ("cb-ce", "rotation"), ("focal", "none"), ("cb-focal", "none"),
               ("cb-focal", "rotation"), ("ce-drw", "none"), ("ce-drs", "none"), ("ce-drw", "rotation"),
               ("ldam", "none"), ("ldam-drw", "none"), ("ldam-drw", "rotation")]
for _dataset, _rho, _errors in [
        ("cifar10", 100, "29.64 27.63 23.47 29.62 25.43 22.90 24.94 25.53 23.04 26.65 22.97 22.17"),
        ("cifar10", 50, "25.19 21.95 19.60 23.29 20.73 18.74 21.10 21.39 19.93 23.18 19.06 17.87"),
        ("cifar10", 10, "13.61 13.23 11.57 13.34 12.90 11.75 13.57 13.73 12.66 13.04 11.84 11.47"),
        ("cifar100", 100, "61.68 61.44 56.94 61.59 60.40 57.03 59.49 59.62 57.21 60.40 57.96 56.57"),
        ("cifar100", 50, "56.15 55.45 52.91 55.68 54.83 53.12 55.31 55.46 53.57 55.03 53.85 52.89"),
        ("cifar100", 10, "44.29 42.88 41.94 44.22 42.01 41.16 43.78 43.95 41.77 43.09 41.29 41.09")]:
    PAPER_TABLE2.setdefault(_dataset, {})[_rho] = dict(zip(_PAPER_ROWS, map(float, _errors.split())))


class PretrainingGrid(BaseModel):
    """The SSP part of a grid preset: the pre-training runs' settings, shared by every method, and each method's."""

    model_config = ConfigDict(extra="forbid")
    ssp: list[str] = ["none", "rotation"]
    ssp_base: dict = Field(default_factory=dict, description="a RunConfig tree for the SSP runs; their data and "
                                                             "model are base's")
    method_settings: dict[str, dict] = Field(default_factory=dict, description="RunConfig keys of one SSP method "
                                                                               "over ssp_base, e.g. Rotation's weak "
                                                                               "views or SimSiam's lr")
    offline_clustering: dict = Field(default_factory=dict, description="OfflineClusteringSettings keys (k, epochs) "
                                                                       "of the 'offline-clustering' SSP")
    ssp_runs: dict[str, str] = Field(default_factory=dict, description=(
        "SSP runs another recipe already made, by method: a run-folder template with {rho} and {seed}, e.g. "
        "{simclr: 'reports/experiment-1-cpu/runs/imbalanced-p{rho:g}/simclr/seed{seed}'}. Each must have "
        "pre-trained on the classifier's images with its backbone; it is used as it is, not re-trained"))

    @model_validator(mode="after")
    def _check_ssp(self) -> "PretrainingGrid":
        from imbssl.methods import METHODS

        if unknown := [s for s in self.ssp if s not in ("none", "offline-clustering", *METHODS)]:
            raise ValueError(f"ssp {unknown} are not among none, offline-clustering, {', '.join(METHODS)}")
        if unused := [m for m in self.ssp_runs if m not in self.ssp or m in ("none", "offline-clustering")]:
            raise ValueError(f"ssp_runs {unused} name no pre-training method of ssp {self.ssp}")
        return self

    def pretraining_config(self, name: str, sup: SupervisedConfig, method: str, seed: int) -> RunConfig:
        """SSP ``method`` on the images of ``sup.data`` (without their labels), with ``sup.model``."""
        tree = deep_merge(self.ssp_base, {"name": name, "seed": seed, "data": sup.data.model_dump(),
                                          "model": sup.model.model_dump(),
                                          "method": {"name": "simsiam" if method == "offline-clustering" else method}})
        tree = deep_merge(tree, self.method_settings.get(method, {}))
        return validate_tree(RunConfig, tree, origin=f"ssp pre-training {tree['name']}")

    def labeled_config(self, rho: float, seed: int) -> SupervisedConfig:
        """A classifier config of (rho, seed): SSP trains on its images, without their labels."""
        raise NotImplementedError

    def ssp_backbone(self, ssp: str, rho: float, seed: int, runs: Path) -> Path | None:
        """The backbone.pt that SSP method ``ssp`` trains for (rho, seed) under ``runs``; None for "none"."""
        if ssp == "none":
            return None
        if ssp in self.ssp_runs:
            return borrowed_backbone(Path(self.ssp_runs[ssp].format(rho=rho, seed=seed)), ssp,
                                     self.labeled_config(rho, seed))
        cfg = self.pretraining_config(f"rho{rho:g}/ssp-{ssp}/seed{seed}", self.labeled_config(rho, seed), ssp, seed)
        return self.pretrained_backbone(cfg, ssp, runs / cfg.name)

    def pretrained_backbone(self, cfg: RunConfig, method: str, run_dir: Path) -> Path:
        """The SSP run's backbone.pt, trained (or resumed) first when it is not there; evaluated like any run."""
        if not (run_dir / BACKBONE_FILE).exists():
            if method == "offline-clustering":
                pipeline = validate_tree(OfflineClusteringConfig, {**self.offline_clustering,
                                                                   "base": cfg.model_dump(mode="json")},
                                         origin="ssp preset offline_clustering")
                run_pipeline(pipeline, run_dir, resume=True)
            else:
                pretrain(cfg, run_dir, resume=True)
        if not (run_dir / EVAL_FILE).exists():
            main_only(evaluate_run)(run_dir)
        return run_dir / BACKBONE_FILE


def borrowed_backbone(run_dir: Path, method: str, sup: SupervisedConfig) -> Path:
    """``run_dir``'s backbone.pt, after checking that the run pre-trained ``method`` on ``sup``'s training images
    (the same source, file, subset and image size) with ``sup``'s backbone: anything else would not be SSP."""
    backbone = run_dir / BACKBONE_FILE
    if not backbone.exists():
        raise ConfigError(f"ssp_runs.{method}: no {BACKBONE_FILE} in {run_dir}: run that recipe first, or drop the key")
    theirs = validate_tree(RunConfig, load_yaml(run_dir / RUN_CONFIG, empty_ok=False), origin=str(run_dir / RUN_CONFIG))
    ours = sup.data
    same = {"method.name": theirs.method.name == method, "data.source": theirs.data.source == ours.source,
            "data.path": _resolved(theirs.data.path) == _resolved(ours.path),
            "data.subset": theirs.data.subset == ours.subset,
            "data.image_size": theirs.data.image_size == ours.image_size,
            "model": theirs.model == sup.model}
    if differ := [key for key, equal in same.items() if not equal]:
        raise ConfigError(f"ssp_runs.{method}: {run_dir} differs from the classifier's run in {', '.join(differ)}")
    return backbone


def _resolved(path: str | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None


class SSPExperimentConfig(PretrainingGrid):
    """A preset file: the classifier's config (``base``), the pre-training's (``ssp_base``) and the grid."""

    base: dict = Field(default_factory=dict, description="a SupervisedConfig tree shared by every classifier run")
    imbalances: list[float] = [100, 50, 10]
    rows: list[str] = ["ce", "cb-ce", "focal", "cb-focal", "ce-drw", "ce-drs", "ldam", "ldam-drw"]
    seeds: list[int] = [0, 1, 2]

    @model_validator(mode="after")
    def _check(self) -> "SSPExperimentConfig":
        if unknown := [r for r in self.rows if r not in LOSSES and r not in DERIVED_ROWS]:
            raise ValueError(f"rows {unknown} are not among {sorted(LOSSES) + sorted(DERIVED_ROWS)}")
        for rho in self.imbalances:  # every classifier config must validate before hours of training start
            for loss in self.trained_losses():
                self.classifier_config(rho, loss, "none", self.seeds[0])
        return self

    def trained_losses(self) -> list[str]:
        """The losses that get runs of their own: the rows, with the runs that derived rows read from."""
        needed = [DERIVED_ROWS[r][0] if r in DERIVED_ROWS else r for r in self.rows]
        return list(dict.fromkeys(needed))

    def supervised(self) -> SupervisedConfig:
        return validate_tree(SupervisedConfig, self.base, origin="ssp preset base")

    def subset(self, rho: float) -> dict:
        return {"profile": "exp", "imbalance": rho}

    def classifier_config(self, rho: float, loss: str, ssp: str, seed: int,
                          init_from: Path | None = None) -> SupervisedConfig:
        tree = deep_merge(self.base, {"name": f"rho{rho:g}/{loss}/{init_name(ssp)}/seed{seed}", "seed": seed,
                                      "data": {"subset": self.subset(rho)}, "loss": LOSSES[loss],
                                      "init_from": str(init_from) if init_from else None})
        if loss == "ce" and "crt" in self.rows:
            tree = deep_merge(tree, {"crt": {"enabled": True}})
        return validate_tree(SupervisedConfig, tree, origin=f"ssp run {tree['name']}")

    def labeled_config(self, rho: float, seed: int) -> SupervisedConfig:
        return self.classifier_config(rho, self.trained_losses()[0], "none", seed)


def init_name(ssp: str) -> str:
    """The folder of the runs that start from ``ssp``'s backbone."""
    return "scratch" if ssp == "none" else f"ssp-{ssp}"


def run_grid(exp: SSPExperimentConfig, out_dir: Path) -> list[dict]:
    """Every (rho, SSP, loss, seed); finished runs are reused, interrupted ones resumed."""
    if "offline-clustering" in exp.ssp:
        require_one_process("the offline-clustering SSP (leave it out of ssp)")
    runs, records = out_dir / "runs", []
    for rho in exp.imbalances:
        for ssp in exp.ssp:
            for seed in exp.seeds:
                init_from = exp.ssp_backbone(ssp, rho, seed, runs)
                for loss in exp.trained_losses():
                    cfg = exp.classifier_config(rho, loss, ssp, seed, init_from)
                    run_dir = runs / cfg.name
                    if not (run_dir / TRAIN_FILE).exists():
                        train(cfg, run_dir, resume=True)
                    records.append({"rho": rho, "ssp": ssp, "loss": loss, "seed": seed, "run_dir": str(run_dir),
                                    **json.loads((run_dir / TRAIN_FILE).read_text())})
    return records


# -- the report -------------------------------------------------------------------------------------
def row_results(records: list[dict], row: str, rho: float, ssp: str) -> dict[int, dict]:
    """seed -> the test report of ``row``: its own run's headline, or the part of the CE run it derives from."""
    loss, part = DERIVED_ROWS.get(row, (row, "main"))
    found = {}
    for r in records:
        if r["loss"] == loss and r["rho"] == rho and r["ssp"] == ssp:
            found[r["seed"]] = r[part]["test"]
    return found


def errors(records: list[dict], row: str, rho: float, ssp: str) -> dict[int, float]:
    return {seed: test["error"] for seed, test in row_results(records, row, rho, ssp).items()}


def paired_gain(records: list[dict], row: str, rho: float, ssp: str,
                baseline: tuple[str, str] | None = None) -> dict[int, float]:
    """seed -> error(baseline) - error(row with ``ssp``): positive when the row does better. The baseline is the
    same row from scratch unless given as (row, ssp); seeds that lack either side are left out."""
    base_row, base_ssp = baseline or (row, "none")
    return paired_difference(errors(records, base_row, rho, base_ssp), errors(records, row, rho, ssp))


def paper_dataset(records: list[dict], base: dict) -> str | None:
    """'cifar10' or 'cifar100' when the runs' data is that CIFAR (by source and class count), else None."""
    if base.get("data", {}).get("source", "digits") == "digits" or not records:
        return None
    return {10: "cifar10", 100: "cifar100"}.get(len(records[0]["test"]["per_class"]))


def error_table(exp: SSPExperimentConfig, records: list[dict], dataset: str | None) -> str:
    header = ["Loss", "SSP"] + [f"ρ={rho:g}" for rho in exp.imbalances]
    if dataset:
        header += [f"{PAPER_SETTING}, {dataset.upper()}-LT: ρ={rho:g}" for rho in exp.imbalances]
    rows = []
    for row in exp.rows:
        for ssp in exp.ssp:
            cells = []
            for rho in exp.imbalances:
                values = list(errors(records, row, rho, ssp).values())
                cells.append(format_mean_std(values) if values else "n/a")
            if dataset:
                paper = [PAPER_TABLE2[dataset].get(int(rho), {}).get((row, ssp)) for rho in exp.imbalances]
                cells += [f"{p:.2f}" if p is not None else "" for p in paper]
            rows.append([ROW_NAMES[row], SSP_NAMES.get(ssp, ssp), *cells])
    return markdown_table(header, rows)


def thirds_table(exp: SSPExperimentConfig, records: list[dict], rho: float) -> str:
    header = ["Loss", "SSP", "top-1", "major", "minor", "rare", "many", "medium", "few"]
    rows = []
    for row in exp.rows:
        for ssp in exp.ssp:
            tests = list(row_results(records, row, rho, ssp).values())
            if not tests:
                continue
            cells = [format_mean_std([t["top1"] for t in tests])]
            cells += [format_mean_std([t["thirds"][g] for t in tests]) for g in ("major", "minor", "rare")]
            cells += [format_mean_std([t[g] for t in tests]) if all(t[g] is not None for t in tests) else "n/a"
                      for g in ("many", "medium", "few")]
            rows.append([ROW_NAMES[row], SSP_NAMES.get(ssp, ssp), *cells])
    return markdown_table(header, rows)


def verdict_lines(exp: SSPExperimentConfig, records: list[dict]) -> list[str]:
    """The paper's three claims, each measured as paired-by-seed differences of test error."""
    lines, top, bottom = [], max(exp.imbalances), min(exp.imbalances)
    for ssp in (s for s in exp.ssp if s != "none"):
        lines.append(f"- SSP from {SSP_NAMES.get(ssp, ssp)} improves each loss (error from scratch - error with SSP):")
        for rho in exp.imbalances:
            for row in exp.rows:
                lines.append(f"  - {ROW_NAMES[row]}, ρ={rho:g}: {verdict(paired_gain(records, row, rho, ssp))}")
        if top != bottom:
            lines.append(f"- The gain from {SSP_NAMES.get(ssp, ssp)} grows with ρ (gain at ρ={top:g} - gain at "
                         f"ρ={bottom:g}):")
            for row in exp.rows:
                high, low = paired_gain(records, row, top, ssp), paired_gain(records, row, bottom, ssp)
                lines.append(f"  - {ROW_NAMES[row]}: {verdict(paired_difference(high, low))}")
    if "ldam-drw" in exp.rows and "ce" in exp.rows:
        lines.append("- LDAM-DRW beats CE (error of CE - error of LDAM-DRW):")
        for ssp in exp.ssp:
            for rho in exp.imbalances:
                gains = paired_gain(records, "ldam-drw", rho, ssp, baseline=("ce", ssp))
                lines.append(f"  - {SSP_NAMES.get(ssp, ssp)}, ρ={rho:g}: {verdict(gains)}")
    return lines


@main_only
def write_report(exp: SSPExperimentConfig, records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md (Table 2's layout: test error by loss x SSP x rho), thirds, verdicts, the per-class figure."""
    sup, source = exp.supervised(), describe_source(exp.base)
    dataset = paper_dataset(records, exp.base)
    lines = [f"# SSP then long-tailed supervised learning on {source}: top-1 test error (%), mean ± std over "
             f"{len(exp.seeds)} seed(s)", "", f"Command: `{command}`", "",
             f"Classifier: {sup.model.backbone} (width {sup.model.width:g}), {sup.optim.epochs} epochs "
             f"(paper: 200), lr {sup.optim.lr:g} x {sup.optim.lr_factors} at epochs {sup.optim.milestones}, "
             f"deferral at epoch {sup.loss.defer_epoch}; the epoch is selected on a held-out balanced validation set.",
             ""]
    if not dataset:
        lines += [f"The paper's figures (CIFAR-LT, ResNet-32, 200 epochs) are left out: {source} is not comparable.",
                  ""]
    for method, template in exp.ssp_runs.items():
        lines += [f"SSP from {SSP_NAMES.get(method, method)}: the runs `{template}` of another recipe, with their "
                  f"settings.", ""]
    lines += [error_table(exp, records, dataset), "", "## Verdicts (paired by seed)", "", *verdict_lines(exp, records),
              ""]
    top = max(exp.imbalances)
    lines += [f"## Test accuracy by group at ρ={top:g} (thirds by training count; many > 100, few < 20 images)", "",
              thirds_table(exp, records, top), ""]
    train_s = sum(r["wall_s_this_call"] for r in records)
    lines += [f"{len(records)} classifier runs: {train_s / 60:.1f} min of training and testing (sum over runs, "
              f"SSP not included) on {'; '.join(sorted({r['hardware'] for r in records}))}."]
    plot_ce_per_class(exp, records, out_dir, top, source)
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def plot_ce_per_class(exp: SSPExperimentConfig, records: list[dict], out_dir: Path, rho: float, source: str) -> None:
    """Per-class test accuracy of CE from scratch and from each SSP, mean over seeds, beside the train counts."""
    if "ce" not in exp.trained_losses():
        return
    per_class = {}
    for ssp in exp.ssp:
        tests = list(row_results(records, "ce", rho, ssp).values())
        if tests:
            classes = list(tests[0]["per_class"])
            per_class[f"CE, {SSP_NAMES.get(ssp, ssp)}"] = np.mean([[t["per_class"][c] for c in classes]
                                                                   for t in tests], axis=0).tolist()
    counts = next(r["train_class_counts"] for r in records if r["rho"] == rho)
    plot_per_class_accuracy(per_class, classes, out_dir / f"per_class_accuracy-ce-rho{rho:g}.png", counts,
                            title=f"CE vs CE + SSP: test accuracy per class, ρ={rho:g}, mean over {len(exp.seeds)} "
                                  f"seed(s), {source}")
