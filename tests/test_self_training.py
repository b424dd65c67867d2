"""Self-training with imbalanced unlabeled data: the D_L / D_U builder, pseudo-labels, the pipeline's stages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import imbssl.pipelines.self_training as self_training
from imbssl.config import ConfigError, PseudoLabelConfig, SelfTrainingConfig, SubsetConfig, UnlabeledConfig, \
    validate_tree
from imbssl.data import DataError, exp_counts, labeled_unlabeled_split, load_splits, unlabeled_counts
from imbssl.data.sources import ImageSet
from imbssl.engine.checkpoint import load_safe
from imbssl.losses import cross_entropy, focal_loss
from imbssl.pipelines.self_training import (LABELLER_DIR, PSEUDO_FILE, REPORT_FILE, hard_labels, select_pseudo_labels,
                                           self_train)
from imbssl.pipelines.train import MODEL_FILE, TRAIN_FILE
from imbssl.recipes import load_preset
from imbssl.recipes.semi_supervised import SemiSupervisedExperimentConfig

from conftest import Interrupt, crash_after, with_sections

POOL = np.repeat(np.arange(10), 500)  # 10 classes of 500 images


def split(head=40, rho=10.0, size_factor=5.0, rho_u=1.0, seed=0, reserve=20):
    return labeled_unlabeled_split(POOL, SubsetConfig(profile="exp", imbalance=rho, head_count=head, seed=seed),
                                   UnlabeledConfig(size_factor=size_factor, imbalance=rho_u), reserve)


@pytest.mark.parametrize("rho_u", [1.0, 5.0, 10.0, 20.0])
def test_the_builder_draws_disjoint_parts_that_follow_their_profiles(rho_u):
    labeled, unlabeled, reserved = split(rho_u=rho_u)
    parts = np.concatenate([labeled, unlabeled, reserved])
    assert len(np.unique(parts)) == len(parts)  # disjoint
    assert np.bincount(POOL[labeled]).tolist() == exp_counts(40, 10, 10.0).tolist()
    assert np.bincount(POOL[reserved]).tolist() == [20] * 10
    got = np.bincount(POOL[unlabeled], minlength=10)
    wanted = unlabeled_counts(exp_counts(40, 10, 10.0), np.arange(10), UnlabeledConfig(imbalance=rho_u))
    assert got.tolist() == wanted.tolist()
    # the seed's "@5x": |D_U| = 5 |D_L| up to truncation, spread as rho_U says, its head D_L's head
    assert 5 * len(labeled) - 10 <= len(unlabeled) <= 5 * len(labeled)
    assert got[0] / got[-1] == pytest.approx(rho_u, rel=0.1) and got[0] == got.max()


def test_the_builder_is_seeded_and_keeps_d_l_and_the_validation_set_whatever_rho_u():
    assert all(np.array_equal(a, b) for a, b in zip(split(seed=3), split(seed=3)))
    assert not np.array_equal(split(seed=3)[0], split(seed=4)[0])
    (l1, u1, r1), (l2, u2, r2) = split(rho_u=1.0), split(rho_u=20.0)
    assert np.array_equal(l1, l2) and np.array_equal(r1, r2) and not np.array_equal(u1, u2)


def test_a_d_u_that_the_pool_cannot_hold_names_the_class_that_runs_out():
    # the head: 200 labeled leave 300 of 500, 20 of them for validation; rho_U = 1 spreads 5 x 812 images, 406 a class
    with pytest.raises(DataError, match=r"asks for 406 images of class 0, but the pool has 280 left after its "
                                        r"200 labeled and 20 validation images"):
        split(head=200)


def test_unit_sample_weights_are_the_plain_loss_and_omega_scales_an_images_term():
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    class_weight = torch.tensor([0.5, 1.0, 2.0, 4.0])
    for weight in (None, class_weight):
        ones = torch.ones(6)
        assert torch.allclose(cross_entropy(logits, target, weight, ones), cross_entropy(logits, target, weight))
        assert torch.allclose(focal_loss(logits, target, 1.0, weight, ones), focal_loss(logits, target, 1.0, weight))
    omega = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    terms = -torch.log_softmax(logits, 1)[torch.arange(6), target] * class_weight[target]
    by_hand = (terms[:3].sum() + 0.5 * terms[3:].sum()) / class_weight[target].sum()
    assert torch.allclose(cross_entropy(logits, target, class_weight, omega), by_hand)


def test_thresholding_keeps_exactly_the_pseudo_labels_above_it_and_balancing_caps_each_class():
    confidence = np.array([0.95, 0.5, 0.91, 0.3, 0.99, 0.9, 0.92, 0.97])
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    kept = select_pseudo_labels(confidence, labels, PseudoLabelConfig(threshold=0.9), 3)
    assert kept.tolist() == (confidence > 0.9).tolist()
    balanced = select_pseudo_labels(confidence, labels, PseudoLabelConfig(threshold=0.9, class_balanced=True), 3)
    # above 0.9: class 0 has 2, class 1 has 1, class 2 has 2 -> one each, the most confident
    assert np.flatnonzero(balanced).tolist() == [0, 4, 7]
    assert select_pseudo_labels(confidence, labels, PseudoLabelConfig(), 3).all()  # threshold 0 keeps every image


@pytest.fixture
def st_cfg(tmp_path):
    """A seconds-long self-training run on digits-LT (head 30, rho=10, D_U of 2 x |D_L| balanced images)."""
    def make(**sections):
        tree = {"name": "st", "out_dir": str(tmp_path / "runs"),
                "data": {"source": "digits", "cache_dir": str(tmp_path / "cache"),
                         "subset": {"profile": "exp", "imbalance": 10, "head_count": 30}},
                "unlabeled": {"size_factor": 2, "imbalance": 1},
                "model": {"backbone": "small_cnn", "width": 0.25},
                "optim": {"batch_size": 64, "epochs": 4, "warmup_epochs": 1, "milestones": [3], "lr_factors": [0.1]},
                "augment_pad": 0, "train": {"progress": False}, "eval": {"val_per_class": 5}}
        return validate_tree(SelfTrainingConfig, with_sections(tree, sections))
    return make


@pytest.mark.slow
def test_self_training_writes_each_stage_and_reports_the_pseudo_labels(st_cfg, tmp_path):
    root = self_train(st_cfg(pseudo_labels={"threshold": 0.5}), tmp_path / "st")
    pseudo = load_safe(root / PSEUDO_FILE)
    assert ((pseudo["confidence"] >= 0) & (pseudo["confidence"] <= 1)).all()
    assert torch.equal(pseudo["kept"], pseudo["confidence"] > 0.5)
    report = json.loads((root / REPORT_FILE).read_text())
    final = json.loads((root / "final" / TRAIN_FILE).read_text())
    labeled = np.asarray(report["labeled_class_counts"])
    # the final model trains on D_L plus the kept D_U, counted by their pseudo-labels; its groups are D_L's
    kept_labels = pseudo["labels"][pseudo["kept"]].numpy()
    assert final["train_class_counts"] == (labeled + np.bincount(kept_labels, minlength=10)).tolist()
    assert final["labeled_class_counts"] == labeled.tolist()
    assert report["pseudo_labels"]["kept"] == int(pseudo["kept"].sum())
    assert sum(c["images"] for c in report["pseudo_labels"]["per_class"].values()) == len(pseudo["labels"])
    assert np.asarray(report["pseudo_labels"]["confusion"]).sum() == len(pseudo["labels"])
    assert (root / "pseudo_label_confusion.png").stat().st_size > 0
    assert report["base"] == json.loads((root / "base" / TRAIN_FILE).read_text())["test"]


@pytest.mark.slow
def test_d_u_labels_never_reach_training(st_cfg, tmp_path, monkeypatch):
    """Shuffling D_U's labels (the split held fixed) leaves the pseudo-labels and the final model bit-identical."""
    cfg = st_cfg()
    honest = self_train(cfg, tmp_path / "honest")
    drawn = self_training.labeled_unlabeled_split(load_splits(cfg.data)["train"].labels, cfg.data.subset,
                                                  cfg.unlabeled, cfg.eval.val_per_class)
    unlabeled = drawn[1]

    def shuffled_splits(data_cfg):
        splits = load_splits(data_cfg)
        pool, labels = splits["train"], splits["train"].labels.copy()
        labels[unlabeled] = np.random.default_rng(0).permutation(labels[unlabeled])
        assert (labels[unlabeled] != pool.labels[unlabeled]).any()
        return {**splits, "train": ImageSet(pool.images, labels, pool.classes)}

    monkeypatch.setattr(self_training, "load_splits", shuffled_splits)
    monkeypatch.setattr(self_training, "labeled_unlabeled_split", lambda *args: drawn)
    blind = self_train(cfg, tmp_path / "blind")
    for name in ("labels", "confidence", "kept"):
        assert torch.equal(load_safe(honest / PSEUDO_FILE)[name], load_safe(blind / PSEUDO_FILE)[name])
    a, b = (load_safe(run / "final" / MODEL_FILE)["model"] for run in (honest, blind))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # only the monitoring report reads D_U's labels, so only it changes
    reports = [json.loads((run / REPORT_FILE).read_text())["pseudo_labels"]["accuracy"] for run in (honest, blind)]
    assert reports[0] != reports[1]


@pytest.mark.slow
def test_an_interrupted_final_stage_resumes_exactly(st_cfg, tmp_path):
    cfg = st_cfg()
    straight = self_train(cfg, tmp_path / "straight")
    with pytest.raises(Interrupt):
        self_train(cfg, tmp_path / "resumed", callbacks={"final": [crash_after(2)]})
    assert (tmp_path / "resumed" / "base" / TRAIN_FILE).exists() and not (tmp_path / "resumed" / REPORT_FILE).exists()
    resumed = self_train(cfg, tmp_path / "resumed", resume=True)
    a, b = (load_safe(run / "final" / MODEL_FILE)["model"] for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((run / REPORT_FILE).read_text()) for run in (straight, resumed))
    assert ra["final"] == rb["final"] and ra["pseudo_labels"] == rb["pseudo_labels"]


@pytest.mark.slow
def test_a_shared_base_must_have_trained_on_this_d_l_with_these_settings(st_cfg, tmp_path):
    root = self_train(st_cfg(), tmp_path / "first")
    with pytest.raises(ConfigError, match=r"trained with other settings: data.subset.seed \(0 -> 1\)"):
        self_train(st_cfg(data={"subset": {"profile": "exp", "imbalance": 10, "head_count": 30, "seed": 1}}),
                   tmp_path / "second", base_dir=root / "base")
    with pytest.raises(ConfigError, match=r"trained with other settings: optim.epochs \(4 -> 5\)"):
        self_train(st_cfg(optim={"epochs": 5}), tmp_path / "third", base_dir=root / "base")


@pytest.mark.slow
def test_the_final_model_does_not_depend_on_whether_the_base_trained_in_the_same_call(st_cfg, tmp_path):
    """The rho_U columns of a grid share a base: only the first trains it, and every final must start alike."""
    first = self_train(st_cfg(), tmp_path / "first")
    second = self_train(st_cfg(), tmp_path / "second", base_dir=first / "base")
    a, b = (load_safe(run / "final" / MODEL_FILE)["model"] for run in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stage_configs_drop_the_self_training_keys(st_cfg):
    stage = st_cfg(pseudo_labels={"weight": 0.5}).stage("final")
    assert stage.name == "final" and not hasattr(stage, "unlabeled")
    assert type(stage).__name__ == "SupervisedConfig"


def test_base_epochs_stretch_the_base_classifiers_schedule(st_cfg):
    cfg = st_cfg(optim={"epochs": 10, "warmup_epochs": 1, "milestones": [8, 9], "lr_factors": [0.01, 0.0001]},
                 loss={"name": "ldam", "deferral": "drw", "defer_epoch": 8}, base_epochs=40)
    base, final = cfg.stage("base"), cfg.stage("final")
    assert (base.optim.epochs, base.optim.warmup_epochs, base.optim.milestones) == (40, 4, [32, 36])
    assert base.loss.defer_epoch == 32
    assert (final.optim.epochs, final.optim.milestones, final.loss.defer_epoch) == (10, [8, 9], 8)


def test_pseudo_labels_are_the_argmax_of_the_logits_even_one_float_apart():
    """gen_pseudolabels.py takes torch.max of the logits; a softmax first rounds logits one float apart to one
    probability and then picks the first of them (tests/reference/test_ref_semi_self.py has the seed's own)."""
    logits = torch.full((2, 4), -1.0)
    logits[0, 1] = 0.1
    logits[0, 2] = torch.nextafter(torch.tensor(0.1), torch.tensor(1.0))  # larger by one float
    logits[1, :2] = 0.5  # a tie: the first
    for scale in (1.0, 30.0):
        confidence, labels = hard_labels(logits, scale)
        assert labels.tolist() == [2, 0]
        assert torch.equal(confidence, torch.softmax(logits * scale, 1)[[0, 1], [2, 0]])


def test_the_final_stage_trains_at_final_batch_size(st_cfg):
    cfg = st_cfg(final_batch_size=256)
    assert (cfg.stage("base").optim.batch_size, cfg.stage("final").optim.batch_size) == (64, 256)
    assert st_cfg().stage("final").optim.batch_size == 64  # unset: the base's


def test_the_ce_labeller_is_the_ce_runs_base_classifier(st_cfg):
    ldam = st_cfg(loss={"name": "ldam", "deferral": "drw", "defer_epoch": 3}, pseudo_labels={"labeller": "ce"},
                  base_epochs=8)
    labeller = ldam.stage("labeller")
    assert labeller == st_cfg(loss={"defer_epoch": 3}, base_epochs=8).stage("base") and labeller.loss.name == "ce"
    assert (labeller.optim.epochs, labeller.loss.defer_epoch) == (8, 6)  # stretched as the base
    assert not ldam.labels_with_base() and st_cfg(pseudo_labels={"labeller": "ce"}).labels_with_base()
    assert ldam.model_copy(update={"pseudo_labels": PseudoLabelConfig()}).labels_with_base()  # labeller base


@pytest.mark.slow
def test_a_ce_labeller_gives_an_ldam_drw_run_the_ce_runs_pseudo_labels(st_cfg, tmp_path):
    """pseudo_labels.labeller ce: the LDAM-DRW run trains a CE base classifier beside its own f_B, or uses a shared
    one, and labels D_U with it: bit for bit the pseudo-labels of the CE run."""
    ce = self_train(st_cfg(loss={"defer_epoch": 3}), tmp_path / "ce")  # a grid's rows share the loss settings
    ldam_cfg = st_cfg(loss={"name": "ldam", "deferral": "drw", "defer_epoch": 3}, pseudo_labels={"labeller": "ce"})
    own = self_train(ldam_cfg, tmp_path / "own")
    shared = self_train(ldam_cfg, tmp_path / "shared", labeller_dir=ce / "base")
    assert not (shared / LABELLER_DIR).exists()
    for run in (own, shared):
        assert torch.equal(load_safe(run / PSEUDO_FILE)["labels"], load_safe(ce / PSEUDO_FILE)["labels"])
    report = json.loads((own / REPORT_FILE).read_text())
    assert report["labeller"]["test"] == json.loads((own / LABELLER_DIR / TRAIN_FILE).read_text())["test"]
    assert json.loads((ce / REPORT_FILE).read_text())["labeller"] == "base"
    assert load_safe(own / "base" / MODEL_FILE)["loss"]["name"] == "ldam"  # f_B is still the LDAM-DRW classifier


def test_the_paper_preset_follows_the_seeds_code():
    """Deviation 4: the final model at train_semi.py's batch of 256 (f_B at train.py's 128), and every row's D_U
    labelled by the CE run's base classifier, which the grid shares."""
    tree = load_preset("semi-supervised", "paper")
    exp = SemiSupervisedExperimentConfig.model_validate(
        {**tree, "base": {**tree["base"], "data": {**tree["base"]["data"], "path": "cifar10-jpg.tar.gz"}}})
    ldam, ce = (exp.run_config(100, "rho", loss, "none", 0) for loss in ("ldam-drw", "ce"))
    assert (ldam.stage("base").optim.batch_size, ldam.stage("final").optim.batch_size) == (128, 256)
    assert ldam.stage("base").optim.lr == ldam.stage("final").optim.lr == 0.1
    assert ldam.pseudo_labels.labeller == "ce" and ldam.stage("labeller") == ce.stage("base")
    ldam_cell = next(cell for cell in exp.cells(Path("out")) if cell.config == ldam)
    assert ldam_cell.labeller_dir == Path("out", "runs", ce.name).parent / "base"
