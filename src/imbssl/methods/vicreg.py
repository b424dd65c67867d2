"""VICReg (Bardes et al., ICLR 2022): Variance-Invariance-Covariance Regularisation of the two views' embeddings
Z, Z' (the expander's outputs, n rows of d components).

    v(Z)     = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + eps))      the hinge on each component's std      (Eq. 1, 2)
    c(Z)     = 1/d sum_{i != j} C(Z)_ij^2,  C(Z) = 1/(n - 1) sum_i (z_i - zbar)(z_i - zbar)^T           (Eq. 3, 4)
    s(Z, Z') = 1/n sum_i ||z_i - z'_i||^2                                                              (Eq. 5)
    l(Z, Z') = lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]                                 (Eq. 6)

in the form of the authors' code (facebookresearch/vicreg at 4e12602, main_vicreg.py ``VICReg.forward``), for which
its coefficients were tuned: the invariance term is the mean squared error over the n d elements (s / d), and the two
views' variance terms are averaged, (v(Z) + v(Z')) / 2. Its defaults (main_vicreg.py's argparse): lambda = mu = 25,
nu = 1 (--sim-coeff, --std-coeff, --cov-coeff), eps = 1e-4; the expander 8192-8192-8192 (--mlp: Linear-BN-ReLU to
each width but the last, the Linears with a bias, then a Linear without); LARS, which leaves biases and BatchNorm
parameters out of its weight decay and adaptation (``exclude_bias_and_norm``), at lr 0.2 per 256 images (--base-lr) on
one schedule (their ``adjust_learning_rate``: 10 warm-up epochs, then a cosine; optim.warmup_epochs), weight decay 1e-6
(--wd).

The two views go through the network one after the other, as in their forward, so that each BatchNorm normalises
one view's batch.

Several processes: the variance and covariance terms are statistics of the global batch, so every process gathers
the global batch's embeddings (with their gradient) and computes the whole loss, as their ``FullGatherLayer`` does
(whose backward sums the processes' gradients); the invariance term, a mean over images, is then the global batch's
too, where theirs is each process's own, averaged by DDP (the same for equal parts).

Also different from their code: C(Z) divides by the batch's own size less 1, theirs by --batch-size less 1 (the
same for a full batch); the loss is computed in float32 under bf16 (theirs under fp16 autocast); the lr schedule is
imbssl's cosine, whose warm-up step s runs at (s + 1) / W of the peak (theirs at s / W) and whose end is 0 (theirs
1/1000 of the peak), two differences that tests/reference/test_ref_vicreg.py tests.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from imbssl.configbase import MethodSection
from imbssl.engine.distributed import gather_with_grad
from imbssl.methods.barlow_twins import WidthsSpec, off_diagonal, widths
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std
from imbssl.models.heads import mlp_of_widths

#: eps of the std, sqrt(Var + eps), in the variance term (main_vicreg.py)
STD_EPS = 1e-4


def invariance_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s(Z, Z') / d: the mean squared difference of the [n, d] embeddings of the two views (Eq. 5 as their
    ``F.mse_loss``)."""
    return F.mse_loss(x, y)


def variance_loss(x: torch.Tensor) -> torch.Tensor:
    """v(Z) = mean_j max(0, 1 - sqrt(Var(z^j) + eps)) over the d components of [n, d] embeddings (Eq. 1, 2)."""
    return F.relu(1 - torch.sqrt(x.var(dim=0) + STD_EPS)).mean()


def covariance_loss(x: torch.Tensor) -> torch.Tensor:
    """c(Z) = 1/d sum_{i != j} C(Z)_ij^2 of [n, d] embeddings, C(Z) their unbiased covariance matrix (Eq. 3, 4)."""
    x = x - x.mean(dim=0)
    cov = x.T @ x / (len(x) - 1)
    return off_diagonal(cov).pow(2).sum() / x.shape[1]


def vicreg_loss(x: torch.Tensor, y: torch.Tensor, sim_coeff: float, std_coeff: float,
                cov_coeff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l, its invariance, variance and covariance terms) of the [n, d] embeddings of two views: Eq. 6 in
    main_vicreg.py's form, lambda s / d + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))."""
    invariance = invariance_loss(x, y)
    variance = (variance_loss(x) + variance_loss(y)) / 2
    covariance = covariance_loss(x) + covariance_loss(y)
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, invariance, variance, covariance


class VICRegConfig(MethodSection):
    """The flags of main_vicreg.py, under their names there, at their defaults."""

    name: Literal["vicreg"] = "vicreg"
    sim_coeff: float = Field(25.0, ge=0, description="lambda, the weight of the invariance term (--sim-coeff)")
    std_coeff: float = Field(25.0, ge=0, description="mu, the weight of the variance term (--std-coeff)")
    cov_coeff: float = Field(1.0, ge=0, description="nu, the weight of the covariance term (--cov-coeff)")
    mlp: WidthsSpec = Field("8192-8192-8192", description="the expander's layer widths (--mlp): Linear-BN-ReLU to "
                                                          "each but the last, then a Linear")

    @property
    def proj_dim(self) -> int:
        """The expander's output width: the pipelines' projector space."""
        return widths(self.mlp)[-1]

    @model_validator(mode="after")
    def _check_coefficients(self) -> "VICRegConfig":
        if self.sim_coeff == self.std_coeff == self.cov_coeff == 0:
            raise ValueError("sim_coeff, std_coeff and cov_coeff are all 0: the loss would be constant")
        return self


class VICReg(SSLMethod):
    name = "vicreg"
    display_name = "VICReg"
    config_class = VICRegConfig
    defaults = OptimDefaults(name="lars", base_lr=0.2, weight_decay=1e-6)  # main_vicreg.py: LARS, --base-lr, --wd

    def __init__(self, backbone: nn.Module, cfg: VICRegConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.projector = mlp_of_widths(backbone.feature_dim, widths(cfg.mlp), hidden_bias=True)
        self.sim_coeff, self.std_coeff, self.cov_coeff = cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x, y = views
        zx, zy = self.projector(self.backbone(x)), self.projector(self.backbone(y))
        pairs, _ = gather_with_grad(torch.stack([zx, zy], dim=1).float())  # [global batch, 2 views, d]
        with torch.autocast(pairs.device.type, enabled=False):  # the covariances sum n products: float32
            loss, invariance, variance, covariance = vicreg_loss(pairs[:, 0], pairs[:, 1], self.sim_coeff,
                                                                 self.std_coeff, self.cov_coeff)
        return StepOutput(loss, {"invariance": invariance.detach(), "variance": variance.detach(),
                                 "covariance": covariance.detach(), "output_std": output_std(zx)})
