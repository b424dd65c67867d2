"""Table 1 of "Rethinking the value of labels" (Yang & Xu 2020): long-tailed learning with and without
self-training on imbalanced unlabeled data D_U @5x.

The grid is (rho) x (rho_U) x (loss: CE, LDAM-DRW) x (initialisation: scratch, or an SSP method) x (seed).
One self-training run gives two rows: its base classifier is "CE" (trained on D_L alone), its final model
"CE + D_U". D_L and the validation set do not depend on rho_U, so the rho_U columns share one base classifier,
as the seed's table does. SSP ("beyond the seed") pre-trains on D_L's images and initialises both classifiers.

    runs/rho100/ce/scratch/seed0/base/        the base classifier (train.json)
    runs/rho100/ce/scratch/seed0/rhoU1/       a self-training run (self_training.json) that uses it
    runs/rho100/ssp-rotation/seed0/           an SSP run on D_L (backbone.pt)

D_U is drawn from the CIFAR training pool itself (disjoint from D_L), not from 80M Tiny Images as in the
seed, so the seed's numbers sit in their own columns (docs/semi-supervised.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from imbssl.config import SelfTrainingConfig, deep_merge, validate_tree
from imbssl.recipes.grid import Cell, Metric, Results, paper_dataset
from imbssl.recipes.ssp import LOSSES, PretrainingGrid, init_name
from imbssl.records import ClassifierReport
from imbssl.report import Paired, markdown_table, verdict

#: the seed's unlabeled imbalance ratios, relative to rho
RELATIVE_RHO_U = {"rho/2": 0.5, "rho": 1.0, "2rho": 2.0}
ROW_NAMES = {"ce": "CE", "ldam-drw": "LDAM-DRW"}
#: the seed's figures are the best test accuracy over the epochs (train_semi.py and train.py keep max(acc1, best_acc1))
PAPER_SETTING = "seed (D_U from 80M Tiny Images), ResNet-32, 200 ep, best test epoch"
#: Table 1(a), CIFAR-10-LT: top-1 test error (%) by rho, then (loss, with D_U) and rho_U as in RELATIVE_RHO_U or 1
PAPER_TABLE1: dict[int, dict[tuple[str, bool], dict[str, float]]] = {}
for _rho, _ce, _ce_u, _ldam, _ldam_u in [(100, 29.64, "17.48 18.42 18.74 20.06", 22.97, "14.96 15.18 15.33 15.55"),
                                         (50, 25.19, "16.79 16.88 18.36 19.94", 19.06, "14.33 14.70 14.93 15.24"),
                                         (10, 13.61, "10.22 10.48 10.86 11.04", 11.84, "8.72 8.24 8.68 8.97")]:
    _specs = ["1", "rho/2", "rho", "2rho"]
    PAPER_TABLE1[_rho] = {("ce", False): dict.fromkeys(_specs, _ce), ("ldam-drw", False): dict.fromkeys(_specs, _ldam),
                          ("ce", True): dict(zip(_specs, map(float, _ce_u.split()))),
                          ("ldam-drw", True): dict(zip(_specs, map(float, _ldam_u.split())))}


def rho_u_value(spec: str, rho: float) -> float:
    """'1' -> 1, 'rho/2' -> rho / 2, 'rho' -> rho, '2rho' -> 2 rho, '37' -> 37."""
    return RELATIVE_RHO_U[spec] * rho if spec in RELATIVE_RHO_U else float(spec)


def stage_figure(stage: str, figure) -> Metric:
    """``figure`` of the base ("base") or final ("final") classifier's test report."""
    return lambda cell: figure(getattr(cell.self_training, stage))


def top1(test: ClassifierReport) -> float:
    return test.top1


def rare_third(test: ClassifierReport) -> float | None:
    return test.thirds.rare


class SemiSupervisedExperimentConfig(PretrainingGrid):
    """A preset file: the self-training config shared by every run (``base``), the SSP settings and the grid."""

    NAME: ClassVar[str] = "semi-supervised"
    PRESETS: ClassVar[str] = "semi-supervised"
    TITLE: ClassVar[str] = "Self-training with imbalanced unlabeled data"
    MEASURE: ClassVar[str] = "top-1 test error (%)"

    unlabeled_imbalances: list[str] = Field(["1", "rho/2", "rho", "2rho"],
                                            description="rho_U: a number, or rho/2, rho, 2rho")
    losses: list[str] = ["ce", "ldam-drw"]
    ssp: list[str] = ["none"]
    seeds: list[int] = Field([0, 1], min_length=1)

    @field_validator("unlabeled_imbalances", mode="before")
    @classmethod
    def _as_strings(cls, specs: list) -> list[str]:
        return [f"{s:g}" if isinstance(s, (int, float)) else s for s in specs]

    @model_validator(mode="after")
    def _check(self) -> "SemiSupervisedExperimentConfig":
        if unknown := [loss for loss in self.losses if loss not in LOSSES]:
            raise ValueError(f"losses {unknown} are not among {sorted(LOSSES)}")
        for spec in self.unlabeled_imbalances:
            if spec not in RELATIVE_RHO_U:
                try:
                    float(spec)
                except ValueError:
                    raise ValueError(f"unlabeled_imbalances: {spec!r} is not a number, rho/2, rho or 2rho") from None
        return self

    def run_config(self, rho: float, spec: str, loss: str, ssp: str, seed: int,
                   init_from: Path | None = None) -> SelfTrainingConfig:
        rho_u = rho_u_value(spec, rho)
        name = f"rho{rho:g}/{loss}/{init_name(ssp)}/seed{seed}/rhoU{rho_u:g}"
        tree = deep_merge(self.base, {"name": name, "seed": seed,
                                      "data": {"subset": {"profile": "exp", "imbalance": rho, "seed": seed}},
                                      "unlabeled": {"imbalance": rho_u}, "loss": LOSSES[loss],
                                      "init_from": str(init_from) if init_from else None})
        return validate_tree(SelfTrainingConfig, tree, origin=f"semi-supervised run {tree['name']}")

    def self_training(self) -> SelfTrainingConfig:
        return validate_tree(SelfTrainingConfig, self.base, origin="semi-supervised preset base")

    def labeled_config(self, rho: float, seed: int) -> SelfTrainingConfig:
        return self.run_config(rho, self.unlabeled_imbalances[0], self.losses[0], "none", seed)

    def cells(self, out_dir: Path) -> list[Cell]:
        """Every (rho, SSP, seed, loss, rho_U). The rho_U columns of a (loss, SSP, seed) share one base classifier,
        and every loss's run takes the CE run's base as its CE labeller (``pseudo_labels.labeller: ce``)."""
        runs, cells = out_dir / "runs", []
        for rho in self.imbalances:
            for seed in self.seeds:
                ssp_cells, backbones = self.initialisations(out_dir, rho, seed)
                cells += ssp_cells
                for ssp in self.ssp:
                    for loss in self.losses:
                        for spec in self.unlabeled_imbalances:
                            cfg = self.run_config(rho, spec, loss, ssp, seed, backbones[ssp])
                            ce = self.run_config(rho, spec, "ce", ssp, seed, backbones[ssp])
                            run_dir = runs / cfg.name
                            cells.append(Cell(axes={"rho": rho, "rho_u": spec, "ssp": ssp, "loss": loss}, seed=seed,
                                              kind="self-train", config=cfg, run_dir=run_dir,
                                              base_dir=run_dir.parent / "base",
                                              labeller_dir=runs / Path(ce.name).parent / "base"))
        return cells

    # -- the report -------------------------------------------------------------------------------------
    def gain(self, results: Results, loss: str, rho: float, spec: str, ssp: str, figure) -> Paired:
        """figure(final) - figure(base) by seed, for ``figure`` of a test report (top-1, a group's accuracy)."""
        return Paired(results.by_seed(lambda c: figure(c.self_training.final) - figure(c.self_training.base),
                                      loss=loss, rho=rho, rho_u=spec, ssp=ssp))

    def error_table(self, results: Results, paper: bool) -> str:
        columns = [(rho, spec) for rho in self.imbalances for spec in self.unlabeled_imbalances]
        header = ["Loss", "SSP", "D_U"] + [f"ρ={rho:g}, ρ_U={rho_u_value(spec, rho):g}" for rho, spec in columns]
        if paper:
            header += [f"{PAPER_SETTING}: ρ={rho:g}, ρ_U={spec}" for rho, spec in columns]
        rows, size_factor = [], self.self_training().unlabeled.size_factor
        for loss in self.losses:
            for ssp in self.ssp:
                for with_u, stage in ((False, "base"), (True, "final")):
                    error = stage_figure(stage, lambda t: t.error)
                    cells = [results.cell(error, loss=loss, rho=rho, rho_u=spec, ssp=ssp) for rho, spec in columns]
                    if paper:
                        cells += [f"{PAPER_TABLE1[int(rho)][(loss, with_u)][spec]:.2f}"
                                  if int(rho) in PAPER_TABLE1 and spec in PAPER_TABLE1[int(rho)][(loss, with_u)]
                                  else "" for rho, spec in columns]
                    rows.append([ROW_NAMES.get(loss, loss), self.label(ssp),
                                 f"+ D_U @{size_factor:g}x" if with_u else "none", *cells])
        return markdown_table(header, rows)

    def group_table(self, results: Results, rho: float) -> str:
        """Test accuracy by thirds of D_L (and pseudo-label accuracy), base vs final, at one rho."""
        header = ["Loss", "SSP", "ρ_U", "stage", "top-1", "major", "minor", "rare", "pseudo-labels right (%)"]
        thirds = [top1, lambda t: t.thirds.major, lambda t: t.thirds.minor, rare_third]
        rows = []
        for loss in self.losses:
            for ssp in self.ssp:
                for spec in self.unlabeled_imbalances:
                    axes = {"loss": loss, "rho": rho, "rho_u": spec, "ssp": ssp}
                    if not results.select(**axes):
                        continue
                    for stage in ("base", "final"):
                        labels = (results.cell(lambda c: c.self_training.pseudo_labels.accuracy, **axes)
                                  if stage == "final" else "")
                        rows.append([ROW_NAMES.get(loss, loss), self.label(ssp), f"{rho_u_value(spec, rho):g}", stage,
                                     *(results.cell(stage_figure(stage, f), **axes) for f in thirds), labels])
        return markdown_table(header, rows)

    def verdict_lines(self, results: Results) -> list[str]:
        """The seed's claims, each as paired-by-seed differences (final - base, in top-1 points)."""
        lines = []
        for ssp in self.ssp:
            init = self.label(ssp)
            for rho in self.imbalances:
                lines.append(f"- Unlabeled data helps at ρ={rho:g}, from {init} (top-1 of +D_U - top-1 without):")
                for loss in self.losses:
                    for spec in self.unlabeled_imbalances:
                        gain = self.gain(results, loss, rho, spec, ssp, top1)
                        lines.append(f"  - {ROW_NAMES.get(loss, loss)}, ρ_U={rho_u_value(spec, rho):g}: "
                                     f"{verdict(gain)}")
                if len(self.unlabeled_imbalances) > 1:
                    low = min(self.unlabeled_imbalances, key=lambda s: rho_u_value(s, rho))
                    high = max(self.unlabeled_imbalances, key=lambda s: rho_u_value(s, rho))
                    lines.append(f"- The gain shrinks as ρ_U grows, ρ={rho:g}, from {init} (gain at ρ_U="
                                 f"{rho_u_value(low, rho):g} - gain at ρ_U={rho_u_value(high, rho):g}):")
                    for loss in self.losses:
                        shrinks = (self.gain(results, loss, rho, low, ssp, top1)
                                   - self.gain(results, loss, rho, high, ssp, top1))
                        lines.append(f"  - {ROW_NAMES.get(loss, loss)}: {verdict(shrinks)}")
                lines.append(f"- What the rare third of classes gains, ρ={rho:g}, from {init} (its accuracy with "
                             f"D_U - without):")
                for loss in self.losses:
                    for spec in self.unlabeled_imbalances:
                        gain = self.gain(results, loss, rho, spec, ssp, rare_third)
                        lines.append(f"  - {ROW_NAMES.get(loss, loss)}, ρ_U={rho_u_value(spec, rho):g}: "
                                     f"{verdict(gain)}")
        return lines

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """Table 1's layout (test error by loss x D_U x rho x rho_U), verdicts, groups."""
        cfg = self.self_training()
        paper = paper_dataset(results.select(kind="self-train")[0].self_training.base.per_class) == "cifar10"
        balanced = ", class-balanced" if cfg.pseudo_labels.class_balanced else ""
        lines = [f"D_L: exponential profile, head {cfg.data.subset.head_count or 'the full class'}; D_U: "
                 f"{cfg.unlabeled.size_factor:g} x |D_L| images of the same training pool, disjoint from D_L; "
                 f"pseudo-labels kept above confidence {cfg.pseudo_labels.threshold:g}{balanced}, weight "
                 f"ω={cfg.pseudo_labels.weight:g}. Classifiers: {cfg.model.backbone} (width {cfg.model.width:g}), "
                 f"{cfg.optim.epochs} epochs (seed: 200), the epoch selected on a held-out balanced validation set.",
                 ""]
        if not paper:
            lines += [f"The seed's figures (CIFAR-10-LT, D_U from 80M Tiny Images) are left out: {self.source()} is "
                      f"not comparable.", ""]
        lines += self.describe_borrowed()
        top = max(self.imbalances)
        lines += [self.error_table(results, paper), "", "## Verdicts (paired by seed)", "",
                  *self.verdict_lines(results), "", f"## Test accuracy by thirds of D_L at ρ={top:g}", "",
                  self.group_table(results, top), ""]
        return lines
