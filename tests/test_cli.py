"""The ``imbssl`` command end to end on digits (real data shipped with scikit-learn)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def imbssl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "imbssl", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "report"
    res = imbssl("demo", "--out", out, "--set", "seeds=[0]", "--set", "base.optim.epochs=2",
                 "--set", "base.eval.linear.epochs=5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Imbalanced (p=100)" in res.stdout and f"report: {out}" in res.stdout
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 10  # 5 subsets x 2 methods x 1 seed
    assert {r["subset"] for r in records} == {"imbalanced-p10", "imbalanced-p100", "balanced-rs-p10",
                                              "balanced-rs-p100", "balanced-full"}
    sizes = {r["subset"]: sum(r["pretrain_class_counts"]) for r in records}
    assert sizes["imbalanced-p10"] == sizes["balanced-rs-p10"] and sizes["imbalanced-p100"] == sizes["balanced-rs-p100"]
    for r in records:
        labelled, n = r["labelled_train"] + r["labelled_val"], sum(r["pretrain_class_counts"])
        assert 10 < r["linear"]["top1"] <= 100
        # Balanced labelled set of size N, capped per class by the pool (only the full set hits the cap).
        assert labelled == n if r["subset"] != "balanced-full" else n - 10 <= labelled <= n
    for name in ("table.md", "distributions.png", "per_class_accuracy-simsiam.png", "per_class_accuracy-simclr.png"):
        assert (out / name).stat().st_size > 0
    # A second call reuses every finished run.
    again = imbssl("demo", "--out", out, "--set", "seeds=[0]", "--set", "base.optim.epochs=2",
                   "--set", "base.eval.linear.epochs=5", cwd=tmp_path)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())[0]["linear"] == records[0]["linear"]


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
    result = json.loads((run / "eval.json").read_text())
    assert "knn5" in result and set(result["linear"]["thirds"]) == {"major", "minor", "rare"}
    assert "linear top-1" in res.stdout


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


@pytest.mark.slow
def test_reproduce_ssp_demo_end_to_end(tmp_path):
    out = tmp_path / "ssp"
    res = imbssl("reproduce", "ssp", "--preset", "demo", "--out", out, "--set", "base.optim.epochs=4",
                 "--set", "base.optim.milestones=[3]", "--set", "base.optim.lr_factors=[0.01]",
                 "--set", "base.loss.defer_epoch=3", "--set", "ssp_base.optim.epochs=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = json.loads((out / "results.json").read_text())
    # 3 initialisations (scratch, Rotation, SimSiam) x 2 trained losses (CE with its cRT stage, LDAM-DRW) x 1 seed
    assert sorted((r["ssp"], r["loss"]) for r in records) == sorted(
        (ssp, loss) for ssp in ("none", "rotation", "simsiam") for loss in ("ce", "ldam-drw"))
    assert all(r["crt"]["test"]["error"] > 0 for r in records if r["loss"] == "ce")
    assert all((r["init_from"] is None) == (r["ssp"] == "none") for r in records)
    table = (out / "table.md").read_text()
    assert "| cRT (Kang et al.) | Rotation |" in table and "## Verdicts (paired by seed)" in table
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


@pytest.mark.slow
def test_reproduce_semi_supervised_demo_end_to_end(tmp_path):
    out = tmp_path / "semi"
    res = imbssl("reproduce", "semi-supervised", "--preset", "demo", "--out", out, "--set", "base.optim.epochs=4",
                 "--set", "base.optim.milestones=[3]", "--set", "base.optim.lr_factors=[0.01]",
                 "--set", "base.loss.defer_epoch=3", "--set", "ssp_base.optim.epochs=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = json.loads((out / "results.json").read_text())
    # 2 initialisations (scratch, Rotation) x 2 losses x 2 rho_U (1, rho) x 1 seed
    assert sorted((r["ssp"], r["loss"], r["rho_u"]) for r in records) == sorted(
        (ssp, loss, rho_u) for ssp in ("none", "rotation") for loss in ("ce", "ldam-drw") for rho_u in ("1", "rho"))
    runs = out / "runs" / "rho10"
    # the rho_U columns share one base classifier per (loss, initialisation, seed)
    assert sorted(p.parents[1].relative_to(runs).as_posix() for p in runs.glob("*/*/seed0/base/train.json")) == sorted(
        f"{loss}/{init}/seed0" for loss in ("ce", "ldam-drw") for init in ("scratch", "ssp-rotation"))
    assert all(r["base"] == next(q["base"] for q in records if (q["loss"], q["ssp"]) == (r["loss"], r["ssp"]))
               for r in records)
    assert (runs / "ssp-rotation" / "seed0" / "eval.json").exists()
    table = (out / "table.md").read_text()
    assert "| CE | Rotation | + D_U @3x |" in table and "## Verdicts (paired by seed)" in table
    assert "left out: digits is not comparable" in table


def test_self_training_command_names_the_class_that_runs_out(tmp_path):
    res = imbssl("pipeline", "self-training", "ce-digits", "--set", "unlabeled.size_factor=20",
                 "--run-dir", tmp_path / "st", cwd=tmp_path)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "asks for" in res.stderr and "images of class 0 ('0')" in res.stderr


@pytest.mark.slow
def test_reproduce_priors_demo_end_to_end(tmp_path):
    out = tmp_path / "priors"
    res = imbssl("reproduce", "priors", "--preset", "demo", "--out", out, "--set", "base.optim.epochs=2",
                 "--set", "base.eval.linear.epochs=5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["subset"], r["method"]) for r in records) == sorted(
        (s, m) for s in ("imbalanced-p100", "balanced-rs-p100")
        for m in ("msn", "pmsn-0.25", "excb", "excb-power-0.25"))
    by_method = {r["method"]: r for r in records if r["subset"] == "imbalanced-p100"}
    assert by_method["msn"]["clusters"]["sorted_prior"] == pytest.approx([1 / 32] * 32)
    pmsn_prior = by_method["pmsn-0.25"]["clusters"]["sorted_prior"]
    assert pmsn_prior[0] > pmsn_prior[-1]
    assert by_method["msn"]["pretrain"]["prior_kl"] >= 0 and "prior_kl" not in by_method["excb"]["pretrain"]
    table = (out / "table.md").read_text()
    assert "| KL(p̄ ‖ prior), training |" in table
    assert "- pmsn-0.25 against msn" in table and "- excb-power-0.25 against excb" in table
    assert (out / "prior_fit-imbalanced-p100.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_longtail_ssl_demo_end_to_end(tmp_path):
    out = tmp_path / "longtail-ssl"
    res = imbssl("reproduce", "longtail-ssl", "--preset", "demo", "--out", out, "--set", "base.optim.epochs=2",
                 "--set", "pipeline.epochs={base: 1, expert: 1, distill: 1}", "--set", "base.eval.linear.epochs=5",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = json.loads((out / "results.json").read_text())
    methods = ["simclr", "simclr-ts", "sdclr", "bcl-i", "bcl-d", "simsiam", "excb", "pmsn", "simsiam+c+d"]
    assert sorted(r["method"] for r in records) == sorted(methods)
    for r in records:
        assert set(r["few_shot"]) == {"10%", "20-shot", "10-shot"} and r["linear"]["thirds_std"] >= 0
    trained = {r["method"]: json.loads((Path(r["run_dir"]) / "pretrain.json").read_text()) for r in records
               if r["method"] != "simsiam+c+d"}
    assert "pruned_output_std" in trained["bcl-d"]
    for name in ("bcl-i", "bcl-d"):
        assert all(0 <= trained[name][f"boost_weight_{t}"] <= 1 for t in ("major", "minor", "rare"))
    table = (out / "table.md").read_text()
    for name in ("SimCLR+TS", "SDCLR", "BCL-I", "BCL-D", "PMSN", "SimSiam+C+D", "thirds std (balancedness)"):
        assert name in table
    assert "- full-shot: " in table and "SimCLR < SDCLR < BCL-I < BCL-D (the papers')" in table
    assert "left out: they are not of CIFAR-100" in table  # digits: the published CIFAR-100 figures stay out
