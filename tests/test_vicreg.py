"""VICReg (methods/vicreg.py, Bardes et al. 2022): its three terms by hand, its config section, a digits run that
learns. Two processes train as one: tests/test_distributed.py. Equality with the authors' code and lightly's loss:
tests/reference/test_ref_vicreg.py."""
import math

import pytest
import torch

from imbssl.config import ConfigError, ModelConfig, build_config
from imbssl.methods import build_method
from imbssl.methods.vicreg import STD_EPS, VICRegConfig, covariance_loss, variance_loss, vicreg_loss
from imbssl.models import build_backbone
from test_barlow_twins import digits_run

#: four images, two components of mean 0 and unbiased variance 4/3 along the batch, uncorrelated with each other
X = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def test_loss_is_the_papers_on_a_batch_worked_by_hand():
    """Y = X / 2: the mean squared difference is (1/2)^2; X's stds, sqrt(4/3 + eps), clear the hinge at 1 and Y's,
    sqrt(1/3 + eps), do not; neither has covariance between its components."""
    y = X / 2
    loss, invariance, variance, covariance = vicreg_loss(X, y, sim_coeff=25.0, std_coeff=10.0, cov_coeff=3.0)
    assert invariance.item() == pytest.approx(0.25, rel=1e-6)
    assert variance.item() == pytest.approx((0 + (1 - math.sqrt(1 / 3 + STD_EPS))) / 2, rel=1e-6)
    assert covariance.item() == pytest.approx(0, abs=1e-12)
    assert loss.item() == pytest.approx(25 * 0.25 + 10 * variance.item(), rel=1e-6)


def test_the_covariance_term_counts_each_off_diagonal_pair_over_d():
    """Two equal components of unbiased variance 4/3: C = [[4/3, 4/3], [4/3, 4/3]], c = 2 (4/3)^2 / 2."""
    equal = X[:, [0, 0]]
    assert covariance_loss(equal).item() == pytest.approx((4 / 3) ** 2, rel=1e-6)
    assert covariance_loss(equal + torch.tensor([5.0, -2.0])).item() == pytest.approx((4 / 3) ** 2, rel=1e-6)


def test_collapse_maximises_the_variance_term():
    """Every image on one point: each std is sqrt(eps), the hinge 1 - sqrt(eps) on every component."""
    same = torch.tensor([[0.3, -2.0, 5.0]]).repeat(6, 1)
    assert variance_loss(same).item() == pytest.approx(1 - math.sqrt(STD_EPS), rel=1e-6)
    assert covariance_loss(same).item() == 0


@pytest.mark.parametrize("section,problem", [
    ({"mlp": "8192-x"}, "method.mlp: '8192-x' is not layer widths joined by '-', such as '8192-8192-8192'"),
    ({"sim_coeff": -1}, "method.sim_coeff: Input should be greater than or equal to 0"),
    ({"sim_coeff": 0, "std_coeff": 0, "cov_coeff": 0},
     "sim_coeff, std_coeff and cov_coeff are all 0: the loss would be constant"),
    ({"lambd": 0.0051}, "method.lambd is not a key of vicreg's section"),
])
def test_config_section_refuses_bad_values_in_one_line(section, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        build_config({"method": {"name": "vicreg", **section}})
    assert "\n" not in str(err.value)


def test_the_expander_follows_its_flag():
    """--mlp 32-16-8: Linear-BN-ReLU to 32 and to 16, the Linears with a bias, then a Linear to 8 without; proj_dim
    is 8."""
    cfg = VICRegConfig(mlp="32-16-8")
    method = build_method(cfg, build_backbone(ModelConfig(backbone="small_cnn", width=0.25), 3))
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == [(64, 32, True), (32, 16, True),
                                                                                       (16, 8, False)]
    assert cfg.proj_dim == method.output_dim == 8


@pytest.mark.slow
def test_a_digits_run_learns_without_collapse(tiny_cfg, tmp_path):
    # with a 64-64-64 expander the loss falls from about 21.6 to 20.0, most of it the variance hinge's (25 x 0.72 ->
    # 25 x 0.66); collapse_ratio stays near 0.75 (0 is collapse); the probes read digits at ~76% (linear) and ~73%
    # (k-NN)
    first, last, result = digits_run(tiny_cfg, tmp_path, {"name": "vicreg", "mlp": "64-64-64"})
    assert last["epoch/loss"] < 0.95 * first["epoch/loss"]
    assert last["epoch/variance"] < first["epoch/variance"]
    assert last["epoch/collapse_ratio"] > 0.5
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50  # chance: 10
