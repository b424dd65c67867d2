"""Barlow Twins (methods/barlow_twins.py, Zbontar et al. 2021): its loss by hand, its config section, the biases' own
lr, a digits run that learns. Two processes train as one: tests/test_distributed.py. Equality with the authors' code
and lightly's loss: tests/reference/test_ref_barlow_twins.py."""
import pytest
import torch

from imbssl.config import ConfigError, ModelConfig, OptimConfig, build_config
from imbssl.engine.optim import build_optimizer
from imbssl.engine.runlog import read_metrics
from imbssl.engine.schedules import Schedules, cosine_schedule
from imbssl.methods import build_method
from imbssl.methods.barlow_twins import BN_EPS, BarlowTwinsConfig, barlow_twins_loss
from imbssl.models import build_backbone
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain
from imbssl.records import EvalRecord

#: four images, two components of mean 0 and biased variance 1 along the batch, uncorrelated with each other
Z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
#: the standardisation's eps shrinks every entry of C by this factor
SHRINK = 1 / (1 + BN_EPS)


def test_loss_is_the_papers_on_a_batch_worked_by_hand():
    """The second view's two components are both the first view's first: C = [[1, 1], [0, 0]] (times SHRINK), so
    the invariance term is (1 - C_00)^2 + (1 - C_11)^2 = (1 - s)^2 + 1 and the redundancy reduction term C_01^2."""
    z2 = Z[:, [0, 0]]
    loss, invariance, redundancy_reduction = barlow_twins_loss(Z, z2, lambd=0.5)
    assert invariance.item() == pytest.approx((1 - SHRINK) ** 2 + 1, rel=1e-6)
    assert redundancy_reduction.item() == pytest.approx(SHRINK ** 2, rel=1e-6)
    assert loss.item() == pytest.approx(invariance.item() + 0.5 * redundancy_reduction.item(), rel=1e-6)


def test_invariant_decorrelated_embeddings_reach_the_minimum_whatever_their_scale():
    """Equal views with uncorrelated components: C is the identity (but for the eps) and L_BT ~ 0; the
    standardisation along the batch makes it so at any scale and offset of each component."""
    for z1, z2 in [(Z, Z), (Z * torch.tensor([3.0, 0.5]) + 7, Z)]:
        loss, invariance, redundancy_reduction = barlow_twins_loss(z1, z2, lambd=0.0051)
        assert invariance.item() < 1e-8 and redundancy_reduction.item() < 1e-8 and loss.item() < 1e-8


def test_collapse_maximises_the_invariance_term():
    """Every image on one point: each component standardises to 0, C = 0 and the invariance term is d."""
    same = torch.tensor([[0.3, -2.0, 5.0]]).repeat(6, 1)
    _, invariance, redundancy_reduction = barlow_twins_loss(same, same, lambd=0.0051)
    assert invariance.item() == pytest.approx(3, rel=1e-6) and redundancy_reduction.item() < 1e-12


@pytest.mark.parametrize("section,problem", [
    ({"projector": "8192-"}, "method.projector: '8192-' is not layer widths joined by '-', such as '8192-8192-8192'"),
    ({"projector": "0-64"}, "method.projector: '0-64' is not layer widths joined by '-'"),
    ({"lambd": -0.1}, "method.lambd: Input should be greater than or equal to 0"),
    ({"learning_rate_biases": 0}, "method.learning_rate_biases: Input should be greater than 0"),
    ({"temperature": 0.2}, "method.temperature is not a key of barlow-twins's section"),
])
def test_config_section_refuses_bad_values_in_one_line(section, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        build_config({"method": {"name": "barlow-twins", **section}})
    assert "\n" not in str(err.value)


def test_the_projector_follows_its_flag():
    """--projector 32-16-8: Linear-BN-ReLU to 32 and to 16, then a Linear to 8, none with a bias; proj_dim is 8."""
    cfg = BarlowTwinsConfig(projector="32-16-8")
    method = build_method(cfg, build_backbone(ModelConfig(backbone="small_cnn", width=0.25), 3))
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(64, 32, None), (32, 16, None),
                                                                           (16, 8, None)]
    assert cfg.proj_dim == method.output_dim == 8


@pytest.mark.parametrize("optim", [{}, {"name": "sgd", "base_lr": 0.4}])
def test_biases_and_batchnorm_parameters_follow_the_schedule_at_their_own_lr(optim):
    """main.py's two groups: the weights at optim.base_lr (--learning-rate-weights), the 1-d parameters at
    learning_rate_biases (--learning-rate-biases), both per 256 images, both on the run's schedule; their flags are
    independent, so a base_lr of the run's own leaves the biases' lr as it was."""
    method = build_method(BarlowTwinsConfig(projector="16-16"),
                          build_backbone(ModelConfig(backbone="small_cnn", width=0.25), 3))
    cfg = OptimConfig(batch_size=128, **optim)
    optimizer = build_optimizer(method, cfg, method.defaults, cfg.batch_size)
    weights, biases = optimizer.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    shape = cosine_schedule(1.0, 0.0, 20, warmup_steps=5)
    schedules = Schedules(method, optimizer, {"lr": weights["lr"] * shape}, 20, 4)
    for step in (0, 7, 19):
        schedules.apply(step)
        assert weights["lr"] == pytest.approx(optim.get("base_lr", 0.2) * 128 / 256 * shape[step], rel=1e-12)
        assert biases["lr"] == pytest.approx(0.0048 * 128 / 256 * shape[step], rel=1e-12)


def digits_run(tiny_cfg, tmp_path, method: dict) -> tuple[dict, dict, EvalRecord]:
    """The first and last epochs' figures and the probes of a 3-epoch run (14 steps an epoch) of ``method`` on digits,
    LARS at lr 2 (base_lr 4; their batch of 2048 runs at 1.6): its steps are 1e-3 of each weight's norm times the lr,
    which at the default base_lr (lr 0.1 here) barely move in 42 steps."""
    run = pretrain(tiny_cfg(method=method, optim={"base_lr": 4.0}, eval={"knn_k": [5]}), tmp_path / "run")
    first, *_, last = [r for r in read_metrics(run) if "epoch/loss" in r]
    return first, last, evaluate_run(run)


@pytest.mark.slow
def test_a_digits_run_learns_without_collapse(tiny_cfg, tmp_path):
    # with a 64-64-64 projector the loss falls from about 54 to 28, its invariance term with it; collapse_ratio, the
    # std of the normalised outputs times sqrt(d), stays near 0.8 (0 is collapse); the probes read digits at ~85%
    # (linear) and ~83% (k-NN)
    first, last, result = digits_run(tiny_cfg, tmp_path, {"name": "barlow-twins", "projector": "64-64-64"})
    assert last["epoch/loss"] < 0.8 * first["epoch/loss"]
    assert last["epoch/invariance"] < first["epoch/invariance"]
    assert last["epoch/collapse_ratio"] > 0.5
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50  # chance: 10
