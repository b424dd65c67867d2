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

import json
import logging
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from imbssl.config import SelfTrainingConfig, deep_merge, validate_tree
from imbssl.engine.distributed import require_one_process
from imbssl.pipelines.self_training import REPORT_FILE, self_train
from imbssl.recipes.experiment_1 import describe_source
from imbssl.recipes.ssp import LOSSES, SSP_NAMES, PretrainingGrid, init_name
from imbssl.report import format_mean_std, markdown_table, paired_difference, verdict

log = logging.getLogger(__name__)

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


class SemiSupervisedExperimentConfig(PretrainingGrid):
    """A preset file: the self-training config shared by every run (``base``), the SSP settings and the grid."""

    base: dict = Field(default_factory=dict, description="a SelfTrainingConfig tree shared by every run")
    imbalances: list[float] = [100, 50, 10]
    unlabeled_imbalances: list[str] = Field(["1", "rho/2", "rho", "2rho"],
                                            description="rho_U: a number, or rho/2, rho, 2rho")
    losses: list[str] = ["ce", "ldam-drw"]
    ssp: list[str] = ["none"]
    seeds: list[int] = [0, 1]

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
        for rho in self.imbalances:  # every run config must validate before hours of training start
            for spec in self.unlabeled_imbalances:
                for loss in self.losses:
                    self.run_config(rho, spec, loss, "none", self.seeds[0])
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

    def ce_base_dir(self, rho: float, spec: str, ssp: str, seed: int, init_from: Path | None, runs: Path) -> Path:
        """The CE run's base classifier folder of (rho, ssp, seed): the CE labeller of every loss's run
        (``pseudo_labels.labeller: ce``), trained once, by whichever run needs it first."""
        return runs / Path(self.run_config(rho, spec, "ce", ssp, seed, init_from).name).parent / "base"

    def self_training(self) -> SelfTrainingConfig:
        return validate_tree(SelfTrainingConfig, self.base, origin="semi-supervised preset base")

    def labeled_config(self, rho: float, seed: int) -> SelfTrainingConfig:
        return self.run_config(rho, self.unlabeled_imbalances[0], self.losses[0], "none", seed)


def run_grid(exp: SemiSupervisedExperimentConfig, out_dir: Path) -> list[dict]:
    """Every (rho, SSP, seed, loss, rho_U); finished runs are reused, interrupted ones resumed."""
    require_one_process("imbssl reproduce semi-supervised")
    runs, records = out_dir / "runs", []
    for rho in exp.imbalances:
        for ssp in exp.ssp:
            for seed in exp.seeds:
                init_from = exp.ssp_backbone(ssp, rho, seed, runs)
                for loss in exp.losses:
                    for spec in exp.unlabeled_imbalances:
                        cfg = exp.run_config(rho, spec, loss, ssp, seed, init_from)
                        run_dir = runs / cfg.name
                        if not (run_dir / REPORT_FILE).exists():
                            self_train(cfg, run_dir, resume=True, base_dir=run_dir.parent / "base",
                                       labeller_dir=exp.ce_base_dir(rho, spec, ssp, seed, init_from, runs))
                        records.append({"rho": rho, "rho_u": spec, "ssp": ssp, "loss": loss, "seed": seed,
                                        "run_dir": str(run_dir), **json.loads((run_dir / REPORT_FILE).read_text())})
    return records


# -- the report -------------------------------------------------------------------------------------
def runs_of(records: list[dict], loss: str, rho: float, spec: str, ssp: str) -> list[dict]:
    """The records of one cell of the grid, one per seed."""
    return [r for r in records if (r["loss"], r["rho"], r["rho_u"], r["ssp"]) == (loss, rho, spec, ssp)]


def tests_of(records: list[dict], loss: str, rho: float, spec: str, ssp: str, stage: str) -> dict[int, dict]:
    """seed -> the test report of the base ("base") or final ("final") classifier."""
    return {r["seed"]: r[stage] for r in runs_of(records, loss, rho, spec, ssp)}


def paired(records: list[dict], loss: str, rho: float, spec: str, ssp: str, value) -> dict[int, float]:
    """seed -> value(final) - value(base), for ``value`` of a test report (top-1, a group's accuracy)."""
    base, final = ({seed: value(test) for seed, test in tests_of(records, loss, rho, spec, ssp, stage).items()}
                   for stage in ("base", "final"))
    return paired_difference(final, base)


def error_table(exp: SemiSupervisedExperimentConfig, records: list[dict], paper: bool) -> str:
    columns = [(rho, spec) for rho in exp.imbalances for spec in exp.unlabeled_imbalances]
    header = ["Loss", "SSP", "D_U"] + [f"ρ={rho:g}, ρ_U={rho_u_value(spec, rho):g}" for rho, spec in columns]
    if paper:
        header += [f"{PAPER_SETTING}: ρ={rho:g}, ρ_U={spec}" for rho, spec in columns]
    rows, size_factor = [], exp.self_training().unlabeled.size_factor
    for loss in exp.losses:
        for ssp in exp.ssp:
            for with_u, stage in ((False, "base"), (True, "final")):
                cells = []
                for rho, spec in columns:
                    errors = [t["error"] for t in tests_of(records, loss, rho, spec, ssp, stage).values()]
                    cells.append(format_mean_std(errors) if errors else "n/a")
                if paper:
                    cells += [f"{PAPER_TABLE1[int(rho)][(loss, with_u)][spec]:.2f}"
                              if int(rho) in PAPER_TABLE1 and spec in PAPER_TABLE1[int(rho)][(loss, with_u)] else ""
                              for rho, spec in columns]
                rows.append([ROW_NAMES.get(loss, loss), SSP_NAMES.get(ssp, ssp),
                             f"+ D_U @{size_factor:g}x" if with_u else "none", *cells])
    return markdown_table(header, rows)


def group_table(exp: SemiSupervisedExperimentConfig, records: list[dict], rho: float) -> str:
    """Test accuracy by thirds of D_L (and pseudo-label accuracy), base vs final, at one rho."""
    header = ["Loss", "SSP", "ρ_U", "stage", "top-1", "major", "minor", "rare", "pseudo-labels right (%)"]
    rows = []
    for loss in exp.losses:
        for ssp in exp.ssp:
            for spec in exp.unlabeled_imbalances:
                for stage in ("base", "final"):
                    tests = list(tests_of(records, loss, rho, spec, ssp, stage).values())
                    if not tests:
                        continue
                    labels = [r["pseudo_labels"]["accuracy"] for r in runs_of(records, loss, rho, spec, ssp)]
                    rows.append([ROW_NAMES.get(loss, loss), SSP_NAMES.get(ssp, ssp), f"{rho_u_value(spec, rho):g}",
                                 stage, format_mean_std([t["top1"] for t in tests]),
                                 *[format_mean_std([t["thirds"][g] for t in tests])
                                   for g in ("major", "minor", "rare")],
                                 format_mean_std(labels) if stage == "final" else ""])
    return markdown_table(header, rows)


def verdict_lines(exp: SemiSupervisedExperimentConfig, records: list[dict]) -> list[str]:
    """The seed's claims, each as paired-by-seed differences (final - base, in top-1 points)."""
    lines = []
    for ssp in exp.ssp:
        init = SSP_NAMES.get(ssp, ssp)
        for rho in exp.imbalances:
            lines.append(f"- Unlabeled data helps at ρ={rho:g}, from {init} (top-1 of +D_U - top-1 without):")
            for loss in exp.losses:
                for spec in exp.unlabeled_imbalances:
                    gains = paired(records, loss, rho, spec, ssp, lambda t: t["top1"])
                    lines.append(f"  - {ROW_NAMES.get(loss, loss)}, ρ_U={rho_u_value(spec, rho):g}: {verdict(gains)}")
            if len(exp.unlabeled_imbalances) > 1:
                low, high = min(exp.unlabeled_imbalances, key=lambda s: rho_u_value(s, rho)), \
                    max(exp.unlabeled_imbalances, key=lambda s: rho_u_value(s, rho))
                lines.append(f"- The gain shrinks as ρ_U grows, ρ={rho:g}, from {init} (gain at ρ_U="
                             f"{rho_u_value(low, rho):g} - gain at ρ_U={rho_u_value(high, rho):g}):")
                for loss in exp.losses:
                    at_low, at_high = (paired(records, loss, rho, s, ssp, lambda t: t["top1"]) for s in (low, high))
                    lines.append(f"  - {ROW_NAMES.get(loss, loss)}: {verdict(paired_difference(at_low, at_high))}")
            lines.append(f"- What the rare third of classes gains, ρ={rho:g}, from {init} (its accuracy with D_U - "
                         f"without):")
            for loss in exp.losses:
                for spec in exp.unlabeled_imbalances:
                    gains = paired(records, loss, rho, spec, ssp, lambda t: t["thirds"]["rare"])
                    lines.append(f"  - {ROW_NAMES.get(loss, loss)}, ρ_U={rho_u_value(spec, rho):g}: {verdict(gains)}")
    return lines


def write_report(exp: SemiSupervisedExperimentConfig, records: list[dict], out_dir: Path, command: str) -> Path:
    """table.md: Table 1's layout (test error by loss x D_U x rho x rho_U), verdicts, groups; results.json."""
    cfg, source = exp.self_training(), describe_source(exp.base)
    paper = bool(records) and cfg.data.source != "digits" and len(records[0]["base"]["per_class"]) == 10
    balanced = ", class-balanced" if cfg.pseudo_labels.class_balanced else ""
    lines = [f"# Self-training with imbalanced unlabeled data on {source}: top-1 test error (%), mean ± std over "
             f"{len(exp.seeds)} seed(s)", "", f"Command: `{command}`", "",
             f"D_L: exponential profile, head {cfg.data.subset.head_count or 'the full class'}; D_U: "
             f"{cfg.unlabeled.size_factor:g} x |D_L| images of the same training pool, disjoint from D_L; "
             f"pseudo-labels kept above confidence {cfg.pseudo_labels.threshold:g}{balanced}, weight "
             f"ω={cfg.pseudo_labels.weight:g}. Classifiers: {cfg.model.backbone} (width {cfg.model.width:g}), "
             f"{cfg.optim.epochs} epochs (seed: 200), the epoch selected on a held-out balanced validation set.", ""]
    if not paper:
        lines += [f"The seed's figures (CIFAR-10-LT, D_U from 80M Tiny Images) are left out: {source} is not "
                  f"comparable.", ""]
    lines += [error_table(exp, records, paper), "", "## Verdicts (paired by seed)", "",
              *verdict_lines(exp, records), ""]
    top = max(exp.imbalances)
    lines += [f"## Test accuracy by thirds of D_L at ρ={top:g}", "", group_table(exp, records, top), ""]
    train_s = sum(r["wall_s_this_call"] for r in records)
    lines += [f"{len(records)} self-training runs: {train_s / 60:.1f} min (sum of their last calls, SSP not included) "
              f"on {'; '.join(sorted({r['hardware'] for r in records}))}."]
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table
