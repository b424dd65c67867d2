"""Tests of imbssl.eval and ``evaluate_run``: feature extraction, labelled split, linear probe, kNN, metrics, the
feature clusters, runs without labels, a separate labelled set and fine-tuning."""
from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import imbssl
from imbssl.config import ConfigError, DataConfig, LinearEvalConfig
from imbssl.data import load_splits
from imbssl.engine.checkpoint import load_safe
from imbssl.eval import (
    accuracy_report,
    balanced_labelled_split,
    extract_features,
    feature_clusters,
    knn_predict,
    knn_scores,
    linear_probe,
    size_profile,
)
from imbssl.eval.linear import _LinearGrid
from imbssl.pipelines.evaluate import FEATURE_CLUSTER_FIGURE, FINETUNE_DIR, evaluate_run
from imbssl.pipelines.pretrain import BACKBONE_FILE, pretrain
from imbssl.records import EvalRecord

FORMAT_0 = Path(__file__).parent / "data" / "format-0"


def _blobs(n: int, num_classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around fixed class means (the means do not depend on ``seed``)."""
    means = np.random.default_rng(1234).normal(size=(num_classes, dim)) * spread
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    return (means[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


# ---------------------------------------------------------------- features


class _Probe(nn.Module):
    """Backbone that records the input dtype/layout and has dropout, so eval mode is observable."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return self.drop(x.mean(dim=(2, 3)))


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    assert batch.dtype == torch.uint8 and batch.shape[1] == 3
    return batch.float() / 255.0


def test_extract_features_layouts_batches_and_mode(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    memmap = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    memmap[:] = images
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).mean(dim=(2, 3))
    backbone = _Probe().train()
    from_numpy = extract_features(backbone, memmap, _to_float, batch_size=3)
    from_tensor = extract_features(backbone, torch.from_numpy(images).permute(0, 3, 1, 2), _to_float, batch_size=4)
    assert from_numpy.dtype == torch.float32 and from_numpy.shape == (10, 3)
    torch.testing.assert_close(from_numpy, expected)  # dropout off: eval mode was used
    torch.testing.assert_close(from_tensor, expected)
    assert backbone.training  # previous mode restored
    assert backbone.seen == [torch.float32] * 7


# ---------------------------------------------------------------- labelled split


def test_balanced_split_is_balanced_disjoint_and_sorted():
    labels = np.repeat(np.arange(10), [500, 400, 300, 200, 150, 120, 110, 105, 101, 100])
    train, val = balanced_labelled_split(labels, size=1000, val_fraction=0.1, seed=0)
    assert np.bincount(labels[val], minlength=10).tolist() == [10] * 10
    assert np.bincount(labels[train], minlength=10).tolist() == [90] * 10
    assert not np.intersect1d(train, val).size
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()


def test_balanced_split_remainder_cap_and_minimum_val():
    labels = np.repeat(np.arange(4), [50, 50, 50, 3])
    train, val = balanced_labelled_split(labels, size=42, val_fraction=0.1, seed=0)
    chosen = np.bincount(labels[np.concatenate([train, val])], minlength=4)
    assert chosen.tolist() == [11, 11, 10, 3]  # 42 // 4 = 10, remainder 2 to the first classes, class 3 capped
    assert np.bincount(labels[val], minlength=4).tolist() == [1, 1, 1, 1]  # round(0.3) = 0 -> at least 1
    with pytest.raises(ValueError):
        balanced_labelled_split(labels, size=4, val_fraction=0.1, seed=0)


def test_balanced_split_is_seeded():
    labels = np.random.default_rng(0).integers(0, 5, 2000)
    first = balanced_labelled_split(labels, 500, 0.2, seed=3)
    again = balanced_labelled_split(labels, 500, 0.2, seed=3)
    other = balanced_labelled_split(labels, 500, 0.2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


# ---------------------------------------------------------------- linear probe

FAST = LinearEvalConfig(epochs=15, batch_size=64, lrs=[1e-6, 0.1], weight_decays=[0.0, 1e-4])


@pytest.mark.slow
def test_linear_probe_separable_blobs_selects_on_val():
    train_x, train_y = _blobs(1000, 5, 32, spread=1.0, seed=0)
    val_x, val_y = _blobs(300, 5, 32, spread=1.0, seed=1)
    test_x, test_y = _blobs(500, 5, 32, spread=1.0, seed=2)
    # an arbitrary offset and scale: standardisation with train statistics must absorb it
    result = linear_probe(train_x * 50 + 7, train_y, val_x * 50 + 7, val_y, test_x * 50 + 7, 5, FAST, seed=0)
    assert (result.test_pred == test_y).mean() > 0.95
    assert result.val_acc > 95.0
    assert result.best["lr"] == 0.1  # lr 1e-6 cannot move the classifier: val accuracy must rule it out
    assert result.best["wd"] in FAST.weight_decays and 1 <= result.best["epoch"] <= FAST.epochs
    assert result.test_pred.shape == (500,)


@pytest.mark.slow
def test_linear_probe_never_takes_test_labels_and_is_deterministic():
    params = list(inspect.signature(linear_probe).parameters)
    assert params == ["train_x", "train_y", "val_x", "val_y", "test_x", "num_classes", "cfg", "seed", "device"]
    data = [_blobs(200, 3, 8, spread=0.5, seed=s) for s in range(3)]
    args = (data[0][0], data[0][1], data[1][0], data[1][1], data[2][0], 3, FAST)
    first, again = linear_probe(*args, seed=5), linear_probe(*args, seed=5)
    assert np.array_equal(first.test_pred, again.test_pred) and first.best == again.best


def test_linear_probe_grid_equals_best_single_config_run():
    """Every config of the batched grid trains as it would alone, and the grid keeps the best val accuracy."""
    data = [_blobs(400, 4, 16, spread=0.35, seed=s) for s in range(3)]
    args = (data[0][0], data[0][1], data[1][0], data[1][1], data[2][0], 4)
    cfg = LinearEvalConfig(epochs=8, batch_size=50, lrs=[0.01, 0.3], weight_decays=[0.0, 1e-2])
    grid = linear_probe(*args, cfg, seed=0)
    singles = [
        linear_probe(*args, cfg.model_copy(update={"lrs": [lr], "weight_decays": [wd]}), seed=0).val_acc
        for lr in cfg.lrs
        for wd in cfg.weight_decays
    ]
    assert grid.val_acc == pytest.approx(max(singles), abs=100 / 400 + 1e-6)  # within one val image


def test_linear_grid_step_matches_torch_sgd():
    """The hand-written gradient and update equal nn.Linear + cross-entropy + torch.optim.SGD."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    lr, wd, scale = 0.5, 1e-2, 0.7
    grid = _LinearGrid(6, 3, [(lr, wd)], torch.Generator().manual_seed(0), torch.device("cpu"))
    weight, bias = grid.classifier(0)
    ref = nn.Linear(6, 3)
    with torch.no_grad():
        ref.weight.copy_(weight.T)
        ref.bias.copy_(bias)
    opt = torch.optim.SGD(ref.parameters(), lr=lr * scale, momentum=0.9, weight_decay=wd)
    for _ in range(3):
        grid.step(x, F.one_hot(y, 3).float(), scale)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    weight, bias = grid.classifier(0)
    torch.testing.assert_close(weight.T, ref.weight.detach())
    torch.testing.assert_close(bias, ref.bias.detach())


# ---------------------------------------------------------------- kNN


def test_knn_separated_clusters():
    train_x, train_y = _blobs(500, 6, 16, spread=3.0, seed=0)
    test_x, test_y = _blobs(200, 6, 16, spread=3.0, seed=1)
    pred = knn_predict(train_x, train_y, test_x, 6, k=20, chunk=64)
    assert pred.dtype == np.int64 and (pred == test_y).mean() == 1.0


def test_knn_weights_by_hand():
    """Query (1, 0): neighbours at cosine 1 (class 0), 0.5 and 0.5 (class 1), -1 (class 0)."""
    s = math.sqrt(3) / 2
    train_x = np.array([[2.0, 0.0], [0.5, s], [0.5, -s], [-1.0, 0.0]])  # norm of the first is irrelevant
    train_y = np.array([0, 1, 1, 0])
    query = np.array([[3.0, 0.0]])
    # scores are scaled so the nearest neighbour weighs exp(0) = 1: class 0 -> 1, class 1 -> 2 exp(-0.5 / T)
    for temperature in (0.1, 10.0):
        scores = knn_scores(train_x, train_y, query, 2, k=3, temperature=temperature)
        torch.testing.assert_close(scores[0], torch.tensor([1.0, 2 * math.exp(-0.5 / temperature)]))
    assert knn_predict(train_x, train_y, query, 2, k=3, temperature=0.1).tolist() == [0]  # 1 > 2 e^-5
    assert knn_predict(train_x, train_y, query, 2, k=3, temperature=10.0).tolist() == [1]  # 1 < 2 e^-0.05
    # k=4 adds the opposite point to class 0: 1 + exp(-2 / 10) = 1.819 < 2 exp(-0.05) = 1.902
    scores = knn_scores(train_x, train_y, query, 2, k=4, temperature=10.0)
    torch.testing.assert_close(scores[0], torch.tensor([1 + math.exp(-0.2), 2 * math.exp(-0.05)]))
    # a tiny temperature would overflow exp(sim / T) without the per-row scaling
    assert knn_predict(train_x, train_y, query, 2, k=4, temperature=0.001).tolist() == [0]


# ---------------------------------------------------------------- metrics


def _hand_example() -> tuple[np.ndarray, np.ndarray]:
    """Per class (tested, correct): a (4, 3) b (2, 1) c (4, 4) d (5, 1)."""
    target = np.array([0] * 4 + [1] * 2 + [2] * 4 + [3] * 5)
    pred = np.array([0, 0, 0, 1] + [1, 0] + [2, 2, 2, 2] + [3, 0, 1, 2, 0])
    return pred, target


def test_accuracy_report_by_hand():
    pred, target = _hand_example()
    report = accuracy_report(pred, target, np.array([500, 100, 50, 10]), ["a", "b", "c", "d"])
    json.dumps(report)
    assert report["top1"] == pytest.approx(100 * 9 / 15)
    assert report["per_class"] == pytest.approx({"a": 75.0, "b": 50.0, "c": 100.0, "d": 20.0})
    assert report["many"] == pytest.approx(75.0)  # a: 500 > 100
    assert report["medium"] == pytest.approx(75.0)  # b, c: 20 <= count <= 100
    assert report["few"] == pytest.approx(20.0)  # d: 10 < 20
    # 4 classes -> thirds of 2, 1, 1 classes
    assert report["thirds"] == pytest.approx({"major": 62.5, "minor": 100.0, "rare": 20.0})
    mean = (62.5 + 100.0 + 20.0) / 3
    std = math.sqrt(((62.5 - mean) ** 2 + (100.0 - mean) ** 2 + (20.0 - mean) ** 2) / 3)
    assert report["thirds_std"] == pytest.approx(std)
    assert report["groups"] == {
        "many": ["a"], "medium": ["b", "c"], "few": ["d"], "major": ["a", "b"], "minor": ["c"], "rare": ["d"],
    }


def test_accuracy_report_ties_and_empty_groups():
    pred, target = _hand_example()
    report = accuracy_report(pred, target, np.array([150, 300, 300, 150]), ["a", "b", "c", "d"])
    assert report["groups"]["major"] == ["b", "c"]  # tie 300/300 kept in class order
    assert report["groups"]["minor"] == ["a"] and report["groups"]["rare"] == ["d"]
    assert report["medium"] is None and report["few"] is None
    assert report["many"] == pytest.approx(61.25)


# ---------------------------------------------------------------- cluster sizes without labels


def test_size_profile_by_hand():
    profile = size_profile(np.array([5, 500, 0, 50]))
    shares = np.array([500, 50, 5]) / 555
    entropy = -(shares * np.log(shares)).sum()
    assert profile["sorted_sizes"] == [500, 50, 5, 0] and profile["empty"] == 1
    assert profile["imbalance"] == pytest.approx(100.0)  # rho = n_max / n_min over the non-empty groups
    assert profile["effective_number"] == pytest.approx(math.exp(entropy))
    assert profile["normalised_entropy"] == pytest.approx(entropy / math.log(4))
    equal = size_profile(np.full(8, 30))
    assert equal["imbalance"] == 1.0 and equal["effective_number"] == pytest.approx(8.0)
    assert equal["normalised_entropy"] == pytest.approx(1.0)


def test_feature_clusters_find_long_tailed_groups_and_judge_them_by_the_labels():
    """Four well separated directions holding 400, 100, 40 and 10 points: the k-means sizes are the groups' own, and
    with labels the classes sit beside them, clusters and classes the same partition."""
    sizes = [400, 100, 40, 10]
    labels = np.repeat(np.arange(4), sizes)
    features = np.eye(16)[labels * 3] + 0.05 * np.random.default_rng(0).standard_normal((len(labels), 16))
    report = feature_clusters(features, 4, 0, labels, 4)
    assert report["clusters"]["sorted_sizes"] == sizes and report["clusters"]["imbalance"] == pytest.approx(40.0)
    assert report["classes"] == report["clusters"] and report["nmi"] == pytest.approx(1.0) and report["purity"] == 1.0
    unlabelled = feature_clusters(features, 4, 0)
    assert unlabelled["clusters"] == report["clusters"] and "classes" not in unlabelled
    with pytest.raises(ConfigError, match="eval.feature_clusters.k=600: more clusters than the 550"):
        feature_clusters(features, 600, 0)


def test_an_eval_json_from_before_the_feature_clusters_still_loads():
    tree = EvalRecord.read(FORMAT_0 / "eval.json").model_dump(mode="json")
    for key in ("feature_clusters", "finetune", "probes_skipped", "head_tail_counts"):
        del tree[key]
    record = EvalRecord.from_tree(tree, "old eval.json")
    assert record.feature_clusters is None and record.finetune is None and record.probes_skipped is None
    assert record.linear.top1 == tree["linear"]["top1"]


# ---------------------------------------------------------------- evaluate_run: unlabelled runs, labelled_data, fine-tuning


def _tiny_run(tiny_cfg, run_dir, data=None, **eval_section):
    cfg = tiny_cfg(data={"source": "digits", "cache_dir": str(run_dir.parent / "cache"), **(data or {})},
                   optim={"batch_size": 128, "epochs": 2}, eval={"knn_k": [5], **eval_section})
    return pretrain(cfg, run_dir)


@pytest.mark.slow
def test_a_run_without_labels_reports_its_feature_clusters_and_skips_the_probes_in_one_line(tiny_cfg, tmp_path,
                                                                                            caplog):
    labelled = evaluate_run(_tiny_run(tiny_cfg, tmp_path / "labelled"))
    counts = labelled.pretrain_class_counts
    assert labelled.feature_clusters.classes.sorted_sizes == sorted(counts, reverse=True)
    assert labelled.feature_clusters.nmi is not None and labelled.linear is not None

    with caplog.at_level(logging.INFO):
        run = _tiny_run(tiny_cfg, tmp_path / "unlabelled", {"labels": "none"})
        caplog.clear()
        record = evaluate_run(run)
    skipped = [r.getMessage() for r in caplog.records if "probes skipped" in r.getMessage()]
    assert len(skipped) == 1 and "eval.labelled_data" in skipped[0] and "data.labels none" in skipped[0]
    assert record.probes_skipped in skipped[0] and EvalRecord.read(run).probes_skipped == record.probes_skipped
    assert record.linear is None and record.knn == {} and record.pretrain_class_counts is None
    assert record.feature_clusters.classes is None and record.feature_clusters.nmi is None
    # the same weights as the labelled run's (labels never reach training), so the same clusters
    assert record.feature_clusters.clusters == labelled.feature_clusters.clusters
    assert sum(record.feature_clusters.clusters.sorted_sizes) == sum(counts)
    assert (run / FEATURE_CLUSTER_FIGURE).stat().st_size > 0


def _digits_folder(root: Path, size: int | None = None) -> Path:
    """The digits as an ImageFolder tree of PNGs (train/<class>/, test/<class>/), at ``size`` pixels a side."""
    for split, images in load_splits(DataConfig(source="digits")).items():
        for i, (image, label) in enumerate(zip(images.images, images.labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            png = Image.fromarray(image[..., 0])
            (png.resize((size, size)) if size else png).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_the_probes_of_a_run_without_labels_run_on_eval_labelled_data(tiny_cfg, tmp_path):
    folder = _digits_folder(tmp_path / "labelled")
    labelled_data = {"source": "imagefolder", "path": str(folder), "cache_dir": str(tmp_path / "cache")}
    record = evaluate_run(_tiny_run(tiny_cfg, tmp_path / "run", {"labels": "none"}, labelled_data=labelled_data))
    assert record.probes_skipped is None and record.pretrain_class_counts is None
    pool = load_splits(DataConfig(**labelled_data))["train"]
    assert record.labelled_train + record.labelled_val == len(pool.labels)  # its whole train split
    assert record.classes == list(pool.classes) and record.head_tail_counts == pool.class_counts().tolist()
    assert record.linear.top1 > 30 and record.knn[5].top1 > 30  # chance is 10


@pytest.mark.slow
def test_fine_tuning_trains_the_whole_backbone_and_reports_like_the_linear_probe(tiny_cfg, tmp_path):
    finetune = {"enabled": True, "epochs": 4, "lr": 0.05, "augment_pad": 0}
    run = _tiny_run(tiny_cfg, tmp_path / "run", finetune=finetune)
    evaluate_run(run)
    record = EvalRecord.read(run)
    tuned, linear = record.finetune, record.linear
    assert tuned.top1 > 30  # chance is 10
    assert tuned.per_class.keys() == linear.per_class.keys() and tuned.groups == linear.groups
    assert 1 <= tuned.selected["epoch"] <= 4 and tuned.val_top1 > 0
    # the run's precision as its config.yaml records what auto chose (fp32 in the suite: IMBSSL_AUTO_PRECISION)
    assert (tuned.precision.asked, tuned.precision.precision, tuned.precision.channels_last) == ("fp32", "fp32", False)
    pretrained = load_safe(run / BACKBONE_FILE)["backbone"]
    selected = load_safe(run / FINETUNE_DIR / "checkpoints" / "best.pt")
    assert selected["epoch"] == tuned.selected["epoch"]
    fine_tuned = {k.removeprefix("backbone."): v for k, v in selected["model"].items() if k.startswith("backbone.")}
    assert fine_tuned.keys() == pretrained.keys()
    assert any(not torch.equal(fine_tuned[k], pretrained[k]) for k in pretrained if pretrained[k].is_floating_point())


@pytest.mark.slow
def test_a_labelled_set_of_another_size_or_without_labels_is_refused_in_one_line(tiny_cfg, tmp_path):
    run = _tiny_run(tiny_cfg, tmp_path / "run", {"labels": "none"})
    folder = _digits_folder(tmp_path / "large", size=16)
    given = ["--set", "eval.labelled_data.source=imagefolder", "--set", f"eval.labelled_data.path={folder}",
             "--set", f"eval.labelled_data.cache_dir={tmp_path / 'cache'}"]
    for extra, fragment in (([], "eval.labelled_data's images are 16x16, the pre-training images 8x8: set "
                                 "eval.labelled_data.image_size=8"),
                            (["--set", "eval.labelled_data.labels=none"], "eval.labelled_data is the probes' "
                                                                          "labelled set: it needs labels")):
        res = imbssl("evaluate", run, *given, *extra, cwd=tmp_path)
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(errors) == 1 and fragment in errors[0], res.stderr
    assert not (run / "eval.json").exists()
