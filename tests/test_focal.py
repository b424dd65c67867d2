"""Focal (methods/focal.py): its loss worked by hand, its config section and a digits run that learns. Two processes as
one: tests/test_distributed.py. Equality with GH's code: tests/reference/test_ref_focal.py."""
import math

import pytest
import torch

from imbssl.config import ConfigError, build_config
from imbssl.engine.runlog import read_metrics
from imbssl.methods.focal import focal_nt_xent_per_image
from imbssl.methods.simclr import nt_xent_per_view
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain


def focal(p: float, gamma: float) -> float:
    return -(1 - p) ** gamma * math.log(p)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_loss_is_the_focal_form_on_a_batch_worked_by_hand(gamma):
    """Views a0 = b0 = b1 = (1, 0), a1 = (0, 1), tau 1: each view's positive among its partner and two negatives.
    a0 and b0 see their partner at cos 1 and one negative at cos 1: p = e / (2e + 1); a1 sees every other at cos 0:
    p = 1/3; b1 its partner at cos 0, both negatives at cos 1: p = 1 / (2e + 1). Each image averages its two views."""
    e = math.e
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = [focal(e / (2 * e + 1), gamma), (focal(1 / 3, gamma) + focal(1 / (2 * e + 1), gamma)) / 2]
    assert focal_nt_xent_per_image(z1, z2, 1.0, gamma).tolist() == pytest.approx(expected, rel=1e-6)


def test_each_view_is_its_nt_xent_times_the_focal_weight():
    """A view's loss is its NT-Xent l times (1 - p)^gamma, p = e^-l the probability of its positive: below NT-Xent
    for every image."""
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    nt_xent, focal_loss = nt_xent_per_view(z1, z2, 0.5), focal_nt_xent_per_image(z1, z2, 0.5, 3.0)
    assert torch.allclose(focal_loss, (nt_xent * (1 - torch.exp(-nt_xent)) ** 3).mean(dim=0))
    assert (focal_loss < nt_xent.mean(dim=0)).all()


@pytest.mark.parametrize("section,problem", [
    ({"gamma": 0}, "method.gamma: Input should be greater than 0"),
    ({"temperature": -1}, "method.temperature: Input should be greater than 0"),
    ({"head": "mlp"}, "method.head: Input should be 'simclr' or 'bcl'"),
    ({"prune_ratio": 0.9}, "method.prune_ratio is not a key of focal's section"),
])
def test_config_section_refuses_bad_values_in_one_line(section, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        build_config({"method": {"name": "focal", **section}})
    assert "\n" not in str(err.value)


def test_the_section_is_their_runs():
    """tau 0.2 and gamma 2 (GH's train_cifar.py and focal_nt_xent), BCL's head, GH off."""
    cfg = build_config({"method": {"name": "focal"}}).method
    assert (cfg.temperature, cfg.gamma, cfg.head, cfg.gh) == (0.2, 2.0, "bcl", None)


@pytest.mark.slow
def test_a_digits_run_learns_without_collapse(tiny_cfg, tmp_path):
    # 3 epochs on digits: the loss falls (about 5.6 to 4.6), the outputs stay spread (collapse_ratio near 1, 0 is
    # collapse), and the probes read digits (chance: 10%)
    cfg = tiny_cfg(method={"name": "focal"}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    first, *_, last = [r for r in read_metrics(run) if "epoch/loss" in r]
    assert last["epoch/loss"] < first["epoch/loss"] - 0.5 and last["epoch/collapse_ratio"] > 0.5
    result = evaluate_run(run)
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50
