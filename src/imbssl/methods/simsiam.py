"""SimSiam (Chen & He, 2021): a siamese network with a predictor and a stop-gradient.

    p1, p2 = h(z1), h(z2)   where z = g(f(x)) is the projection of a view
    L = D(p1, z2) / 2 + D(p2, z1) / 2,   D(p, z) = -cos(p, stopgrad(z))
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from imbssl.configbase import ProjectorSection
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std
from imbssl.models.heads import mlp


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, stopgrad(z)), averaged over the batch (SimSiam Eq. 1 with Eq. 3's stop-gradient)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrised loss L = D(p1, z2)/2 + D(p2, z1)/2 (SimSiam Eq. 2)."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


class SimSiamConfig(ProjectorSection):
    name: Literal["simsiam"] = "simsiam"
    pred_hidden: int = Field(128, ge=1, description="the predictor's bottleneck width (SimSiam Sec. 4.4)")
    fix_predictor_lr: bool = Field(True, description="hold the predictor at the base learning rate while the rest "
                                                     "follows the cosine schedule, as both reference codes do "
                                                     "(PatrickHua/SimSiam constant_predictor_lr, "
                                                     "facebookresearch/simsiam --fix-pred-lr)")


class SimSiam(SSLMethod):
    name = "simsiam"
    display_name = "SimSiam"
    config_class = SimSiamConfig
    defaults = OptimDefaults(name="sgd", base_lr=0.03, weight_decay=1e-5)  # Table 1

    def __init__(self, backbone: nn.Module, cfg: SimSiamConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim, num_layers=2, last_bn=True)
        # The predictor is a bottleneck MLP without a BN on its output (SimSiam Sec. 4.4).
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, num_layers=2, last_bn=False)
        self.fix_predictor_lr = cfg.fix_predictor_lr

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector, "predictor": self.predictor}

    def param_groups(self) -> list[dict]:
        """With ``fix_predictor_lr`` the predictor is a group of its own that the schedule leaves at the base lr:
        SimSiam Sec. 4.4 finds a predictor that keeps adapting to the latest representation works best."""
        if not self.fix_predictor_lr:
            return super().param_groups()
        predictor = list(self.predictor.parameters())
        in_predictor = {id(p) for p in predictor}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_predictor]
        return [{"params": rest}, {"params": predictor, "fixed_lr": True}]

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        return StepOutput(loss, {"output_std": output_std(z1)})
