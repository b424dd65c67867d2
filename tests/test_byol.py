"""BYOL (methods/byol.py, Grill et al. 2020): its loss by hand, its config section, the target network that moves by
EMA alone, and a digits run that learns. Equality with the authors' code and lightly's: tests/reference/."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imbssl.config import ConfigError, ModelConfig, build_config
from imbssl.engine.runlog import read_metrics
from imbssl.methods.byol import BYOL, BYOLConfig, byol_loss, regression_loss
from imbssl.models import build_backbone
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain


def test_loss_is_the_papers_on_a_batch_worked_by_hand():
    """Two images in 2-d. Image 1: p1 = (1, 0) is 90 degrees from z2' = (0, 2), 2 - 2 cos = 2; p2 = (3, 0) points as
    z1' = (1, 0), 0. Image 2: p1 = (1, 1) opposes z2' = (-1, -1), 4; p2 = (0, 1) is 45 degrees from z1' = (1, 1),
    2 - sqrt 2. L^BYOL is the mean over the images of each one's two terms."""
    p1, p2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    z1, z2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [-1.0, -1.0]])
    assert regression_loss(p1, z2).tolist() == pytest.approx([2.0, 4.0], abs=1e-6)
    assert regression_loss(p2, z1).tolist() == pytest.approx([0.0, 2 - math.sqrt(2)], abs=1e-6)
    assert byol_loss(p1, p2, z1, z2).item() == pytest.approx((2 + 0 + 4 + 2 - math.sqrt(2)) / 2, rel=1e-6)


def test_regression_loss_is_two_minus_twice_the_cosine_whatever_the_norms():
    gen = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    expected = 2 - 2 * F.cosine_similarity(p, z, dim=1)
    assert torch.allclose(regression_loss(p, z), expected, atol=1e-6)
    assert torch.allclose(regression_loss(3 * p, 0.5 * z), expected, atol=1e-6)


def test_no_gradient_reaches_the_targets_projections():
    p1, p2, z1, z2 = (torch.randn(4, 3, requires_grad=True) for _ in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


@pytest.mark.parametrize("section,problem", [
    ({"base_target_ema": 1.5}, "method.base_target_ema: Input should be less than or equal to 1"),
    ({"proj_dim": 0}, "method.proj_dim: Input should be greater than or equal to 1"),
    ({"pred_hidden": 0}, "method.pred_hidden: Input should be greater than or equal to 1"),
    ({"temperature": 0.2}, "method.temperature is not a key of byol's section"),
])
def test_config_section_refuses_bad_values_in_one_line(section, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        build_config({"method": {"name": "byol", **section}})
    assert "\n" not in str(err.value)


def tiny_byol(**section) -> BYOL:
    backbone = build_backbone(ModelConfig(backbone="small_cnn", width=0.25), 3)
    return BYOL(backbone, BYOLConfig(proj_hidden=32, proj_dim=16, pred_hidden=32, **section))


def test_tau_rises_from_its_base_to_one_on_a_cosine():
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (Sec. 3.3): tau_base at the first step, halfway to 1 at
    the middle one, one step short of 1 at the last."""
    tau = tiny_byol(base_target_ema=0.99).schedules(100, 10)["target_ema"]
    assert tau[0] == pytest.approx(0.99, abs=1e-15) and tau[50] == pytest.approx(0.995, abs=1e-15)
    assert np.all(np.diff(tau) > 0) and 1 - tau[-1] == pytest.approx(0.01 * (1 - math.cos(math.pi / 100)) / 2)


def test_the_target_moves_by_ema_alone():
    """The optimizer holds no target weight and the step leaves them as they were; ``on_step_end`` then moves them
    to tau xi + (1 - tau) theta of the online network's new weights (Eq. 1). The target's BatchNorm keeps its own
    running statistics, from its own forwards in training mode."""
    method = tiny_byol().train()
    with torch.no_grad():  # a target apart from the online network, so that the EMA shows
        for weight in method.target.parameters():
            weight.add_(torch.randn_like(weight))
    optimizer = torch.optim.SGD(method.param_groups(), lr=0.1)
    target_ids = {id(p) for p in method.target.parameters()}
    assert not target_ids & {id(p) for group in optimizer.param_groups for p in group["params"]}
    target_before = {n: p.clone() for n, p in method.target.named_parameters()}
    running_before = method.target.backbone.body[1].running_mean.clone()
    views = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    optimizer.zero_grad()
    method.training_step(views, torch.arange(6)).loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    optimizer.step()
    assert all(torch.equal(p, target_before[n]) for n, p in method.target.named_parameters())
    assert not torch.equal(method.target.backbone.body[1].running_mean, running_before)
    method.target_ema = 0.75
    method.on_step_end()
    online = dict(method.named_parameters())
    for name, weight in method.target.named_parameters():
        expected = 0.75 * target_before[name] + 0.25 * online[name]
        assert torch.allclose(weight, expected, rtol=0, atol=1e-6), name


@pytest.mark.slow
def test_a_digits_run_learns_without_collapse(tiny_cfg, tmp_path):
    # 3 epochs of 14 steps on CPU at the method's LARS defaults, tau_base 0.99 for so short a run: the loss falls from
    # near 4 (unrelated projections), collapse_ratio (std of the normalised projections times sqrt(d)) stays well
    # above 0, and the probes read digits far above chance (10%)
    cfg = tiny_cfg(method={"name": "byol", "base_target_ema": 0.99}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    first, *_, last = [r for r in read_metrics(run) if "epoch/loss" in r]
    assert last["epoch/loss"] < first["epoch/loss"] - 0.2
    assert last["epoch/collapse_ratio"] > 0.3
    result = evaluate_run(run)
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50
