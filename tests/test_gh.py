"""Geometric Harmonization (methods/gh.py) as the SimCLR family's ``method.gh``: the target, the allocation and the
loss by hand, the schedule of its warm-up, the config section, digits runs of each method with it and a resumed run.
Two processes as one: tests/test_distributed.py ("simclr+gh"). Equality with the authors' code:
tests/reference/test_ref_gh.py."""
import math

import numpy as np
import pytest
import torch

from imbssl.config import ConfigError, build_config
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.runlog import read_metrics
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.methods.gh import (GHSection, GeometricHarmonization, estimated_prior, geometric_uniform_target,
                               gh_loss_per_image, gh_schedules, surrogate_labels)
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain

#: GH on in the second epoch of a short run, at full weight at once; the tiny runs' projections have 32 dimensions
SHORT = {"target_dim": 10, "warm_up": 1, "gh_warm_up": 0, "prior_every": 1}


@pytest.mark.parametrize("k,d", [(10, 16), (16, 16), (100, 128)])
def test_the_target_is_a_simplex_equiangular_tight_frame(k, d):
    """K unit rows at cosine -1/(K-1) to each other, summing to 0, up to K = d directions in d dimensions."""
    target = geometric_uniform_target(k, d, seed=3).double()
    gram = target @ target.T
    expected = torch.full((k, k), -1 / (k - 1), dtype=torch.float64).fill_diagonal_(1)
    assert target.shape == (k, d) and torch.allclose(gram, expected, atol=1e-6)
    assert target.sum(dim=0).abs().max() < 1e-5


def test_the_target_is_drawn_from_its_seed():
    assert torch.equal(geometric_uniform_target(10, 16, 0), geometric_uniform_target(10, 16, 0))
    assert not torch.allclose(geometric_uniform_target(10, 16, 0), geometric_uniform_target(10, 16, 1))
    with pytest.raises(ValueError, match="17 directions drawn in 16 dimensions: the construction needs k <= d"):
        geometric_uniform_target(17, 16, 0)


def test_the_allocation_worked_by_hand():
    """Two images, each on its own direction (scores (1, 0) and (0, 1), epsilon 1), shared out 3/4 : 1/4. A diagonal
    scaling keeps the cross-ratio Q11 Q22 / (Q12 Q21) of P = exp(T)^T, e^2; with Q's rows summing to (3/4, 1/4) and
    its columns to (1/2, 1/2), Q = [[x, 3/4 - x], [1/2 - x, x - 1/4]], so x (x - 1/4) = e^2 (3/4 - x)(1/2 - x):
    (1 - e^2) x^2 + (5 e^2 - 1) x / 4 - 3 e^2 / 8 = 0. Each image's labels are N = 2 times its column."""
    a2 = math.e ** 2
    qa, qb, qc = 1 - a2, (5 * a2 - 1) / 4, -3 * a2 / 8
    x = next(r for r in np.roots([qa, qb, qc]).real if 0.25 < r < 0.5)
    q = surrogate_labels(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([3.0, 1.0]), epsilon=1.0,
                         iterations=300)
    expected = 2 * torch.tensor([[x, 0.5 - x], [0.75 - x, x - 0.25]], dtype=torch.float32)
    assert torch.allclose(q, expected, atol=1e-6)
    assert torch.allclose(q.sum(dim=0), torch.tensor([1.5, 0.5])) and torch.allclose(q.sum(dim=1), torch.ones(2))


def test_without_a_preference_every_image_gets_the_prior():
    """Equal scores: exp(T / epsilon) is constant, and the allocation is the prior itself for every image."""
    q = surrogate_labels(torch.zeros(5, 4), torch.tensor([4.0, 3.0, 2.0, 1.0]), epsilon=0.05, iterations=10)
    assert torch.allclose(q, torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(5, 4), atol=1e-6)


def test_the_loss_worked_by_hand():
    """Both views on direction 0 and allocated to it: each term is -log softmax((1, 0) / 0.1)_0 = log(1 + e^-10)."""
    t, q = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert gh_loss_per_image(t, t, q, q, 0.1).item() == pytest.approx(2 * math.log1p(math.exp(-10)), rel=1e-5)
    # the other view allocated to direction 1 instead: its term is -log softmax(...)_1 = 10 + log(1 + e^-10)
    other = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert gh_loss_per_image(t, t, other, q, 0.1).item() == pytest.approx(10 + 2 * math.log1p(math.exp(-10)),
                                                                          rel=1e-5)


def test_the_memory_and_the_prior():
    """m <- beta m + (1 - beta) t1 for the step's images; pi counts each image's direction of largest m."""
    gh = GeometricHarmonization(GHSection(target_dim=3), proj_dim=4)
    gh.reset(4)
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    gh.remember(torch.arange(4), z, momentum=0.0, estimate=False)
    first = gh.memory.clone()
    assert torch.allclose(first.norm(dim=1), torch.ones(4)) and gh.prior.sum() == 0
    gh.remember(torch.tensor([2, 0]), z[:2], momentum=0.9, estimate=True)
    assert torch.equal(gh.memory[[1, 3]], first[[1, 3]])
    assert torch.allclose(gh.memory[2], 0.9 * first[2] + 0.1 * first[0])
    assert torch.equal(gh.prior, estimated_prior(gh.memory))
    assert torch.equal(estimated_prior(torch.tensor([[0.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])),
                       torch.tensor([1 / 3, 2 / 3, 0.0]))


def test_gh_runs_in_float32_under_bf16_autocast():
    """The scores, the allocation and L_GH in float32 whatever the step's precision: the same numbers as without
    autocast."""
    gh = GeometricHarmonization(GHSection(target_dim=4), proj_dim=8)
    gh.prior = torch.tensor([0.4, 0.3, 0.2, 0.1])
    z1, z2 = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = gh(z1, z2)
    assert under_bf16.dtype == torch.float32 and torch.equal(under_bf16, gh(z1, z2))


def test_the_schedule_of_the_warm_up():
    """warm_up 3, GH_warm_up 2, pi every 2 epochs, 6 epochs of 2 steps: w = (e + 1 - 3) / 2 up to 1 after the
    warm-up; the memory's momentum 0 (it takes the scores), 0.9, then beta; pi after each step of the warm-up's last
    epoch and of every second epoch after it."""
    values = gh_schedules(GHSection(warm_up=3, gh_warm_up=2, prior_every=2), total_steps=12, steps_per_epoch=2)
    per_epoch = {name: v[::2].tolist() for name, v in values.items()}
    assert np.array_equal(values["gh_weight"][::2], values["gh_weight"][1::2])
    assert per_epoch == {"gh_weight": [0, 0, 0, 0.5, 1, 1], "gh_momentum": [0, 0.9, 0.9, 0.999, 0.999, 0.999],
                         "gh_estimate": [0, 0, 1, 1, 0, 1]}
    assert gh_schedules(GHSection(warm_up=1, gh_warm_up=0), 4, 2)["gh_weight"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="method.gh.warm_up 6 leaves GH no epoch of a run of 6: set it lower"):
        gh_schedules(GHSection(warm_up=6), total_steps=12, steps_per_epoch=2)


@pytest.mark.parametrize("method,problem", [
    ({"name": "simclr", "proj_dim": 64, "gh": {}},
     "method: gh.target_dim 100 exceeds proj_dim 64: GH's target draws its directions in the projection's "
     "dimensions"),
    ({"name": "sdclr", "gh": {"warm_up": 0}}, "method.gh.warm_up: Input should be greater than or equal to 1"),
    ({"name": "bcl-d", "gh": {"beta": 1}}, "method.gh.beta: Input should be less than 1"),
    ({"name": "focal", "gh": {"epsilon": 0}}, "method.gh.epsilon: Input should be greater than 0"),
    ({"name": "simclr", "gh": {"warmup": 5}}, "unknown config key 'method.gh.warmup'"),
    ({"name": "simsiam", "gh": {}}, "method.gh is not a key of simsiam's section"),
])
def test_config_section_refuses_bad_values_in_one_line(method, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")) as err:
        build_config({"method": method})
    assert "\n" not in str(err.value)


def test_the_family_takes_gh_and_it_is_off_by_default():
    for name in ("simclr", "focal", "sdclr", "bcl-i", "bcl-d"):
        assert build_config({"method": {"name": name}}).method.gh is None
        assert build_config({"method": {"name": name, "gh": {}}}).method.gh == GHSection()


def epochs_of(run) -> list[dict]:
    return [r for r in read_metrics(run) if "epoch/loss" in r]


#: digits-LT at rho = 10: 503 images, 4 steps of 128 an epoch
LT10 = {"subset": {"profile": "exp", "imbalance": 10}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "focal", "sdclr", "bcl-i", "bcl-d"])
def test_a_digits_run_with_gh_adds_it_after_the_warm_up(tiny_cfg, tmp_path, name):
    """2 epochs, GH in the second: the first logs the contrastive loss alone, the second L = L_contrastive + L_GH
    with both terms; the checkpoint holds every image's momentum scores and pi, which sums to 1."""
    run = pretrain(tiny_cfg(method={"name": name, "gh": SHORT}, data=LT10, optim={"epochs": 2}), tmp_path / "run")
    first, second = epochs_of(run)
    assert "epoch/gh" not in first and second["epoch/gh"] > 0
    assert second["epoch/loss"] == pytest.approx(second["epoch/contrastive"] + second["epoch/gh"], rel=1e-5)
    state = load_safe(run / CHECKPOINT_FILE)["method"]
    norms = state["gh.memory"].norm(dim=1)  # unit scores, averaged: inside the sphere, close to it
    assert state["gh.memory"].shape == (second["epoch/images_seen"], 10)
    assert 0.99 < norms.min() and norms.max() < 1 + 1e-6
    assert state["gh.prior"].sum().item() == pytest.approx(1) and (state["gh.prior"] > 0).sum() > 1


@pytest.mark.slow
def test_simclr_with_gh_learns_digits(tiny_cfg, tmp_path):
    """6 epochs, GH from the fourth: its term falls while it trains, and the probes read digits (chance: 10%)."""
    cfg = tiny_cfg(method={"name": "simclr", "head": "bcl", "gh": {**SHORT, "warm_up": 3}}, data=LT10,
                   optim={"batch_size": 64, "epochs": 6}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    gh = [epoch["epoch/gh"] for epoch in epochs_of(run) if "epoch/gh" in epoch]
    assert len(gh) == 3 and gh[-1] < gh[0]
    result = evaluate_run(run)
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50


@pytest.mark.slow
def test_gh_state_survives_resume(tiny_cfg, interrupted_then_resumed):
    """The memory and pi are in the checkpoint: a run crashed after epoch 2 (pi estimated in epoch 2) and resumed
    for the third, GH's first, ends with the weights, memory and pi of a run trained straight through."""
    cfg = tiny_cfg(method={"name": "sdclr", "gh": {**SHORT, "warm_up": 2, "prior_every": 20}}, data=LT10,
                   optim={"epochs": 3})
    straight, resumed = interrupted_then_resumed(cfg)
    a, b = load_safe(straight / CHECKPOINT_FILE)["method"], load_safe(resumed / CHECKPOINT_FILE)["method"]
    assert a["gh.prior"].sum().item() == pytest.approx(1)
    for key in a:
        assert torch.equal(a[key], b[key]), key
