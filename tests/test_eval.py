"""Tests of imbssl.eval: feature extraction, labelled split, linear probe, kNN and metrics."""
from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imbssl.config import LinearEvalConfig
from imbssl.eval import (
    accuracy_report,
    balanced_labelled_split,
    extract_features,
    knn_predict,
    knn_scores,
    linear_probe,
)
from imbssl.eval.linear import _LinearGrid


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
