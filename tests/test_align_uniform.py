"""Align-Uniform (methods/align_uniform.py, Wang & Isola 2020): its losses by hand, its config section, a digits run
that learns, and two processes that train as one. Equality with the authors' code: tests/reference/."""
import math

import pytest
import torch

from imbssl.config import ConfigError, build_config
from imbssl.engine.runlog import read_metrics
from imbssl.methods.align_uniform import align_uniform_loss
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain
from test_distributed import _pretrain, final_state, run_processes, step_losses

#: three pairs on the unit circle: x_1 = (1, 0) is 90 degrees from its partner, the other two pairs coincide
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
Y = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_loss_is_the_papers_on_a_batch_worked_by_hand(alpha):
    """||x_1 - y_1||^2 = 2, the others 0; x's squared pair distances are 2, 4, 2 and y's 0, 2, 2."""
    loss, align, uniform = align_uniform_loss(X, Y, align_w=0.5, unif_w=3.0, alpha=alpha, t=2.0)
    assert align.item() == pytest.approx(math.sqrt(2) ** alpha / 3, rel=1e-6)
    uniform_x = math.log((2 * math.exp(-2 * 2) + math.exp(-2 * 4)) / 3)
    uniform_y = math.log((math.exp(0) + 2 * math.exp(-2 * 2)) / 3)
    assert uniform.item() == pytest.approx((uniform_x + uniform_y) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * align.item() + 3.0 * uniform.item(), rel=1e-6)


def test_collapse_maximises_the_uniformity_loss():
    """Every image on one point: L_uniform = log 1 = 0, its largest value; L_align = 0."""
    same = torch.tensor([[0.6, 0.8]]).repeat(4, 1)
    _, align, uniform = align_uniform_loss(same, same, 1.0, 1.0, 2.0, 2.0)
    assert align.item() == 0 and uniform.item() == 0


@pytest.mark.parametrize("section,problem", [
    ({"unif_t": 0}, "method.unif_t: Input should be greater than 0"),
    ({"align_alpha": -1}, "method.align_alpha: Input should be greater than 0"),
    ({"align_w": 0, "unif_w": 0}, "align_w and unif_w are both 0: the loss would be constant"),
    ({"temperature": 0.2}, "method.temperature is not a key of align-uniform's section"),
])
def test_config_section_refuses_bad_values_in_one_line(section, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        build_config({"method": {"name": "align-uniform", **section}})
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_digits_run_learns_without_collapse(tiny_cfg, tmp_path):
    # 3 epochs of 14 steps on CPU: the loss falls from about -1.5 to -2.0, both terms with it; collapse_ratio, the
    # std of the normalised outputs times sqrt(d), stays near 1 (0 is collapse); the probes read digits at ~88%
    cfg = tiny_cfg(method={"name": "align-uniform"}, eval={"knn_k": [5]})
    run = pretrain(cfg, tmp_path / "run")
    first, *_, last = [r for r in read_metrics(run) if "epoch/loss" in r]
    assert last["epoch/loss"] < first["epoch/loss"] - 0.2
    assert last["epoch/align"] < first["epoch/align"] and last["epoch/uniform"] < first["epoch/uniform"]
    assert last["epoch/collapse_ratio"] > 0.5
    result = evaluate_run(run)
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50  # chance: 10


@pytest.mark.slow
def test_two_processes_train_exactly_as_one(tiny_cfg, tmp_path):
    """L_uniform pairs every image of the global batch with every other: each process gathers the global batch's
    features, so the losses and the final weights are the one-process run's (batches of 84 or 83 images, the last
    split 42 + 41)."""
    cfg = tiny_cfg(data={"subset": {"profile": "exp", "imbalance": 10}}, method={"name": "align-uniform"},
                   optim={"batch_size": 100, "epochs": 2}, train={"log_every": 1, "sync_batchnorm": True})
    one, two = tmp_path / "one", tmp_path / "two"
    run_processes(_pretrain, cfg, one, world=1)
    run_processes(_pretrain, cfg, two)
    losses = step_losses(one)
    assert len(losses) == 12 and losses.std() > 1e-3
    assert torch.allclose(step_losses(two), losses, rtol=0, atol=1e-5)
    final = final_state(two)
    for key, value in final_state(one).items():
        assert torch.allclose(final[key].double(), value.double(), rtol=0, atol=1e-4), key
