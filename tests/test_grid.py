"""The grid layer (recipes/grid.py) and the typed records (records.py): pairing by seed with t intervals, honest
verdicts, records and results.json of before format 1, stale runs, the papers' columns."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import scipy.stats
import yaml

from conftest import imbssl
from imbssl.config import deep_merge, parse_overrides, save_config
from imbssl.recipes import RECIPES, load_preset, recipe
from imbssl.recipes.grid import CONFIG_FILE, DONE_FILE, Cell, CellRecord, Results, paper_dataset, stale_folders
from imbssl.recipes.longtail_ssl import LongtailSSLConfig
from imbssl.recipes.ssp import SSPExperimentConfig
from imbssl.records import (BudgetRecord, DivideRecord, EvalRecord, PretrainRecord, RecordError, SelfTrainingRecord,
                            TrainRecord)
from imbssl.report import Paired, verdict
from imbssl.report.tables import t_975

FORMAT_0 = Path(__file__).parent / "data" / "format-0"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- pairing and verdicts ------------------------------------------------------------------------------
@pytest.mark.parametrize("df", [*range(1, 41), 60, 120, 1000])
def test_t_975_is_the_t_distributions_quantile(df):
    assert t_975(df) == pytest.approx(scipy.stats.t.ppf(0.975, df), abs=1e-5)


def test_paired_is_the_mean_difference_with_its_t_interval_by_hand():
    """Differences 1, 2, 3: mean 2, sample std 1, half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051."""
    paired = Paired({0: 1.0, 1: 2.0, 2: 3.0})
    assert paired.seeds == 3 and paired.mean == pytest.approx(2.0)
    assert paired.interval == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    assert verdict(paired) == "+2.00 points (95% CI -0.48 to +4.48, 3 seeds): not shown"


def test_results_pair_a_metric_by_seed_and_leave_out_seeds_without_both_sides():
    values = {("a", 0): 52.0, ("a", 1): 50.5, ("a", 2): None, ("a", 3): 49.0, ("b", 0): 51.0, ("b", 1): 51.0,
              ("b", 2): 50.0, ("b", 4): 48.0}
    results = Results(recipe="test", command="test", cells=[
        CellRecord(axes={"method": method}, seed=seed, kind="pretrain", run_dir="r") for method, seed in values])
    paired = results.paired(lambda cell: values[cell.axes["method"], cell.seed], {"method": "a"}, {"method": "b"})
    assert paired.differences == {0: 1.0, 1: -0.5}  # seed 2 has no value of a, 3 and 4 no pair


def shifted(paired: Paired, by: float) -> Paired:
    return Paired({seed: value + by for seed, value in paired.differences.items()})


def test_a_verdict_holds_only_when_the_interval_excludes_zero():
    spread = Paired({0: 1.0, 1: 3.0, 2: 2.5})
    low, high = spread.interval
    at_zero = shifted(spread, -low)  # the interval's lower end on zero
    assert at_zero.interval[0] == pytest.approx(0.0, abs=1e-12)
    assert verdict(shifted(spread, -low + 1e-9)).endswith(": holds")
    assert verdict(shifted(spread, -low - 1e-9)).endswith(": not shown")
    assert verdict(shifted(spread, -high - 1e-9)).endswith(": the opposite holds")
    assert verdict(shifted(spread, -high + 1e-9)).endswith(": not shown")
    assert verdict(Paired({0: 2.0, 1: 2.2, 2: 2.1})) == "+2.10 points (95% CI +1.85 to +2.35, 3 seeds): holds"


def test_two_seeds_one_std_apart_show_nothing():
    """The issue's case: Rotation-SSP's CE gain of -4.52 ± 3.87 over 2 seeds, which the old rule (one std) called
    'the opposite holds'; its t interval on 1 degree of freedom is -4.52 ± 34.8."""
    half = 3.87 / 2 ** 0.5  # two values mean ± half have sample std 3.87
    ce = Paired({0: -4.52 - half, 1: -4.52 + half})
    assert verdict(ce) == "-4.52 points (95% CI -39.29 to +30.25, 2 seeds): not shown"


def test_one_seed_shows_nothing_and_no_seed_is_not_measured():
    assert verdict(Paired({0: 1.0})) == "+1.00 points: not shown (one seed)"
    assert verdict(Paired({})) == "not measured"


def test_a_difference_of_paired_differences_pairs_by_seed():
    high, low = Paired({0: 3.0, 1: 4.0, 2: 5.0}), Paired({0: 1.0, 1: 1.5, 3: 9.0})
    assert (high - low).differences == {0: 2.0, 1: 2.5}


# -- records ---------------------------------------------------------------------------------------------
RECORDS = [(EvalRecord, "eval.json"), (PretrainRecord, "pretrain.json"), (TrainRecord, "train.json"),
           (SelfTrainingRecord, "self_training.json"), (BudgetRecord, "pipeline.json"),
           (DivideRecord, "divide-report.json")]


@pytest.mark.parametrize("record,name", RECORDS)
def test_records_of_format_0_load_and_round_trip(record, name, tmp_path):
    """Files written before format_version existed (HEAD of issue 29, tiny digits runs) load, and a record written
    back reads the same."""
    old = record.read(FORMAT_0 / name)
    assert old.format_version == 1
    path = old.write(tmp_path)
    assert path.name == record.FILE and json.loads(path.read_text())["format_version"] == 1
    assert record.read(tmp_path) == old


def test_format_0_records_keep_their_figures():
    raw = json.loads((FORMAT_0 / "eval.json").read_text())
    evaluated = EvalRecord.read(FORMAT_0 / "eval.json")
    assert {k: report.top1 for k, report in evaluated.knn.items()} == {20: raw["knn20"]["top1"],
                                                                        200: raw["knn200"]["top1"]}
    assert evaluated.linear.thirds.rare == raw["linear"]["thirds"]["rare"] and evaluated.settings is None
    assert evaluated.clusters.empty_clusters == raw["clusters"]["empty_clusters"]
    trained = PretrainRecord.read(FORMAT_0 / "pretrain.json")
    raw = json.loads((FORMAT_0 / "pretrain.json").read_text())
    assert trained.figure("teacher_confidence") == raw["teacher_confidence"] and trained.figure("prior_kl") is None
    assert isinstance(trained.figure("empty_clusters"), int)  # counts stay counts
    classifier = TrainRecord.read(FORMAT_0 / "train.json")
    assert classifier.reported == "crt" and classifier.test == classifier.stage("crt").test


def test_a_newer_format_or_another_record_is_refused_in_one_line(tmp_path):
    tree = json.loads(EvalRecord.read(FORMAT_0 / "eval.json").model_dump_json())
    (tmp_path / "eval.json").write_text(json.dumps({**tree, "format_version": 2}))
    with pytest.raises(RecordError, match=r"eval.json has format 2; this imbssl reads formats 0 to 1") as newer:
        EvalRecord.read(tmp_path)
    with pytest.raises(RecordError, match=r"train.json: not eval.json as imbssl writes it \(labelled_train: "
                                          r"Field required\)") as other:
        EvalRecord.read(FORMAT_0 / "train.json")
    (tmp_path / "eval.json").write_text('{"linear": ')
    with pytest.raises(RecordError, match="not JSON") as truncated:
        EvalRecord.read(tmp_path)
    assert all("\n" not in str(err.value) for err in (newer, other, truncated))


@pytest.mark.parametrize("name,kinds", [
    ("results-longtail-ssl.json", {"pretrain"}), ("results-experiment-2.json", {"pretrain", "pipeline"}),
    ("results-excb.json", {"pretrain"}), ("results-ssp.json", {"train"}),
    ("results-semi-supervised.json", {"self-train"})])
def test_results_of_format_0_read_with_their_numbers(name, kinds):
    """The results.json of every recipe before format 1 (longtail-ssl's: the CIFAR-10 report of docs/results.md)."""
    raw = json.loads((FORMAT_0 / name).read_text())
    flat = raw if isinstance(raw, list) else [*raw["grid"], *raw["k_ablation"][:-1]]  # the last is the grid's run
    results = Results.read(FORMAT_0 / name)
    assert {cell.kind for cell in results.cells} == kinds and len(results.cells) == len(flat)
    for cell, old in zip(results.cells, flat):
        assert cell.seed == old["seed"] and cell.run_dir == old["run_dir"]
        assert all(cell.axes[key] == old[key] for key in cell.axes)
        if cell.eval:
            assert cell.eval.linear.top1 == old["linear"]["top1"] and cell.eval.knn[20].top1 == old["knn20"]["top1"]
        if cell.train:
            assert cell.train.stage("main").test.error == old["main"]["test"]["error"]
        if cell.self_training:
            assert cell.self_training.final.error == old["final"]["error"]
        if cell.budget:
            assert cell.budget.wall_s == old["budget"]["wall_s"] and cell.divide.nmi == old["clusters"]["nmi"]


def test_a_report_of_before_format_1_still_makes_its_tables(tmp_path):
    """docs/results.md's CIFAR-10 longtail-ssl figures (SimCLR 53.09 ± 1.56 over seeds 0 and 1) come back from the
    old results.json through today's report."""
    results = Results.read(FORMAT_0 / "results-longtail-ssl.json")
    grid = LongtailSSLConfig(methods=["simclr"], seeds=[0, 1],
                             base={"data": {"source": "imagefolder", "path": "cifar10-jpg.tar.gz"},
                                   "eval": {"few_shot": ["1%", "100-shot", "50-shot"]}})
    table = "\n".join(grid.report(results, tmp_path))
    assert "| SimCLR | 53.09 ± 1.56 | 40.90 ± 1.70 | 44.18 ± 0.16 | 40.90 ± 1.70 |" in table


# -- stale runs -------------------------------------------------------------------------------------------
#: the ssp and semi-supervised demos cut to one classifier (and its cRT stage) from scratch, in seconds
ONE_CLASSIFIER = {"ssp": {"ssp": "[none]", "rows": "[ce, crt]", "base.crt.epochs": "1"},
                  "semi-supervised": {"ssp": "[none]", "losses": "[ce]", "unlabeled_imbalances": "[rho]"}}
SHORT = {"base.optim.epochs": "3", "base.optim.milestones": "[2]", "base.optim.lr_factors": "[0.01]",
         "base.loss.defer_epoch": "2"}
#: a classifier setting, its first and its second value, and the run folder (and its config file) it changes
CHANGES = {"ssp": ("base.crt.epochs", 1, 2, "rho10/ce/scratch/seed0", "config.yaml"),
           "semi-supervised": ("base.optim.epochs", 3, 4, "rho10/ce/scratch/seed0/rhoU10", "pipeline.yaml")}


def reproduce_demo(name: str, out: Path, settings: dict[str, str]):
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    res = imbssl("reproduce", name, "--preset", "demo", "--out", out, *overrides, cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return res


def saved(path: Path, dotted: str):
    value = yaml.safe_load(path.read_text())
    for key in dotted.removeprefix("base.").split("."):
        value = value[key]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ssp", "semi-supervised"])
def test_a_changed_classifier_setting_retrains_the_run_it_changes(tmp_path, name):
    """A finished run is reused only when it was trained with the cell's settings: another classifier setting under
    the same --out trains the run again (and keeps the old one aside) instead of reporting its numbers as the new
    ones. Before the grid layer, ssp and semi-supervised reused the run whatever its settings."""
    key, first, second, run, config_file = CHANGES[name]
    out = tmp_path / name
    reproduce_demo(name, out, {**ONE_CLASSIFIER[name], **SHORT, key: str(first)})
    run_dir = out / "runs" / run
    assert saved(run_dir / config_file, key) == first
    results_then = json.loads((out / "results.json").read_text())
    again = reproduce_demo(name, out, {**ONE_CLASSIFIER[name], **SHORT, key: str(second)})
    assert saved(run_dir / config_file, key) == second, "the run trained with the old setting was reused"
    assert saved(run_dir.with_name(f"{run_dir.name}.stale-1") / config_file, key) == first
    assert f"({first} -> {second})" in again.stderr
    assert json.loads((out / "results.json").read_text()) != results_then


#: per recipe, a setting that changes some of its demo's runs and the key it changes in their saved configs, and a
#: setting of the evaluation alone
CHANGED = {"experiment-1": ("base.optim.epochs=31", "optim.epochs"),
           "experiment-2": ("pipeline.head_hidden=64", "head_hidden"),
           "excb": ("base.method.size_momentum=0.7", "method.size_momentum"),
           "priors": ("base.method.num_clusters=16", "method.num_clusters"),
           "longtail-ssl": ("base.method.temperature=0.3", "method.temperature"),
           "ssp": ("base.crt.epochs=4", "crt.epochs"),
           "semi-supervised": ("base.pseudo_labels.threshold=0.5", "pseudo_labels.threshold")}
EVALUATION = {"ssp": "ssp_base.eval.linear.epochs=11", "semi-supervised": "ssp_base.eval.knn_k=[10]"}


def demo_grid(name: str, *overrides: str):
    schema = recipe(name)
    return schema.model_validate(deep_merge(load_preset(schema.PRESETS, "demo"), parse_overrides(overrides)))


def save_runs(cells: list[Cell]) -> None:
    """Each cell's folders as a finished grid leaves them, as far as the stale check reads them: the configs."""
    for cell in cells:
        saved = [(cell.config, cell.run_dir / CONFIG_FILE[cell.kind])]
        if cell.kind == "self-train":
            saved.append((cell.config.stage("base"), cell.base_dir / "config.yaml"))
        for config, path in saved:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_config(config, path)


def test_an_order_file_spelled_another_way_is_the_same_run(tmp_path, monkeypatch):
    """data.train_order names a file, as data.path does: relative or absolute, the same file is the same run; another
    file (another order, other images behind each index) is another run."""
    from imbssl.config import RunConfig
    from imbssl.recipes.grid import what_changed

    monkeypatch.chdir(tmp_path)
    order = lambda path: RunConfig.model_validate(  # noqa: E731
        {"data": {"source": "imagefolder", "path": "c.tar.gz", "train_order": path}})
    assert what_changed(order("order.txt"), order(str(tmp_path / "order.txt")), evaluated=True) == {}
    assert what_changed(order("order.txt"), order("other.txt"), evaluated=True) == {
        "data.train_order": ("order.txt", "other.txt")}


@pytest.mark.parametrize("name", RECIPES)
def test_every_grid_tells_the_runs_a_changed_setting_makes_other_runs(tmp_path, name):
    """A changed setting makes exactly the cells whose config it changes stale, in every recipe (the loop sets
    them aside and trains them again); a changed evaluation makes none stale (the loop evaluates again)."""
    cells = demo_grid(name).cells(tmp_path)
    save_runs(cells)
    assert not any(stale_folders(cell) for cell in cells)
    setting, key = CHANGED[name]
    changed = demo_grid(name, setting).cells(tmp_path)
    flagged = {cell.run_dir for cell in changed if any(key in keys for _, keys in stale_folders(cell))}
    assert flagged == {new.run_dir for new, old in zip(changed, cells) if new.config != old.config} != set()
    evaluation = EVALUATION.get(name, "base.eval.linear.epochs=11")
    assert not any(stale_folders(cell) for cell in demo_grid(name, evaluation).cells(tmp_path))


#: the changes after which ssp and semi-supervised once reused finished runs (issue 33): the classifier's epochs, the
#: SSP pre-training's epochs, cRT's epochs (ssp alone has a cRT stage) and the data
REUSED_AFTER = ["base.optim.epochs=21", "ssp_base.optim.epochs=7", "base.data.subset.head_count=20"]


@pytest.mark.parametrize("name, setting", [*((name, setting) for name in ("ssp", "semi-supervised")
                                             for setting in REUSED_AFTER), ("ssp", "base.crt.epochs=4")])
def test_ssp_and_semi_supervised_retrain_after_the_changes_they_once_reused_runs_after(tmp_path, name, setting):
    cells = demo_grid(name).cells(tmp_path)
    save_runs(cells)
    changed = demo_grid(name, setting).cells(tmp_path)
    flagged = {cell.run_dir for cell in changed if stale_folders(cell)}
    assert flagged == {new.run_dir for new, old in zip(changed, cells) if new.config != old.config} != set()


@pytest.mark.parametrize("name", ["ssp", "semi-supervised"])
def test_runs_that_start_from_an_ssp_run_trained_again_are_stale(tmp_path, name):
    """A classifier started from an SSP run's backbone.pt keeps the same init_from when the SSP epochs change: the
    SSP run is trained again, and every finished run that started from its older backbone is trained again too."""
    cells = demo_grid(name).cells(tmp_path)
    save_runs(cells)
    for cell in cells:
        (cell.run_dir / DONE_FILE[cell.kind]).write_text("finished")
        if cell.kind == "self-train":
            (cell.base_dir / DONE_FILE["train"]).write_text("finished")
    assert not any(stale_folders(cell) for cell in cells)
    retrained = next(cell for cell in cells if cell.kind == "pretrain" and cell.axes["ssp"] == "rotation")
    backbone = retrained.run_dir / DONE_FILE["pretrain"]
    os.utime(backbone, ns=(time.time_ns() + 10 ** 9,) * 2)  # written again after the runs started from it
    flagged = {cell.run_dir for cell in cells if any("init_from" in keys for _, keys in stale_folders(cell))}
    starts_from = {cell.run_dir for cell in cells if str(backbone) in json.dumps(cell.config.model_dump())}
    assert flagged == starts_from != set()


# -- the papers' columns --------------------------------------------------------------------------------
def renamed(tree, names: dict[str, str]):
    """``tree`` with every per-class mapping's class names (digits' "0" .. "9") renamed."""
    if isinstance(tree, dict):
        return {names.get(k, k) if isinstance(v, (int, float, dict)) or v is None else k: renamed(v, names)
                for k, v in tree.items()}
    return [renamed(v, names) for v in tree] if isinstance(tree, list) else tree


@pytest.mark.parametrize("classes,shown", [(CIFAR10, True), (["cat", "dog", "fox", "owl", "bee", "eel", "elk",
                                                               "yak", "ant", "hen"], False), (None, False)])
def test_the_papers_columns_sit_beside_the_papers_dataset_alone(tmp_path, classes, shown):
    """The ssp report of CIFAR-10-LT runs carries Table 2's CIFAR-10 column; an ImageFolder of other images (and
    digits, classes None here) gets none, as every recipe decides by paper_dataset."""
    tree = json.loads((FORMAT_0 / "results-ssp.json").read_text())
    if classes:
        tree = renamed(tree, dict(zip(map(str, range(10)), classes)))
    results = Results.from_tree(tree, "results-ssp.json")
    grid = SSPExperimentConfig(base={"data": {"source": "imagefolder", "path": "images.tar.gz"}}, seeds=[0],
                               imbalances=[10], rows=["ce", "ldam-drw"], ssp=["none", "rotation"])
    table = "\n".join(grid.report(results, tmp_path))
    assert ("paper, ResNet-32, 200 ep, best test epoch, CIFAR10-LT: ρ=10" in table) == shown
    assert ("| CE | scratch | 45.40 | 13.61 |" in table) == shown  # beside Table 2's CE at rho=10: 13.61% error
    assert ("are left out" in table) != shown
    assert paper_dataset(results.cells[0].train.test.per_class) == ("cifar10" if shown else None)


# -- the recipes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_names_itself_and_builds_the_cells_of_its_presets(name):
    schema = recipe(name)
    assert schema.NAME == name
    for preset in ("demo", "cpu", "paper"):
        tree = deep_merge(load_preset(schema.PRESETS, preset), {"base": {"data": {"path": "data.tar.gz"}}})
        grid = schema.model_validate(tree)
        cells = grid.cells(Path("out"))
        assert len({cell.run_dir for cell in cells}) == len(cells), (name, preset)  # no run twice
