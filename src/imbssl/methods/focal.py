"""Focal: SimCLR whose NT-Xent is re-weighted per view as the focal loss (Lin et al., ICCV 2017, Eq. 4) re-weights
cross-entropy, so that the views whose positive is hardest to pick out of the batch weigh the most. SDCLR, BCL and
GH report it as a baseline on long-tailed data; of their codes, only GH's holds it (MediaBrain-SJTU/
Geometric-Harmonization at 9f7057c, utils.py ``focal_nt_xent``), and imbssl runs it as that code does:

    p_i = exp(s_ij) / sum_{k != i} exp(s_ik)     the probability NT-Xent gives view i's positive j (SimCLR Eq. 1)
    l_i = -(1 - p_i)^gamma log p_i,   gamma = 2  (focal_nt_xent's default, which train_cifar.py keeps)
    L = 1/(2N) sum_i l_i

with tau = 0.2 (train_cifar.py's ``t=0.2``), their projection head (models.py's ``proj_head``: BCL's, ``head: bcl``)
and their optimizer (SGD, lr 0.5 at batch 512, weight decay 5e-4, momentum 0.9). gamma = 0 would be SimCLR.

One difference is on purpose: their SimCLR model forwards the two views one at a time (models.py ``SimCLR.forward``),
so each has its own BatchNorm statistics; imbssl's SimCLR family forwards them as one batch, as SimCLR's, SDCLR's and
BCL's code do (methods/simclr.py ``projections``), so that Focal and SimCLR differ in the loss alone.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from imbssl.methods.base import OptimDefaults
from imbssl.methods.simclr import SimCLR, SimCLRConfig, nt_xent_per_view


def focal_nt_xent_per_image(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gamma: float,
                            anchors: slice = slice(None)) -> torch.Tensor:
    """Each image's focal NT-Xent, the mean over its two views of -(1 - p)^gamma log p; with l = -log p the view's
    NT-Xent, 1 - p = -expm1(-l). ``anchors`` as ``nt_xent_per_view``."""
    losses = nt_xent_per_view(z1, z2, temperature, anchors)
    return ((-torch.expm1(-losses)) ** gamma * losses).mean(dim=0)


class FocalConfig(SimCLRConfig):
    """focal_nt_xent's and train_cifar.py's settings over SimCLR's keys."""

    name: Literal["focal"] = "focal"
    temperature: float = Field(0.2, gt=0, description="tau of NT-Xent (train_cifar.py: t=0.2)")
    head: Literal["simclr", "bcl"] = Field("bcl", description="bcl = their models.py proj_head (BCL's: 2 Linear "
                                                              "layers of the feature width, each followed by "
                                                              "BatchNorm); simclr = SimCLR's MLP of proj_hidden")
    gamma: float = Field(2.0, gt=0, description="the focusing exponent of (1 - p)^gamma (focal_nt_xent's default)")


class Focal(SimCLR):
    name = "focal"
    display_name = "Focal"
    config_class = FocalConfig
    # GH's train_cifar.py: SGD lr 0.5 at batch 512 (0.25 per 256 images), weight decay 5e-4, momentum 0.9
    defaults = OptimDefaults(name="sgd", base_lr=0.25, weight_decay=5e-4)

    def __init__(self, backbone: nn.Module, cfg: FocalConfig) -> None:
        super().__init__(backbone, cfg)
        self.gamma = cfg.gamma

    def contrastive_losses(self, z1: torch.Tensor, z2: torch.Tensor, anchors: slice) -> torch.Tensor:
        return focal_nt_xent_per_image(z1, z2, self.temperature, self.gamma, anchors)
