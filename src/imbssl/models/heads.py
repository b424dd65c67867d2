"""Heads shared by the methods: MLPs (projectors, predictors), cosine prototypes (ExCB's centroids, MSN's
prototypes) and DINO's head."""
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


def mlp_of_widths(in_dim: int, widths: list[int], hidden_bias: bool) -> nn.Sequential:
    """Linear-BN-ReLU to each of ``widths`` but the last, then a Linear without bias to the last: the projector that
    a flag such as "8192-8192-8192" describes in Barlow Twins' main.py (hidden Linears without bias) and VICReg's
    main_vicreg.py ``Projector`` (with)."""
    dims = [in_dim, *widths]
    layers: list[nn.Module] = []
    for dim_in, dim_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(dim_in, dim_out, bias=hidden_bias), nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
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


class WeightNormedLinear(nn.Module):
    """A Linear without bias whose rows are w_k = g_k v_k / ||v_k|| (weight normalisation, Salimans & Kingma 2016;
    torch's ``nn.utils.weight_norm`` of a Linear, under its names ``weight_g`` [K, 1] and ``weight_v`` [K, d]): DINO's
    last layer. g starts at 1; ``learn_norm=False`` keeps it there (their ``norm_last_layer``), so that on unit inputs
    the outputs are cosines to K prototypes, as ``CosineCentroids`` gives them.

    ``detach=True`` treats g and v as constants: they get no gradient, and an optimizer step leaves them alone (DINO's
    ``cancel_gradients_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_norm)
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())  # a Linear's init

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        g, v = (self.weight_g.detach(), self.weight_v.detach()) if detach else (self.weight_g, self.weight_v)
        return F.linear(x, v * (g / torch.linalg.vector_norm(v, dim=1, keepdim=True)))


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, Sec. 3.1; vision_transformer.py ``DINOHead``): an MLP of ``num_layers``
    Linear layers with biases, GELU between them (after a BatchNorm each if ``use_bn``), to a ``bottleneck_dim``
    bottleneck; its output l2-normalised, then a ``WeightNormedLinear`` to ``out_dim``, with g fixed at 1 if
    ``norm_last_layer``. The MLP's Linear weights are drawn from a normal of std 0.02 truncated at +-2, their biases
    0 (their ``_init_weights``); the last layer keeps a Linear's init. The layers' names are theirs (``mlp.0``, ...,
    ``last_layer.weight_g``), except that one layer is ``mlp.0`` here where theirs is ``mlp`` itself."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim, *[hidden_dim] * (num_layers - 1), bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (dim_in, dim_out) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(dim_in, dim_out))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(dim_out), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormedLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        """The K outputs; ``freeze_last_layer`` lets no gradient reach the last layer (``WeightNormedLinear``)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1), detach=freeze_last_layer)
