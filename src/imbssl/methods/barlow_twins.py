"""Barlow Twins (Zbontar et al., ICML 2021): bring the cross-correlation matrix of the two views' embeddings, taken
along the batch, to the identity, which makes the embedding invariant to the augmentations (the diagonal) and its
components decorrelated (the rest).

    L_BT = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2                                        (Eq. 1)
    C_ij = sum_b z^A_b,i z^B_b,j / (sqrt(sum_b (z^A_b,i)^2) sqrt(sum_b (z^B_b,j)^2))                    (Eq. 2)

for the projector's outputs z^A, z^B of a batch's two views, mean-centred along the batch. The authors' code
(facebookresearch/barlowtwins at 8e8d284, main.py ``BarlowTwins.forward``) standardises each with a BatchNorm1d without
affine and divides ``bn(z1).T @ bn(z2)`` by the batch size: Eq. 2 up to the BatchNorm's eps (1e-5), which is the form
computed here. Its defaults (main.py's argparse): lambda = 0.0051 (--lambd); the projector 8192-8192-8192
(--projector: Linear-BN-ReLU to each width but the last, then a Linear, none of them with a bias); LARS, which leaves
biases and BatchNorm parameters out of its weight decay and adaptation, at 0.2 per 256 images for the weights
(--learning-rate-weights, imbssl's optim.base_lr) and 0.0048 for the biases and BatchNorm parameters
(--learning-rate-biases), both on one schedule (their ``adjust_learning_rate``: 10 warm-up epochs, then a cosine;
optim.warmup_epochs), weight decay 1e-6 (--weight-decay).

The two views go through the network one after the other, as in their forward, so that each BatchNorm normalises
one view's batch.

Several processes: C is a sum over the global batch, and its standardisation uses the global batch's statistics
(their SyncBatchNorm), so every process gathers the global batch's embeddings (with their gradient) and computes the
whole loss. Their code sums the processes' parts of C with ``torch.distributed.all_reduce``, which the backward pass
does not see: under DDP's averaging its gradient is 1/world_size of the one-process gradient
(facebookresearch/barlowtwins#8, lightly-ai/lightly#1977). Here two processes train exactly as one.

Also different from their code: C is divided by the batch's own size, theirs by --batch-size (the same for a full
batch); the standardisation keeps no running statistics, which their BatchNorm keeps and nothing reads; the loss is
computed in float32 under bf16 (theirs under fp16 autocast); the lr schedule is imbssl's cosine, whose warm-up step s
runs at (s + 1) / W of the peak (theirs at s / W) and whose end is 0 (theirs 1/1000 of the peak), two differences
that tests/reference/test_ref_barlow_twins.py tests.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import nn

from imbssl.configbase import MethodSection
from imbssl.engine.distributed import gather_with_grad
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std, weight_decay_groups
from imbssl.models.heads import mlp_of_widths

#: the eps of their BatchNorm1d, which standardises the embeddings
BN_EPS = 1e-5


def _check_widths(spec: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*(-[1-9][0-9]*)*", spec):
        raise ValueError(f"{spec!r} is not layer widths joined by '-', such as '8192-8192-8192'")
    return spec


#: a projector's layer widths as the authors' flags give them: "8192-8192-8192"
WidthsSpec = Annotated[str, AfterValidator(_check_widths)]


def widths(spec: str) -> list[int]:
    return [int(width) for width in spec.split("-")]


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (their ``off_diagonal``)."""
    n = len(c)
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """C of Eq. 2 for two [N, d] batches of embeddings, as main.py computes it: each standardised along the batch (mean
    0, biased variance 1, their BatchNorm's eps), then ``z1.T @ z2 / N``."""
    z1, z2 = (F.batch_norm(z, None, None, training=True, eps=BN_EPS) for z in (z1, z2))
    return z1.T @ z2 / len(z1)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor,
                      lambd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_BT, its invariance term, its redundancy reduction term) of two [N, d] batches of embeddings: Eq. 1 of
    their ``cross_correlation``."""
    c = cross_correlation(z1, z2)
    invariance = (torch.diagonal(c) - 1).pow(2).sum()
    redundancy_reduction = off_diagonal(c).pow(2).sum()
    return invariance + lambd * redundancy_reduction, invariance, redundancy_reduction


class BarlowTwinsConfig(MethodSection):
    """The flags of main.py, under their names there, at their defaults."""

    name: Literal["barlow-twins"] = "barlow-twins"
    lambd: float = Field(0.0051, ge=0, description="lambda, the weight of the redundancy reduction term (--lambd)")
    projector: WidthsSpec = Field("8192-8192-8192", description="the projector's layer widths (--projector): "
                                                                "Linear-BN-ReLU to each but the last, then a Linear")
    learning_rate_biases: float = Field(0.0048, gt=0, description="the biases' and BatchNorm parameters' lr per 256 "
                                                                  "images, on the run's lr schedule "
                                                                  "(--learning-rate-biases; the weights': "
                                                                  "optim.base_lr, their --learning-rate-weights)")

    @property
    def proj_dim(self) -> int:
        """The projector's output width: the pipelines' projector space."""
        return widths(self.projector)[-1]


class BarlowTwins(SSLMethod):
    name = "barlow-twins"
    display_name = "Barlow Twins"
    config_class = BarlowTwinsConfig
    defaults = OptimDefaults(name="lars", base_lr=0.2, weight_decay=1e-6)  # main.py: LARS, its lr and wd flags

    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.projector = mlp_of_widths(backbone.feature_dim, widths(cfg.projector), hidden_bias=False)
        self.lambd, self.learning_rate_biases = cfg.lambd, cfg.learning_rate_biases

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def param_groups(self) -> list[dict]:
        """main.py's two groups: the weights, and the biases and BatchNorm parameters (1-d) at their own base lr on
        the same schedule (engine/optim.py's group ``base_lr``)."""
        groups = weight_decay_groups([p for p in self.parameters() if p.requires_grad])
        groups[1]["base_lr"] = self.learning_rate_biases
        return groups

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        pairs, _ = gather_with_grad(torch.stack([z1, z2], dim=1).float())  # [global batch, 2 views, d]
        with torch.autocast(pairs.device.type, enabled=False):  # C sums N products: float32 under bf16 too
            loss, invariance, redundancy_reduction = barlow_twins_loss(pairs[:, 0], pairs[:, 1], self.lambd)
        return StepOutput(loss, {"invariance": invariance.detach(),
                                 "redundancy_reduction": redundancy_reduction.detach(), "output_std": output_std(z1)})
