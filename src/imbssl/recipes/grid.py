"""The one mechanism of every recipe: a recipe is its preset's schema, the cells it asks for and its report.

    Cell          one run of the grid: its axes (subset and method; rho, SSP and loss; ...), seed, kind and config
    run_cells     runs the cells in order: a finished run is reused only after its folder is checked to hold a run
                  trained with the cell's settings (one trained with others is set aside and trained again), an
                  unfinished one resumes, and every pre-trained backbone is evaluated
    Results       results.json: the cells' typed records (records.py), selected by their axes and paired by seed
    reproduce     cells -> runs -> results.json and table.md (the recipe's tables and figures, the compute line)

A cell's kind names the pipeline that makes it: ``pretrain`` (pipelines/pretrain.py, then evaluate), ``train``
(pipelines/train.py), ``self-train`` (pipelines/self_training.py) or ``pipeline`` (the offline-clustering pipeline,
then evaluate). Cells run in the order the recipe lists them, so a cell may start from what an earlier one made
(an SSP backbone, a shared base classifier).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imbssl.config import (DataConfig, EvalConfig, OfflineClusteringConfig, RunConfig, SelfTrainingConfig,
                           SupervisedConfig, TrainConfig, deep_merge, shared_method_keys)
from imbssl.engine.distributed import barrier, is_main, main_only, process_group, require_one_process
from imbssl.methods import METHODS
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.offline_clustering import run_pipeline
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.pipelines.runfolder import PIPELINE_CONFIG, RUN_CONFIG, read_saved_config, run_changes
from imbssl.pipelines.self_training import self_train
from imbssl.pipelines.train import train
from imbssl.records import (BudgetRecord, DivideRecord, EvalRecord, PretrainRecord, Record, SelfTrainingRecord,
                            TrainRecord)
from imbssl.report import Paired, format_mean_std, paired_difference

log = logging.getLogger(__name__)

Kind = Literal["pretrain", "train", "self-train", "pipeline"]
AxisValue = str | int | float
#: a figure of one cell's record, or None where the record has none (a group without a class, a method without it)
Metric = Callable[["CellRecord"], float | None]

#: settings that name a file: the same file spelled another way (relative, absolute) is the same run
PATH_KEYS = ("data.path", "data.train_order", "init_from")
#: the file whose presence marks a finished run, and the config the folder saves, by kind
DONE_FILE: dict[Kind, str] = {"pretrain": BACKBONE_FILE, "train": TrainRecord.FILE,
                              "self-train": SelfTrainingRecord.FILE, "pipeline": BudgetRecord.FILE}
CONFIG_FILE: dict[Kind, str] = {"pretrain": RUN_CONFIG, "train": RUN_CONFIG, "self-train": PIPELINE_CONFIG,
                                "pipeline": PIPELINE_CONFIG}
#: what the compute line calls each kind's training
TRAINING: dict[Kind, str] = {"pretrain": "pre-training", "pipeline": "pre-training", "train": "classifier training",
                             "self-train": "self-training"}


@dataclass(frozen=True)
class Cell:
    """One run of a grid. ``base_dir``: self-training's base classifier, shared by the runs that differ only in
    rho_U; a pipeline's finished base stage to start from (SimSiam+D shares SimSiam+C+D's). ``labeller_dir``:
    self-training's CE labeller, the CE run's base classifier."""

    axes: dict[str, AxisValue]
    seed: int
    kind: Kind
    config: RunConfig | SupervisedConfig | SelfTrainingConfig | OfflineClusteringConfig
    run_dir: Path
    base_dir: Path | None = None
    labeller_dir: Path | None = None


# -- running the cells ------------------------------------------------------------------------------------
def run_cells(cells: Sequence[Cell], recipe: str) -> list[CellRecord]:
    """Run (or reuse, or resume) every cell in order and read back its records."""
    if single := sorted({cell.kind for cell in cells} & {"self-train", "pipeline"}):
        require_one_process(f"imbssl reproduce {recipe} (its {' and '.join(single)} runs)")
    return [run_cell(cell) for cell in cells]


def run_cell(cell: Cell) -> CellRecord:
    """Set aside what the cell's folders hold of other settings, train what is not finished, evaluate what is not
    evaluated with the cell's settings, and read the records."""
    for folder, changed in stale_folders(cell):
        if folder.exists():  # not moved with a stale folder around it
            set_aside(folder, changed)
    if not (cell.run_dir / DONE_FILE[cell.kind]).exists():
        train_cell(cell)
    if cell.kind in ("pretrain", "pipeline") and needs_evaluation(cell):
        main_only(evaluate_run)(cell.run_dir, evaluation(cell))
    return CellRecord.of(cell)


def train_cell(cell: Cell) -> None:
    """Train the cell's run, resuming it where a checkpoint is."""
    if cell.kind == "pretrain":
        pretrain(cell.config, cell.run_dir, resume=True)
    elif cell.kind == "train":
        train(cell.config, cell.run_dir, resume=True)
    elif cell.kind == "self-train":
        self_train(cell.config, cell.run_dir, resume=True, base_dir=cell.base_dir, labeller_dir=cell.labeller_dir)
    else:
        if cell.base_dir is not None:
            copy_finished(cell.base_dir, cell.run_dir / "base")
        run_pipeline(cell.config, cell.run_dir, resume=True)


def copy_finished(source: Path, target: Path) -> None:
    """A finished stage copied rather than trained twice (its pretrain.json still counts its cost); renamed when
    complete, so that a killed copy never looks like a finished stage."""
    if (source / DONE_FILE["pretrain"]).exists() and not target.exists():
        partial = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        os.replace(partial, target)


def evaluation(cell: Cell) -> EvalConfig:
    """The evaluation a pre-training cell asks for."""
    return cell.config.base.eval if isinstance(cell.config, OfflineClusteringConfig) else cell.config.eval


def needs_evaluation(cell: Cell) -> bool:
    """Whether the run has no eval.json, or one measured with other eval settings than the cell's (a format-0 file
    was measured with its run's config.yaml's)."""
    if not (cell.run_dir / EvalRecord.FILE).exists():
        return True
    settings = EvalRecord.read(cell.run_dir).settings
    if settings is None:
        return read_saved_config(cell.run_dir / RUN_CONFIG, RunConfig).eval != evaluation(cell)
    try:
        return EvalConfig.model_validate(settings) != evaluation(cell)
    except ValueError:  # settings of an older EvalConfig: measure again
        return True


def stale_folders(cell: Cell) -> list[tuple[Path, dict[str, tuple[Any, Any]]]]:
    """The cell's folders that hold a run trained with other settings than the cell's, and those settings (the
    evaluation's are not among them: another evaluation re-evaluates, it does not retrain)."""
    folders = [(cell.run_dir, cell.kind, cell.config)]
    if cell.kind == "self-train":
        folders += [(cell.base_dir or cell.run_dir / "base", "train", cell.config.stage("base"))]
        if not cell.config.labels_with_base() and cell.labeller_dir is not None:
            folders += [(cell.labeller_dir, "train", cell.config.stage("labeller"))]
    stale = []
    for folder, kind, config in folders:
        if (folder / CONFIG_FILE[kind]).exists():
            saved = read_saved_config(folder / CONFIG_FILE[kind], type(config))
            changed = what_changed(saved, config, evaluated=kind in ("pretrain", "pipeline"))
            if changed := changed or started_from_an_older_backbone(folder / DONE_FILE[kind], config):
                stale.append((folder, changed))
    return stale


def started_from_an_older_backbone(done: Path, config: BaseModel) -> dict[str, tuple[Any, Any]]:
    """``init_from`` as changed where its backbone was written after the run finished: the path is the same, but the
    SSP run behind it was trained again (with other settings) since, so the finished run started from another one."""
    start = getattr(config.stage("base") if isinstance(config, SelfTrainingConfig) else config, "init_from", None)
    if start is None or not done.exists() or not Path(start).exists():
        return {}
    if Path(start).stat().st_mtime_ns <= done.stat().st_mtime_ns:
        return {}
    return {"init_from": (f"{start} as it was", f"{start} trained again since")}


def what_changed(saved: BaseModel, wanted: BaseModel, evaluated: bool) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved, wanted) of the settings that make ``saved`` another run than ``wanted``."""
    def same_path(old: Any, new: Any) -> bool:
        return old is not None and new is not None and Path(old).resolve() == Path(new).resolve()

    changed = {}
    for key, (old, new) in run_changes(saved, wanted).items():
        bare = key.removeprefix("base.")  # a pipeline's keys sit under base
        if evaluated and bare.startswith("eval."):
            continue
        if bare in PATH_KEYS and same_path(old, new):
            continue
        changed[key] = (old, new)
    return changed


def set_aside(folder: Path, changed: dict[str, tuple[Any, Any]]) -> Path:
    """Move a run trained with other settings out of the cell's way, to FOLDER.stale-N: the cell trains its own
    run, and the other one is kept, not overwritten."""
    aside = next(folder.with_name(f"{folder.name}.stale-{n}") for n in range(1, 10_000)
                 if not folder.with_name(f"{folder.name}.stale-{n}").exists())
    if is_main():
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changed.items())
        log.warning("%s holds a run trained with other settings: %s; it is moved to %s and trained again", folder,
                    listed, aside.name)
        os.replace(folder, aside)
    barrier()
    return aside


# -- the records -----------------------------------------------------------------------------------------
class CellRecord(BaseModel):
    """A cell's axes and seed with the records of its run folder: ``pretrain`` and ``eval`` of a pre-training run,
    ``train`` of a classifier, ``self_training`` of a self-training run, ``budget``, ``divide``, ``eval`` and (the
    student's) ``pretrain`` of an offline-clustering pipeline."""

    model_config = ConfigDict(extra="forbid")
    axes: dict[str, AxisValue]
    seed: int
    kind: Kind
    run_dir: str
    pretrain: PretrainRecord | None = None
    eval: EvalRecord | None = None
    train: TrainRecord | None = None
    self_training: SelfTrainingRecord | None = None
    budget: BudgetRecord | None = None
    divide: DivideRecord | None = None

    @classmethod
    def of(cls, cell: Cell) -> "CellRecord":
        run, records = cell.run_dir, {}
        if cell.kind in ("pretrain", "pipeline"):
            records.update(eval=EvalRecord.read(run),
                           pretrain=PretrainRecord.read(run if cell.kind == "pretrain" else run / "distill"))
        if cell.kind == "pipeline":
            records.update(budget=BudgetRecord.read(run), divide=DivideRecord.read(run / "divide"))
        if cell.kind == "train":
            records.update(train=TrainRecord.read(run))
        if cell.kind == "self-train":
            records.update(self_training=SelfTrainingRecord.read(run))
        return cls(axes=cell.axes, seed=cell.seed, kind=cell.kind, run_dir=str(run), **records)

    def matches(self, kind: Kind | None, axes: dict[str, AxisValue]) -> bool:
        return (kind is None or self.kind == kind) and all(self.axes.get(k) == v for k, v in axes.items())

    @property
    def hardware(self) -> str:
        ran = self.pretrain or self.train or self.self_training
        return ran.hardware if ran else "not recorded"

    @property
    def training_s(self) -> float:
        """Seconds the run's last call trained (the pipeline's stages added up)."""
        if self.budget:
            return self.budget.wall_s
        ran = self.pretrain or self.train or self.self_training
        return ran.wall_s_this_call if ran else 0.0


class Results(Record):
    """results.json of a report folder: the recipe, the command and every cell's records."""

    FILE: ClassVar[str] = "results.json"
    recipe: str
    command: str
    cells: list[CellRecord]

    def select(self, kind: Kind | None = None, **axes: AxisValue) -> list[CellRecord]:
        """The cells with these axis values (and of this kind), in grid order."""
        return [cell for cell in self.cells if cell.matches(kind, axes)]

    def by_seed(self, metric: Metric, kind: Kind | None = None, **axes: AxisValue) -> dict[int, float]:
        """seed -> ``metric`` of the selected cells, leaving out the cells where it is None."""
        return {cell.seed: value for cell in self.select(kind, **axes) if (value := metric(cell)) is not None}

    def values(self, metric: Metric, kind: Kind | None = None, **axes: AxisValue) -> list[float]:
        return list(self.by_seed(metric, kind, **axes).values())

    def cell(self, metric: Metric, kind: Kind | None = None, **axes: AxisValue) -> str:
        """Mean ± std over the seeds of the selected cells, or "n/a"."""
        values = self.values(metric, kind, **axes)
        return format_mean_std(values) if values else "n/a"

    def paired(self, metric: Metric, a: dict[str, AxisValue], b: dict[str, AxisValue]) -> Paired:
        """``metric`` of the cells ``a`` less that of the cells ``b`` at the same seed: the mean difference, its 95%
        t interval and the number of seeds (seeds without both are left out)."""
        return Paired(paired_difference(self.by_seed(metric, **a), self.by_seed(metric, **b)))

    @classmethod
    def from_format_0(cls, tree: Any) -> dict[str, Any]:
        """A results.json of before format 1: a list of flat records, each its axes, seed and run_dir beside the
        contents of its run's record file(s); ExCB's was {"grid": [...], "k_ablation": [...]}, where the ablation
        repeated the grid's own run at its K (kept once here, as today's grid runs it). Neither the recipe nor the
        command was recorded."""
        flat = [*tree["grid"], *tree["k_ablation"]] if isinstance(tree, dict) else tree
        once = {record["run_dir"]: record for record in reversed(flat)}  # the first record of each run
        return {"recipe": "not recorded (format 0)", "command": "not recorded (format 0)",
                "cells": [format_0_cell(record) for record in flat if once[record["run_dir"]] is record]}


#: the axes of the format-0 results.json records, by the recipes that wrote them
FORMAT_0_AXES = ("subset", "method", "rho", "rho_u", "ssp", "loss")


def format_0_cell(record: dict[str, Any]) -> CellRecord:
    """One record of a format-0 results.json as a CellRecord: a self-training run has rho_U, a classifier a loss,
    an offline-clustering pipeline its budget (and its divide stage's report as 'clusters'), and a pre-training run
    its pretrain.json under 'pretrain' (ExCB's also under 'training')."""
    axes = {key: record[key] for key in FORMAT_0_AXES if key in record}
    rest = {key: value for key, value in record.items() if key not in (*FORMAT_0_AXES, "seed", "run_dir")}
    origin = f"results.json record {axes} seed {record['seed']}"
    if "rho_u" in record:
        kind, records = "self-train", {"self_training": SelfTrainingRecord.from_tree(rest, origin)}
    elif "loss" in record:
        kind, records = "train", {"train": TrainRecord.from_tree(rest, origin)}
    else:  # beside eval.json's keys, the recipe's own: title, pretrain_wall_s, hardware (ExCB's training)
        evaluated = {k: v for k, v in rest.items() if k not in ("title", "pretrain_wall_s", "hardware", "training",
                                                                "pretrain", "budget", "clusters")}
        if "budget" in record:  # its "clusters" are the divide stage's (the student learns none of its own)
            kind, records = "pipeline", {"budget": BudgetRecord.from_tree(rest["budget"], origin),
                                         "divide": DivideRecord.from_tree(rest["clusters"], origin)}
        else:
            kind, records = "pretrain", {"pretrain": PretrainRecord.from_tree(rest["pretrain"], origin)}
            evaluated["clusters"] = rest.get("clusters")
        records["eval"] = EvalRecord.from_tree(evaluated, origin)
    return CellRecord(axes=axes, seed=record["seed"], kind=kind, run_dir=record["run_dir"], **records)


def describe_compute(cells: Iterable[CellRecord]) -> str:
    """One line: the runs, their training time by kind and their evaluation time, summed over the runs' last calls,
    and the hardware they ran on."""
    cells = list(cells)
    spent: dict[str, float] = {}
    for cell in cells:
        spent[TRAINING[cell.kind]] = spent.get(TRAINING[cell.kind], 0.0) + cell.training_s
    spent["evaluation"] = sum(cell.eval.wall_s for cell in cells if cell.eval)
    hardware = "; ".join(sorted({cell.hardware for cell in cells}))
    parts = ", ".join(f"{what} {seconds / 60:.1f} min" for what, seconds in spent.items())
    return f"{len(cells)} runs: {parts} (sum over the runs' last calls) on {hardware}."


# -- the recipes' common schema ---------------------------------------------------------------------------
class GridConfig(BaseModel):
    """A recipe's preset: the config every run shares, the seeds and each method's own settings. A recipe adds its
    axes, the cells they make (``cells``) and its tables (``TITLE``, ``report``)."""

    model_config = ConfigDict(extra="forbid")
    #: ``imbssl reproduce NAME`` (recipes/__init__.py's RECIPES); its presets are configs/PRESETS/*.yaml
    NAME: ClassVar[str]
    PRESETS: ClassVar[str]
    #: what the tables call the grid's methods where the method's own display_name does not say it ("SimCLR+TS")
    LABELS: ClassVar[dict[str, str]] = {}
    #: the recipe's own method settings (variants of one method), under the preset's ``method_settings``
    BUILT_IN: ClassVar[dict[str, dict]] = {}
    #: table.md's title: "TITLE on SOURCE: MEASURE, mean ± std over N seed(s)"
    TITLE: ClassVar[str]
    MEASURE: ClassVar[str] = ""

    base: dict = Field(default_factory=dict, description="the config tree every run of the grid shares")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    method_settings: dict[str, dict] = Field(default_factory=dict, description=(
        "run config keys of one method (or variant) of the grid, over the shared ones, e.g. SimSiam's optim.base_lr; "
        "a variant of a method names it as method.name. Merged key by key over the recipe's built-in ones"))

    @model_validator(mode="after")
    def _labelled(self) -> "GridConfig":
        # every recipe's tables are per-class probe accuracies: refused before any run, in one line
        DataConfig.model_construct(**self.base.get("data", {})).require_labels("the recipes (per-class probes)")
        return self

    def cells(self, out_dir: Path) -> list[Cell]:
        raise NotImplementedError

    def title(self, results: Results) -> str:
        measure = f"{self.MEASURE}, " if self.MEASURE else ""
        return f"{self.TITLE} on {self.source()}: {measure}mean ± std over {len(self.seeds)} seed(s)"

    def report(self, results: Results, out_dir: Path) -> list[str]:
        """The tables (Markdown lines) after the title and the command, and the figures drawn into ``out_dir``."""
        raise NotImplementedError

    def settings(self, method: str) -> dict:
        """The run keys of ``method`` (a method or a variant of the grid): its built-in ones, then the preset's."""
        return deep_merge(self.BUILT_IN.get(method, {}), self.method_settings.get(method, {}))

    def method_name(self, method: str) -> str:
        """The imbssl method a method (or variant) of the grid trains."""
        return self.settings(method).get("method", {}).get("name", method)

    def run_tree(self, shared: dict, method: str, where: str = "base") -> dict:
        """``shared`` (a run config tree) for ``method``: its ``method`` section is the method's name, the keys of
        ``shared``'s method section that the method has, then its own settings, so that no run carries another
        method's keys; its other settings are ``shared``'s under the method's."""
        name = self.method_name(method)
        section = shared_method_keys(shared.get("method", {}), name, where=f"{where}.method")
        return deep_merge({**shared, "method": {**section, "name": name}}, self.settings(method))

    def label(self, method: str) -> str:
        """What the tables call ``method``: the recipe's label, else the method's display name, else the key."""
        if method in self.LABELS:
            return self.LABELS[method]
        return METHODS[method].display_name if method in METHODS else method

    def source(self) -> str:
        """'imagefolder (cifar10-jpg.tar.gz)': the data the grid trains on, for its titles."""
        data = self.base.get("data", {})
        return data.get("source", "digits") + (f" ({Path(data['path']).name})" if data.get("path") else "")

    def train_settings(self) -> TrainConfig:
        """``base.train``, whose device and timeout the process group takes."""
        return TrainConfig.model_validate(self.base.get("train", {}))


def reproduce(grid: GridConfig, out_dir: Path, command: str) -> Path | None:
    """Run the grid's cells into ``out_dir``/runs and write the report; table.md's path (None on the processes
    other than rank 0). Under torchrun every process trains the runs data-parallel and rank 0 alone evaluates
    and reports (docs/scale-out.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = grid.cells(out_dir)
    train = grid.train_settings()
    with process_group(train.device, train.dist_timeout_s):
        results = Results(recipe=grid.NAME, command=command, cells=run_cells(cells, grid.NAME))
        return write_report(grid, results, out_dir)


@main_only
def write_report(grid: GridConfig, results: Results, out_dir: Path) -> Path:
    """results.json, the figures and table.md: the recipe's title and tables, the command and the compute line."""
    results.write(out_dir)
    lines = [f"# {grid.title(results)}", "", f"Command: `{results.command}`", "", *grid.report(results, out_dir),
             describe_compute(results.cells)]
    table = out_dir / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


# -- the papers' datasets ---------------------------------------------------------------------------------
CIFAR10_CLASSES = frozenset("airplane automobile bird cat deer dog frog horse ship truck".split())
CIFAR100_CLASSES = frozenset(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor "
    "train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split())


def paper_dataset(classes: Iterable[str]) -> Literal["cifar10", "cifar100"] | None:
    """'cifar10' or 'cifar100' when the runs' classes are that CIFAR's (its source, or an ImageFolder archive of
    it), else None. The one rule of every recipe: a paper's figures sit beside runs on the paper's dataset (and,
    each table checks, at the paper's imbalance), never beside other images."""
    names = frozenset(classes)
    return "cifar10" if names == CIFAR10_CLASSES else "cifar100" if names == CIFAR100_CLASSES else None
