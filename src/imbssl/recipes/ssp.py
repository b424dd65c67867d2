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

from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
from pydantic import Field, model_validator

from imbssl.config import ConfigError, OfflineClusteringConfig, RunConfig, SupervisedConfig, deep_merge, validate_tree
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG, read_saved_config
from imbssl.recipes.experiment_2 import PIPELINE, PIPELINE_LABELS
from imbssl.recipes.grid import Cell, CellRecord, GridConfig, Metric, Results, paper_dataset
from imbssl.records import ClassifierReport
from imbssl.report import Paired, markdown_table, plot_per_class_accuracy, verdict

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
#: what the tables call the initialisations that are not a method (the methods' own display names say the rest)
SSP_LABELS = {"none": "scratch", "offline-clustering": PIPELINE_LABELS[PIPELINE]}

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



class PretrainingGrid(GridConfig):
    """A grid of classifiers (``base`` is their config) initialised from scratch or by self-supervised pre-training
    (SSP) on their own images: the SSP runs' settings (``ssp_base``), shared by every method, each method's
    (``method_settings``: run keys of one SSP method over ``ssp_base``) and the SSP runs another recipe made."""

    LABELS: ClassVar[dict[str, str]] = SSP_LABELS
    #: the offline-clustering SSP is the pipeline whose base is SimSiam's run
    BUILT_IN: ClassVar[dict[str, dict]] = {"offline-clustering": {"method": {"name": "simsiam"}}}

    imbalances: list[float] = Field([100, 50, 10], min_length=1)
    ssp: list[str] = ["none", "rotation"]
    ssp_base: dict = Field(default_factory=dict, description="a RunConfig tree for the SSP runs; their data and "
                                                             "model are base's")
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

    def labeled_config(self, rho: float, seed: int) -> SupervisedConfig:
        """A classifier config of (rho, seed): SSP trains on its images, without their labels."""
        raise NotImplementedError

    def pretraining_config(self, name: str, sup: SupervisedConfig, method: str, seed: int) -> RunConfig:
        """SSP ``method`` on the images of ``sup.data`` (without their labels), with ``sup.model``."""
        tree = deep_merge(self.run_tree(self.ssp_base, method, where="ssp_base"),
                          {"name": name, "seed": seed, "data": sup.data.model_dump(), "model": sup.model.model_dump()})
        return validate_tree(RunConfig, tree, origin=f"ssp pre-training {name}")

    def ssp_cell(self, out_dir: Path, rho: float, ssp: str, seed: int) -> Cell | None:
        """The SSP run of (rho, ssp, seed), evaluated as any run; None from scratch or from another recipe's run."""
        if ssp == "none" or ssp in self.ssp_runs:
            return None
        name = f"rho{rho:g}/ssp-{ssp}/seed{seed}"
        cfg = self.pretraining_config(name, self.labeled_config(rho, seed), ssp, seed)
        if ssp == "offline-clustering":
            pipeline = validate_tree(OfflineClusteringConfig, {**self.offline_clustering,
                                                               "base": cfg.model_dump(mode="json")},
                                     origin="ssp preset offline_clustering")
            return Cell(axes={"rho": rho, "ssp": ssp}, seed=seed, kind="pipeline", config=pipeline,
                        run_dir=out_dir / "runs" / name)
        return Cell(axes={"rho": rho, "ssp": ssp}, seed=seed, kind="pretrain", config=cfg,
                    run_dir=out_dir / "runs" / name)

    def initialisations(self, out_dir: Path, rho: float, seed: int) -> tuple[list[Cell], dict[str, Path | None]]:
        """The SSP cells of (rho, seed) and the backbone.pt each SSP of the grid gives its classifiers (None from
        scratch)."""
        cells, backbones = [], {}
        for ssp in self.ssp:
            if ssp in self.ssp_runs:
                backbones[ssp] = borrowed_backbone(Path(self.ssp_runs[ssp].format(rho=rho, seed=seed)), ssp,
                                                   self.labeled_config(rho, seed))
            elif cell := self.ssp_cell(out_dir, rho, ssp, seed):
                cells.append(cell)
                backbones[ssp] = cell.run_dir / BACKBONE_FILE
            else:
                backbones[ssp] = None
        return cells, backbones

    def describe_borrowed(self) -> list[str]:
        """A line for each SSP borrowed from another recipe's runs, then a blank one (none when nothing is)."""
        lines = [f"SSP from {self.label(method)}: the runs `{template}` of another recipe, with their settings."
                 for method, template in self.ssp_runs.items()]
        return [*lines, ""] if lines else []


def borrowed_backbone(run_dir: Path, method: str, sup: SupervisedConfig) -> Path:
    """``run_dir``'s backbone.pt, after checking that the run pre-trained ``method`` on ``sup``'s training images
    (the same source, file, subset and image size) with ``sup``'s backbone: anything else would not be SSP."""
    backbone = run_dir / BACKBONE_FILE
    if not backbone.exists():
        raise ConfigError(f"ssp_runs.{method}: no {BACKBONE_FILE} in {run_dir}: run that recipe first, or drop the key")
    theirs = read_saved_config(run_dir / RUN_CONFIG, RunConfig)
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


def init_name(ssp: str) -> str:
    """The folder of the runs that start from ``ssp``'s backbone."""
    return "scratch" if ssp == "none" else f"ssp-{ssp}"


def row_test(row: str) -> tuple[str, Callable[[CellRecord], ClassifierReport]]:
    """The loss whose runs hold ``row``, and the row's test report in them: its own run's main stage, or the part of
    the CE run it derives from (cRT, post-hoc logit adjustment)."""
    loss, part = DERIVED_ROWS.get(row, (row, "main"))
    return loss, lambda cell: cell.train.stage(part).test


def row_error(row: str) -> tuple[str, Metric]:
    loss, test = row_test(row)
    return loss, lambda cell: test(cell).error


#: the test report's figures of the group table: top-1, the thirds, many / medium / few
GROUP_FIGURES: list[Callable[[ClassifierReport], float | None]] = [
    lambda t: t.top1, lambda t: t.thirds.major, lambda t: t.thirds.minor, lambda t: t.thirds.rare,
    lambda t: t.many, lambda t: t.medium, lambda t: t.few]


class SSPExperimentConfig(PretrainingGrid):
    """A preset file: the classifier's config (``base``), the pre-training's (``ssp_base``) and the grid."""

    NAME: ClassVar[str] = "ssp"
    PRESETS: ClassVar[str] = "ssp"
    TITLE: ClassVar[str] = "SSP then long-tailed supervised learning"
    MEASURE: ClassVar[str] = "top-1 test error (%)"

    rows: list[str] = ["ce", "cb-ce", "focal", "cb-focal", "ce-drw", "ce-drs", "ldam", "ldam-drw"]

    @model_validator(mode="after")
    def _check(self) -> "SSPExperimentConfig":
        if unknown := [r for r in self.rows if r not in LOSSES and r not in DERIVED_ROWS]:
            raise ValueError(f"rows {unknown} are not among {sorted(LOSSES) + sorted(DERIVED_ROWS)}")
        return self

    def trained_losses(self) -> list[str]:
        """The losses that get runs of their own: the rows, with the runs that derived rows read from."""
        needed = [DERIVED_ROWS[r][0] if r in DERIVED_ROWS else r for r in self.rows]
        return list(dict.fromkeys(needed))

    def supervised(self) -> SupervisedConfig:
        return validate_tree(SupervisedConfig, self.base, origin="ssp preset base")

    def classifier_config(self, rho: float, loss: str, ssp: str, seed: int,
                          init_from: Path | None = None) -> SupervisedConfig:
        tree = deep_merge(self.base, {"name": f"rho{rho:g}/{loss}/{init_name(ssp)}/seed{seed}", "seed": seed,
                                      "data": {"subset": {"profile": "exp", "imbalance": rho}}, "loss": LOSSES[loss],
                                      "init_from": str(init_from) if init_from else None})
        if loss == "ce" and "crt" in self.rows:
            tree = deep_merge(tree, {"crt": {"enabled": True}})
        return validate_tree(SupervisedConfig, tree, origin=f"ssp run {tree['name']}")

    def labeled_config(self, rho: float, seed: int) -> SupervisedConfig:
        return self.classifier_config(rho, self.trained_losses()[0], "none", seed)

    def cells(self, out_dir: Path) -> list[Cell]:
        """Every (rho, SSP, seed): the SSP run, then the classifier of each loss from its backbone."""
        cells = []
        for rho in self.imbalances:
            for seed in self.seeds:
                ssp_cells, backbones = self.initialisations(out_dir, rho, seed)
                cells += ssp_cells
                for ssp in self.ssp:
                    for loss in self.trained_losses():
                        cfg = self.classifier_config(rho, loss, ssp, seed, backbones[ssp])
                        cells.append(Cell(axes={"rho": rho, "ssp": ssp, "loss": loss}, seed=seed, kind="train",
                                          config=cfg, run_dir=out_dir / "runs" / cfg.name))
        return cells

    # -- the report -------------------------------------------------------------------------------------
    def paired_gain(self, results: Results, row: str, rho: float, ssp: str,
                    baseline: tuple[str, str] | None = None) -> Paired:
        """error(baseline) - error(row with ``ssp``), paired by seed: positive when the row does better. The baseline
        is the same row from scratch unless given as (row, ssp)."""
        base_row, base_ssp = baseline or (row, "none")
        loss, metric = row_error(row)
        return results.paired(metric, {"loss": row_error(base_row)[0], "rho": rho, "ssp": base_ssp},
                              {"loss": loss, "rho": rho, "ssp": ssp})

    def error_table(self, results: Results, dataset: str | None) -> str:
        header = ["Loss", "SSP"] + [f"ρ={rho:g}" for rho in self.imbalances]
        if dataset:
            header += [f"{PAPER_SETTING}, {dataset.upper()}-LT: ρ={rho:g}" for rho in self.imbalances]
        rows = []
        for row in self.rows:
            loss, metric = row_error(row)
            for ssp in self.ssp:
                cells = [results.cell(metric, loss=loss, rho=rho, ssp=ssp) for rho in self.imbalances]
                if dataset:
                    paper = [PAPER_TABLE2[dataset].get(int(rho), {}).get((row, ssp)) for rho in self.imbalances]
                    cells += [f"{p:.2f}" if p is not None else "" for p in paper]
                rows.append([ROW_NAMES[row], self.label(ssp), *cells])
        return markdown_table(header, rows)

    def thirds_table(self, results: Results, rho: float) -> str:
        header = ["Loss", "SSP", "top-1", "major", "minor", "rare", "many", "medium", "few"]
        rows = []
        for row in self.rows:
            loss, test = row_test(row)
            for ssp in self.ssp:
                if results.select(loss=loss, rho=rho, ssp=ssp):
                    rows.append([ROW_NAMES[row], self.label(ssp),
                                 *(results.cell(lambda c, f=f: f(test(c)), loss=loss, rho=rho, ssp=ssp)
                                   for f in GROUP_FIGURES)])
        return markdown_table(header, rows)

    def verdict_lines(self, results: Results) -> list[str]:
        """The paper's three claims, each measured as paired-by-seed differences of test error."""
        lines, top, bottom = [], max(self.imbalances), min(self.imbalances)
        for ssp in (s for s in self.ssp if s != "none"):
            lines.append(f"- SSP from {self.label(ssp)} improves each loss (error from scratch - error with SSP):")
            for rho in self.imbalances:
                for row in self.rows:
                    lines.append(f"  - {ROW_NAMES[row]}, ρ={rho:g}: "
                                 f"{verdict(self.paired_gain(results, row, rho, ssp))}")
            if top != bottom:
                lines.append(f"- The gain from {self.label(ssp)} grows with ρ (gain at ρ={top:g} - gain at "
                             f"ρ={bottom:g}):")
                for row in self.rows:
                    grows = self.paired_gain(results, row, top, ssp) - self.paired_gain(results, row, bottom, ssp)
                    lines.append(f"  - {ROW_NAMES[row]}: {verdict(grows)}")
        if "ldam-drw" in self.rows and "ce" in self.rows:
            lines.append("- LDAM-DRW beats CE (error of CE - error of LDAM-DRW):")
            for ssp in self.ssp:
                for rho in self.imbalances:
                    gain = self.paired_gain(results, "ldam-drw", rho, ssp, baseline=("ce", ssp))
                    lines.append(f"  - {self.label(ssp)}, ρ={rho:g}: {verdict(gain)}")
        return lines

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """Table 2's layout (test error by loss x SSP x rho), thirds, verdicts, the per-class figure."""
        sup = self.supervised()
        classifiers = results.select(kind="train")
        dataset = paper_dataset(classifiers[0].train.test.per_class)
        lines = [f"Classifier: {sup.model.backbone} (width {sup.model.width:g}), {sup.optim.epochs} epochs "
                 f"(paper: 200), lr {sup.optim.lr:g} x {sup.optim.lr_factors} at epochs {sup.optim.milestones}, "
                 f"deferral at epoch {sup.loss.defer_epoch}; the epoch is selected on a held-out balanced validation "
                 f"set.", ""]
        if not dataset:
            lines += [f"The paper's figures (CIFAR-LT, ResNet-32, 200 epochs) are left out: {self.source()} is not "
                      f"comparable.", ""]
        lines += self.describe_borrowed()
        top = max(self.imbalances)
        lines += [self.error_table(results, dataset), "", "## Verdicts (paired by seed)", "",
                  *self.verdict_lines(results), "",
                  f"## Test accuracy by group at ρ={top:g} (thirds by training count; many > 100, few < 20 images)",
                  "", self.thirds_table(results, top), ""]
        self.plot_ce_per_class(results, out_dir, top)
        return lines

    def plot_ce_per_class(self, results: Results, out_dir: Path, rho: float) -> None:
        """Per-class test accuracy of CE from scratch and from each SSP, mean over seeds, beside the train counts."""
        if "ce" not in self.trained_losses():
            return
        per_class = {}
        for ssp in self.ssp:
            if tests := [c.train.stage("main").test for c in results.select(loss="ce", rho=rho, ssp=ssp)]:
                classes = list(tests[0].per_class)
                per_class[f"CE, {self.label(ssp)}"] = np.mean([[t.per_class[c] for c in classes] for t in tests],
                                                              axis=0).tolist()
        counts = results.select(kind="train", rho=rho)[0].train.train_class_counts
        plot_per_class_accuracy(per_class, classes, out_dir / f"per_class_accuracy-ce-rho{rho:g}.png", counts,
                                title=f"CE vs CE + SSP: test accuracy per class, ρ={rho:g}, mean over "
                                      f"{len(self.seeds)} seed(s), {self.source()}")

