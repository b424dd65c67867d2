"""Heads shared by the methods: MLPs (projectors, predictors) and cosine prototypes (ExCB's centroids, MSN's
prototypes)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


#: the activations a head may take between its layers, by name
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = True,
        activation: str = "relu") -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a final Linear (optionally followed by BN without affine, as in SimSiam).
    ``activation`` "gelu" puts GELU in place of ReLU, as MSN's projector (msn_train.init_model)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), ACTIVATIONS[activation]()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def bn_projector(in_dim: int, out_dim: int, num_layers: int, hidden_dim: int | None = None) -> nn.Sequential:
    """SDCLR's and BCL's ``proj_head``: ``num_layers`` Linear layers, each followed by a BatchNorm with its affine,
    ReLU between them; only the first Linear has a bias; the hidden width is ``in_dim`` unless given.

    VITA-Group/SDCLR (models/resnet_prune_multibn.py, as train_simCLR.py builds it): 3 layers, 512-512-512-128 on
    ResNet-18. MediaBrain-SJTU/BCL (models/simclr.py, and models/sdclr.py's ``twoLayerProj=True``): 2 layers.
    """
    hidden_dim = hidden_dim or in_dim
    layers: list[nn.Module] = []
    dim = in_dim
    for i in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=i == 0), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers += [nn.Linear(dim, out_dim, bias=num_layers == 1), nn.BatchNorm1d(out_dim)]
    return nn.Sequential(*layers)


class CosineCentroids(nn.Module):
    """q(v) = cos(v, c_k) for K learned centroids c_k: ExCB's centroid layer (Eq. 1, Algorithm 2) and MSN's
    prototypes (Assran et al. 2022, Sec. 3: p = softmax(cos(z, q_k) / tau)).

    ``detach=True`` is ExCB's q̄ of Eq. 2 and Algorithm 2, and MSN's targets' (whose prototypes get no gradient
    through the target): the centroids act as constants, so the features move towards them but never they.
    """

    def __init__(self, dim: int, num_clusters: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_clusters, dim))  # random directions; k-means may replace them

    def forward(self, v: torch.Tensor, detach: bool = False) -> torch.Tensor:
        centroids = self.weight.detach() if detach else self.weight
        # In float32 even under bf16 autocast: tau_t = 0.04 multiplies rounding errors of the cosines by 25.
        with torch.autocast(v.device.type, enabled=False):
            return F.normalize(v.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T
