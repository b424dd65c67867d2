"""Alignment and uniformity on the hypersphere (Wang & Isola, ICML 2020): optimise the two properties the contrastive
loss optimises asymptotically, directly, on l2-normalised features z = f(x) / ||f(x)||.

    L_align(f; alpha) = E_(x,y)~p_pos [ ||f(x) - f(y)||_2^alpha ]                 alpha > 0   (Sec. 4.1.1)
    L_uniform(f; t)   = log E_x,x'~p_data [ exp(-t ||f(x) - f(x')||_2^2) ]        t > 0       (Sec. 4.1.2)
    L = align_w L_align(alpha) + unif_w (L_uniform(x; t) + L_uniform(y; t)) / 2                (Sec. 5)

over a batch: the mean over its N positive pairs (two views of an image), and the log of the mean Gaussian potential
over the N (N - 1) / 2 pairs of distinct images within each view's batch, each view's L_uniform averaged, as the
authors' code combines them (SsnL/align_uniform at e256d47, examples/stl10/main.py; the losses are
align_uniform/__init__.py's two lines). Its defaults: alpha = t = 2, both weights 1, SGD with momentum 0.9, weight
decay 1e-4, lr 0.12 per 256 images; the encoder's last layer (fc8) a Linear to ``feat_dim`` 128, then L2Norm.

Several processes: L_uniform is a log of a mean over all pairs of the global batch, not a mean of per-image terms,
so every process gathers the global batch's features (with their gradient) and computes the whole loss; the
engine's share-weighted sum of the processes' gradients is then the one-process gradient at the global batch.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from imbssl.configbase import MethodSection
from imbssl.engine.distributed import gather_with_grad
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std


def align_loss(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_align = mean_i ||x_i - y_i||_2^alpha over the N positive pairs (x_i, y_i) of [N, d] unit vectors
    (Sec. 4.1.1; their ``align_loss``)."""
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(x: torch.Tensor, t: float) -> torch.Tensor:
    """L_uniform = log mean_{i<j} exp(-t ||x_i - x_j||_2^2) over the pairs of distinct rows of [N, d] unit vectors:
    the log of the mean Gaussian potential G_t (Sec. 4.1.2; their ``uniform_loss``)."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def align_uniform_loss(x: torch.Tensor, y: torch.Tensor, align_w: float, unif_w: float, alpha: float,
                       t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, L_align, L_uniform) of the N positive pairs (x_i, y_i), [N, d] unit vectors each: L = align_w L_align +
    unif_w L_uniform, where L_uniform is the mean of the two views' (examples/stl10/main.py)."""
    align = align_loss(x, y, alpha)
    uniform = (uniform_loss(x, t) + uniform_loss(y, t)) / 2
    return align_w * align + unif_w * uniform, align, uniform


class AlignUniformConfig(MethodSection):
    """The flags of examples/stl10/main.py, under their names there, at their defaults."""

    name: Literal["align-uniform"] = "align-uniform"
    align_w: float = Field(1.0, ge=0, description="the weight of L_align (--align_w)")
    unif_w: float = Field(1.0, ge=0, description="the weight of L_uniform (--unif_w)")
    align_alpha: float = Field(2.0, gt=0, description="alpha of L_align, the power of the positive pairs' distance "
                                                      "(--align_alpha; Sec. 4.1.1 takes alpha > 0)")
    unif_t: float = Field(2.0, gt=0, description="t of L_uniform's Gaussian potential exp(-t ||u - v||^2) (--unif_t; "
                                                 "Sec. 4.1.2 takes t > 0)")
    proj_dim: int = Field(128, ge=1, description="the width of the features on the hypersphere: the output of the "
                                                 "linear head (fc8 of their encoder, --feat_dim)")

    @model_validator(mode="after")
    def _check_weights(self) -> "AlignUniformConfig":
        if self.align_w == 0 and self.unif_w == 0:
            raise ValueError("align_w and unif_w are both 0: the loss would be constant")
        return self


class AlignUniform(SSLMethod):
    name = "align-uniform"
    display_name = "Align-Uniform"
    config_class = AlignUniformConfig
    defaults = OptimDefaults(name="sgd", base_lr=0.12, weight_decay=1e-4)  # examples/stl10/main.py

    def __init__(self, backbone: nn.Module, cfg: AlignUniformConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        # fc8 of their SmallAlexNet: one Linear (with bias) from the features to the hypersphere's dimension
        self.projector = nn.Linear(backbone.feature_dim, cfg.proj_dim)
        self.align_w, self.unif_w = cfg.align_w, cfg.unif_w
        self.align_alpha, self.unif_t = cfg.align_alpha, cfg.unif_t

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x1, x2 = views
        # one forward of both views, so that BatchNorm normalises them together, as main.py's
        # encoder(torch.cat([im_x, im_y])).chunk(2)
        z = F.normalize(self.projector(self.backbone(torch.cat([x1, x2]))), dim=1)
        z1, z2 = z[:len(x1)], z[len(x1):]
        pairs, _ = gather_with_grad(torch.stack([z1, z2], dim=1).float())  # [global batch, 2 views, d]
        loss, align, uniform = align_uniform_loss(pairs[:, 0], pairs[:, 1], self.align_w, self.unif_w,
                                                  self.align_alpha, self.unif_t)
        return StepOutput(loss, {"align": align.detach(), "uniform": uniform.detach(), "output_std": output_std(z1)})
