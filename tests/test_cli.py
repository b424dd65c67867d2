"""The ``imbssl`` command end to end on digits (real data shipped with scikit-learn)."""
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import imbssl
from imbssl.recipes.grid import CellRecord, Results
from imbssl.recipes.subsets import paper_subsets
from imbssl.records import EvalRecord

pytestmark = pytest.mark.slow  # every test starts the command in a fresh interpreter, a second or more each

REPO = Path(__file__).resolve().parents[1]


#: the ssp and semi-supervised demos in seconds: a classifier of 4 epochs (lr x0.01 and DRW from epoch 3), SSP of 2
SHORT_CLASSIFIER = {"base.optim.epochs": "4", "base.optim.milestones": "[3]", "base.optim.lr_factors": "[0.01]",
                    "base.loss.defer_epoch": "3", "ssp_base.optim.epochs": "2"}
#: the priors and longtail-ssl demos in seconds
SHORT_PRETRAINING = {"base.optim.epochs": "2", "base.eval.linear.epochs": "5"}


def reproduce_demo(recipe: str, out: Path, settings: dict[str, str]) -> list[CellRecord]:
    """``imbssl reproduce RECIPE --preset demo --out OUT --set KEY=VALUE ...``, which must succeed; its results.json's
    records."""
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    res = imbssl("reproduce", recipe, "--preset", "demo", "--out", out, *overrides, cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return Results.read(out).cells


def table_rows(text: str, heading: str) -> list[dict[str, str]]:
    """The rows, {column: cell}, of table.md's first table below the heading (any level) that starts with
    ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("# ").startswith(heading))
    table = itertools.takewhile(lambda line: line.startswith("|"),
                                itertools.dropwhile(lambda line: not line.startswith("|"), lines[start + 1:]))
    header, _rule, *body = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in table)
    return [dict(zip(header, row)) for row in body]


def number(cell: str) -> float | None:
    """A cell's figure: the mean of 'mean ± std', 1297 for '1,297'; None for 'n/a' with its reason."""
    return None if cell.startswith("n/a") else float(cell.split(" ± ")[0].replace(",", ""))


def seed_mean(records: list[CellRecord], value, **cell):
    """The mean of ``value(record)`` over the records (one per seed) whose axes hold ``cell``'s values, to the
    table's 2 decimals."""
    values = [value(r) for r in records if all(r.axes.get(key) == wanted for key, wanted in cell.items())]
    assert values, cell
    return pytest.approx(float(np.mean(values)), abs=0.0051)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "report"
    res = imbssl("demo", "--out", out, "--set", "seeds=[0]", "--set", "base.optim.epochs=2",
                 "--set", "base.eval.linear.epochs=5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Imbalanced (p=100)" in res.stdout and f"report: {out}" in res.stdout
    records = Results.read(out).cells
    assert len(records) == 10  # 5 subsets x 2 methods x 1 seed
    assert {r.axes["subset"] for r in records} == {"imbalanced-p10", "imbalanced-p100", "balanced-rs-p10",
                                                   "balanced-rs-p100", "balanced-full"}
    sizes = {r.axes["subset"]: sum(r.eval.pretrain_class_counts) for r in records}
    assert sizes["imbalanced-p10"] == sizes["balanced-rs-p10"] and sizes["imbalanced-p100"] == sizes["balanced-rs-p100"]
    for r in records:
        labelled, n = r.eval.labelled_train + r.eval.labelled_val, sum(r.eval.pretrain_class_counts)
        assert 10 < r.eval.linear.top1 <= 100
        # Balanced labelled set of size N, capped per class by the pool (only the full set hits the cap).
        assert labelled == n if r.axes["subset"] != "balanced-full" else n - 10 <= labelled <= n
    table = (out / "table.md").read_text()
    subset_titled = {s.title.format(n=sizes[s.key]): s.key for s in paper_subsets()}  # 'Balanced (rs.{n})'
    figures = [("Experiment I on digits", "{}", lambda r: r.eval.linear.top1),
               ("Linear top-1 by thirds", "{} rare", lambda r: r.eval.linear.thirds.rare),
               ("Linear top-1 by thirds", "{} std", lambda r: r.eval.linear.thirds_std),
               ("k-NN (k=20)", "{}", lambda r: r.eval.knn[20].top1)]
    for heading, column, value in figures:
        rows = table_rows(table, heading)
        assert len(rows) == 5
        for row in rows:
            subset = subset_titled[row["Subset"]]
            assert number(row["N"]) == sizes[subset]
            for method in ("SimCLR", "SimSiam"):
                assert number(row[column.format(method)]) == seed_mean(records, value, subset=subset,
                                                                       method=method.lower()), (heading, row)
    for name in ("distributions.png", "per_class_accuracy-simsiam.png", "per_class_accuracy-simclr.png"):
        assert (out / name).stat().st_size > 0
    # A second call reuses every finished run.
    again = imbssl("demo", "--out", out, "--set", "seeds=[0]", "--set", "base.optim.epochs=2",
                   "--set", "base.eval.linear.epochs=5", cwd=tmp_path)
    assert again.returncode == 0 and Results.read(out).cells[0].eval == records[0].eval


def test_data_describe_json(tmp_path):
    res = imbssl("data", "describe", "--json", "--plot", tmp_path / "dist.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    subsets = info["subsets"]
    full = next(v for k, v in subsets.items() if "full" in k)
    lt100 = next(v for k, v in subsets.items() if "p=100" in k)
    assert full["total"] == 1297 and lt100["counts"][0] == min(full["counts"])
    assert lt100["counts"][-1] == int(lt100["counts"][0] / 100)
    assert (tmp_path / "dist.png").stat().st_size > 0


def test_pretrain_then_evaluate(tmp_path):
    run = tmp_path / "run"
    res = imbssl("pretrain", REPO / "configs" / "simsiam-digits.yaml", "--run-dir", run, "--no-eval",
                 "--set", "optim.epochs=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = imbssl("evaluate", run, "--set", "eval.linear.epochs=3", "--set", "eval.knn_k=[5]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    result = EvalRecord.read(run)
    assert list(result.knn) == [5] and result.settings["linear"]["epochs"] == 3  # the evaluation --set asked for
    assert f"linear top-1 {result.linear.top1:.2f}" in res.stdout and "knn5" in res.stdout


def test_bad_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {epochs: 1, lr: 0.1}\n")
    res = imbssl("pretrain", bad, cwd=tmp_path)
    assert res.returncode == 2 and "unknown config key 'optim.lr'" in res.stderr


def test_missing_class_folder_is_named(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat"])):
        for name in classes:
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    res = imbssl("data", "describe", "--set", "data.source=imagefolder", "--set", f"data.path={tmp_path / 'tree'}",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert res.returncode == 2 and "dog" in res.stderr and "test" in res.stderr


def test_reproduce_ssp_demo_end_to_end(tmp_path):
    out = tmp_path / "ssp"
    records = reproduce_demo("ssp", out, SHORT_CLASSIFIER)
    # the SSP runs, then 3 initialisations (scratch, Rotation, SimSiam) x 2 trained losses (CE with its cRT stage,
    # LDAM-DRW) x 1 seed
    assert [(r.kind, r.axes["ssp"]) for r in records[:2]] == [("pretrain", "rotation"), ("pretrain", "simsiam")]
    records = [r for r in records if r.kind == "train"]
    assert sorted((r.axes["ssp"], r.axes["loss"]) for r in records) == sorted(
        (ssp, loss) for ssp in ("none", "rotation", "simsiam") for loss in ("ce", "ldam-drw"))
    assert all(r.train.crt.test.error > 0 for r in records if r.axes["loss"] == "ce")
    assert all((r.train.init_from is None) == (r.axes["ssp"] == "none") for r in records)
    table = (out / "table.md").read_text()
    losses = {"CE": ("ce", "main"), "LDAM-DRW": ("ldam-drw", "main"), "cRT (Kang et al.)": ("ce", "crt")}
    inits = {"scratch": "none", "Rotation": "rotation", "SimSiam": "simsiam"}
    rows = table_rows(table, "SSP then long-tailed supervised learning")
    assert [(row["Loss"], row["SSP"]) for row in rows] == list(itertools.product(losses, inits))
    error = {(row["Loss"], row["SSP"]): number(row["ρ=10"]) for row in rows}
    for (loss, init), cell in error.items():
        (name, stage), ssp = losses[loss], inits[init]
        assert cell == seed_mean(records, lambda r: r.train.stage(stage).test.error, loss=name, ssp=ssp), (loss, init)
    # the verdict's paired gain of Rotation: error from scratch - error with SSP, one seed here
    gains = re.findall(r"^  - (.+), ρ=10: ([+-][\d.]+) points", table.split("- SSP from Rotation")[1].split("\n- ")[0],
                       re.MULTILINE)
    assert [loss for loss, _ in gains] == list(losses)
    for loss, gain in gains:
        assert float(gain) == pytest.approx(error[loss, "scratch"] - error[loss, "Rotation"], abs=0.011), loss
    assert "left out: digits is not comparable" in table  # no paper column beside digits
    assert (out / "per_class_accuracy-ce-rho10.png").stat().st_size > 0
    for ssp in ("rotation", "simsiam"):  # the SSP runs are ordinary, evaluated imbssl runs
        assert (out / "runs" / "rho10" / f"ssp-{ssp}" / "seed0" / "eval.json").exists()


def test_train_command_reports_one_line_per_problem(tmp_path):
    res = imbssl("train", "ce-digits", "--set", "loss.nme=ce", cwd=tmp_path)
    assert res.returncode == 2 and "unknown config key 'loss.nme'" in res.stderr
    res = imbssl("train", "ce-digits", "--init-from", tmp_path / "missing.pt", cwd=tmp_path)
    assert res.returncode == 2 and "init_from=" in res.stderr and "no such file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_reproduce_semi_supervised_demo_end_to_end(tmp_path):
    out = tmp_path / "semi"
    records = reproduce_demo("semi-supervised", out, SHORT_CLASSIFIER)
    # 2 initialisations (scratch, Rotation) x 2 losses x 2 rho_U (1, rho) x 1 seed, after Rotation's SSP run
    assert [(r.kind, r.axes["ssp"]) for r in records[:1]] == [("pretrain", "rotation")]
    records = records[1:]
    assert sorted((r.axes["ssp"], r.axes["loss"], r.axes["rho_u"]) for r in records) == sorted(
        (ssp, loss, rho_u) for ssp in ("none", "rotation") for loss in ("ce", "ldam-drw") for rho_u in ("1", "rho"))
    runs = out / "runs" / "rho10"
    # the rho_U columns share one base classifier per (loss, initialisation, seed)
    assert sorted(p.parents[1].relative_to(runs).as_posix() for p in runs.glob("*/*/seed0/base/train.json")) == sorted(
        f"{loss}/{init}/seed0" for loss in ("ce", "ldam-drw") for init in ("scratch", "ssp-rotation"))
    assert all(r.self_training.base == next(q.self_training.base for q in records
                                            if (q.axes["loss"], q.axes["ssp"]) == (r.axes["loss"], r.axes["ssp"]))
               for r in records)
    assert (runs / "ssp-rotation" / "seed0" / "eval.json").exists()
    table = (out / "table.md").read_text()
    losses, inits = {"CE": "ce", "LDAM-DRW": "ldam-drw"}, {"scratch": "none", "Rotation": "rotation"}
    stages = {"none": "base", "+ D_U @3x": "final"}  # the classifier without D_U, and the one self-trained with it
    rows = table_rows(table, "Self-training with imbalanced unlabeled data")
    assert [(row["Loss"], row["SSP"], row["D_U"]) for row in rows] == list(itertools.product(losses, inits, stages))
    for row in rows:
        for rho_u, column in (("1", "ρ=10, ρ_U=1"), ("rho", "ρ=10, ρ_U=10")):
            assert number(row[column]) == seed_mean(records, lambda r: getattr(r.self_training,
                                                                               stages[row["D_U"]]).error,
                                                    loss=losses[row["Loss"]], ssp=inits[row["SSP"]], rho_u=rho_u), row
    assert "## Verdicts (paired by seed)" in table and "left out: digits is not comparable" in table


def test_self_training_command_names_the_class_that_runs_out(tmp_path):
    res = imbssl("pipeline", "self-training", "ce-digits", "--set", "unlabeled.size_factor=20",
                 "--run-dir", tmp_path / "st", cwd=tmp_path)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "asks for" in res.stderr and "images of class 0 ('0')" in res.stderr


def test_reproduce_priors_demo_end_to_end(tmp_path):
    out = tmp_path / "priors"
    records = reproduce_demo("priors", out, SHORT_PRETRAINING)
    assert sorted((r.axes["subset"], r.axes["method"]) for r in records) == sorted(
        (s, m) for s in ("imbalanced-p100", "balanced-rs-p100")
        for m in ("msn", "pmsn-0.25", "excb", "excb-power-0.25"))
    by_method = {r.axes["method"]: r for r in records if r.axes["subset"] == "imbalanced-p100"}
    assert by_method["msn"].eval.clusters.sorted_prior == pytest.approx([1 / 32] * 32)
    pmsn_prior = by_method["pmsn-0.25"].eval.clusters.sorted_prior
    assert pmsn_prior[0] > pmsn_prior[-1]
    # KL(p̄ ‖ uniform) = log K - H(p̄): above 0 for a p̄ that is not uniform, below log K for one that is not one-hot
    msn_training = by_method["msn"].pretrain
    assert 0 < msn_training.figure("prior_kl") < msn_training.figure("log_k") == pytest.approx(np.log(32))
    assert by_method["excb"].pretrain.figure("prior_kl") is None
    table = (out / "table.md").read_text()
    columns = {"linear top-1": lambda r: r.eval.linear.top1,
               "KL(p̄ ‖ prior), training": lambda r: r.pretrain.figure("prior_kl"),
               "KL(sizes ‖ prior)": lambda r: r.eval.clusters.kl_to_prior,
               "empty": lambda r: r.eval.clusters.empty_clusters}
    variants = {"MSN": "msn", "pmsn-0.25": "pmsn-0.25", "ExCB": "excb", "excb-power-0.25": "excb-power-0.25"}
    for subset, title in (("imbalanced-p100", "Imbalanced (p=100)"), ("balanced-rs-p100", "Balanced (rs.304)")):
        rows = table_rows(table, f"{title}: the clusters against the prior")
        assert [row["variant"] for row in rows] == list(variants)
        for row in rows:
            method = variants[row["variant"]]
            for column, value in columns.items():
                if method.startswith("excb") and column == "KL(p̄ ‖ prior), training":
                    assert number(row[column]) is None  # ExCB has no such term
                else:
                    assert number(row[column]) == seed_mean(records, value, subset=subset, method=method)
    assert "- pmsn-0.25 against msn" in table and "- excb-power-0.25 against excb" in table
    assert (out / "prior_fit-imbalanced-p100.png").stat().st_size > 0


def test_reproduce_longtail_ssl_demo_end_to_end(tmp_path):
    out = tmp_path / "longtail-ssl"
    records = reproduce_demo("longtail-ssl", out,
                             {**SHORT_PRETRAINING, "pipeline.epochs": "{base: 1, expert: 1, distill: 1}"})
    methods = {"SimCLR": "simclr", "SimCLR+TS": "simclr-ts", "SDCLR": "sdclr", "BCL-I": "bcl-i", "BCL-D": "bcl-d",
               "Focal": "focal", "SimCLR+GH": "simclr+gh", "Focal+GH": "focal+gh", "SDCLR+GH": "sdclr+gh",
               "BCL-I+GH": "bcl-i+gh", "BCL-D+GH": "bcl-d+gh", "SimSiam": "simsiam", "ExCB": "excb", "PMSN": "pmsn",
               "Align-Uniform": "align-uniform",
               "BYOL": "byol", "Barlow Twins": "barlow-twins", "VICReg": "vicreg", "DINO": "dino",
               "SimSiam+C+D": "simsiam+c+d"}
    assert sorted(r.axes["method"] for r in records) == sorted(methods.values())
    for r in records:
        assert set(r.eval.few_shot) == {"10%", "20-shot", "10-shot"}
        assert r.eval.linear.thirds_std == pytest.approx(np.std(list(r.eval.linear.thirds.model_dump().values())))
    trained = {r.axes["method"]: json.loads((Path(r.run_dir) / "pretrain.json").read_text()) for r in records
               if r.axes["method"] != "simsiam+c+d"}
    assert "pruned_output_std" in trained["bcl-d"]
    for name in ("bcl-i", "bcl-d"):
        assert all(0 <= trained[name][f"boost_weight_{t}"] <= 1 for t in ("major", "minor", "rare"))
    assert all(trained[name]["gh"] > 0 for name in methods.values() if name.endswith("+gh"))  # GH ran in epoch 2
    table = (out / "table.md").read_text()
    columns = {"full-shot": lambda r: r.eval.linear.top1, "10-shot": lambda r: r.eval.few_shot["10-shot"].top1,
               "rare": lambda r: r.eval.linear.thirds.rare,
               "thirds std (balancedness)": lambda r: r.eval.linear.thirds_std}
    rows = table_rows(table, "Imbalanced (rho=100")
    assert [row["method"] for row in rows] == list(methods)
    for row in rows:
        for column, value in columns.items():
            assert number(row[column]) == seed_mean(records, value, method=methods[row["method"]]), (row, column)
    assert "- full-shot: " in table and "SimCLR < SDCLR < BCL-I < BCL-D (the papers')" in table
    assert "left out: they are not of CIFAR-100" in table  # digits: the published CIFAR-100 figures stay out
