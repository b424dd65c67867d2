"""SDCLR, self-damaging contrastive learning (Jiang et al., ICML 2021): SimCLR between the network and a pruned
copy of itself, so the views the pruned copy has forgotten (mostly the tail's) get the larger losses.

    M = 1[|w| among the top (1 - r) of all pruned weights]     global magnitude pruning, r = 0.9    (Sec. 3.2)
    f_p(x) = f(x; w * M, BN_p)                                  the pruned copy: the same weights, masked, with
                                                                its own BatchNorm (affine and statistics)
    z1 = g(f(x1)),  z2 = g_p(f_p(x2)),  L = NT-Xent(z1, z2)     (SimCLR Eq. 1)

M covers every convolution of f (VITA-Group/SDCLR prunes its prune_conv2d layers, the stem included, and never the
head's linear layers); g_p is g with its own BatchNorm. g is SDCLR's head, not SimCLR's: three Linear layers of the
feature width, each followed by BatchNorm (512-512-512-128 on ResNet-18; ``method.reference_head``). M is
recomputed from the current dense weights at the start of every epoch; the gradient through w * M reaches the
shared dense weights. Evaluation reads the dense network and its own BatchNorm, as SDCLR's fine-tuning
(bnNameCnt 0).

The reference code takes two backward passes per step, each branch's NT-Xent against the other's detached outputs,
then one optimizer step. The gradient of NT-Xent with respect to z1 is the same whether z2 is detached or not (and
the other way round), so one backward pass of the undetached loss gives the same update at half the backward cost;
the pruned branch's BatchNorm statistics then move once per step, not twice.

Global pruning falls hardest on the widest layers, whose weights are the smallest (PyTorch's default init bounds
them by 1/sqrt(fan_in)): the small CNN's last convolution keeps 2.1% of its weights at initialisation, its stem 86%.
``pruned_output_std`` in the training log watches that the pruned branch still spreads its outputs.
"""
from __future__ import annotations

import copy
import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from imbssl.methods.base import OptimDefaults, output_std
from imbssl.methods.simclr import ContrastiveSection, SimCLR, simclr_head
from imbssl.models.heads import bn_projector

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The convolution weights that pruning may zero, by name: every Conv2d, the stem and the shortcuts included,
    as SDCLR's prune_conv2d layers (its projection head's linear layers are never pruned)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def global_magnitude_masks(weights: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Masks keeping |w| >= t over all layers at once (global L1 pruning), t the magnitude that ceil(ratio * n) of
    the n weights lie below in sorted order, as SDCLR's ``Mask.magnitudePruning``: ceil(ratio * n) zeroed, fewer
    where weights tie at t (all of them are kept). A layer of small weights loses more of them than one of large."""
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    below = min(math.ceil(ratio * magnitudes.numel()), magnitudes.numel() - 1)  # SDCLR's index into the sorted |w|
    threshold = magnitudes.topk(magnitudes.numel() - below).values.min()
    return {name: w.detach().abs() >= threshold for name, w in weights.items()}


class ReferenceHeadSection(ContrastiveSection):
    """SDCLR's and BCL's keys beyond SimCLR's: whose projection head they train."""

    reference_head: bool = Field(True, description="the authors' projection head, every Linear followed by "
                                                   "BatchNorm, hidden width = the backbone's feature size (SDCLR's "
                                                   "code: 3 layers; BCL's: 2); false = SimCLR's 2-layer head of "
                                                   "proj_hidden")


def authors_head(feature_dim: int, cfg: ReferenceHeadSection, num_layers: int) -> nn.Module:
    """g: the authors' head of ``num_layers`` (heads.bn_projector) when ``reference_head``, else SimCLR's.

    SimCLR's head is drawn either way, as before the method sections: a seed gives the initial weights its published
    runs had (so proj_hidden, its width, still tells runs with the authors' head apart)."""
    head = simclr_head(feature_dim, cfg)
    return bn_projector(feature_dim, cfg.proj_dim, num_layers) if cfg.reference_head else head


class SDCLRConfig(ReferenceHeadSection):
    name: Literal["sdclr"] = "sdclr"
    prune_ratio: float = Field(0.9, ge=0, lt=1, description="the share of weights the pruned copy zeroes, by global "
                                                           "magnitude (the paper's 90%)")


class SDCLR(SimCLR):
    name = "sdclr"
    display_name = "SDCLR"
    config_class = SDCLRConfig
    # SDCLR's CIFAR scripts: SGD with lr 0.5 at batch 512 (0.25 per 256 images), weight decay 1e-4; NT-Xent tau 0.2.
    defaults = OptimDefaults(name="sgd", base_lr=0.25, weight_decay=1e-4)
    # SDCLR's proj_head: train_simCLR.py builds it with twoLayerProj at its default False (no flag sets it)
    head_layers: ClassVar[int] = 3

    def __init__(self, backbone: nn.Module, cfg: SDCLRConfig) -> None:
        super().__init__(backbone, cfg)
        self.prune_ratio = cfg.prune_ratio
        # The pruned branch's own BatchNorm layers, keyed "part/layer" ("." is not allowed in a ModuleDict key);
        # trained by its gradient alone, their statistics updated by its forward passes alone.
        self.pruned_bn = nn.ModuleDict({f"{part}/{name}".replace(".", "/"): copy.deepcopy(m)
                                        for part, module in self.parts().items()
                                        for name, m in module.named_modules() if isinstance(m, BATCH_NORMS)})
        for name, weight in self.prunable().items():
            self.register_buffer(_mask_name(name), torch.ones_like(weight, dtype=torch.bool))

    def projection_head(self, feature_dim: int, cfg: SDCLRConfig) -> nn.Module:
        return authors_head(feature_dim, cfg, self.head_layers)

    def parts(self) -> dict[str, nn.Module]:
        """What the pruned copy shares with the dense network: f and g."""
        return {"backbone": self.backbone, "projector": self.projector}

    def prunable(self) -> dict[str, nn.Parameter]:
        """The backbone's convolution weights, named "backbone.layer.weight"."""
        return {f"backbone.{name}": w for name, w in prunable_weights(self.backbone).items()}

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _mask_name(name)) for name in self.prunable()}

    def on_epoch_start(self, epoch: int) -> None:
        """Re-prune from the current dense weights (SDCLR re-prunes every epoch); the masks are buffers, so a
        checkpoint holds them."""
        for name, mask in global_magnitude_masks(self.prunable(), self.prune_ratio).items():
            getattr(self, _mask_name(name)).copy_(mask)

    def pruned_forward(self, x: torch.Tensor) -> torch.Tensor:
        """g_p(f_p(x)): the dense modules called with masked weights and the pruned branch's BatchNorm."""
        swapped = {name: w * getattr(self, _mask_name(name)) for name, w in self.prunable().items()}
        for key, bn in self.pruned_bn.items():
            prefix = key.replace("/", ".")
            swapped |= {f"{prefix}.{n}": t for n, t in [*bn.named_parameters(), *bn.named_buffers()]}
        for part, module in self.parts().items():
            own = {name.removeprefix(part + "."): t for name, t in swapped.items() if name.startswith(part + ".")}
            x = functional_call(module, own, (x,))
        return x

    def projections(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z1 = g(f(x1)) from the dense network, z2 = g_p(f_p(x2)) from its pruned copy; SimCLR's step does the rest."""
        return self.projector(self.backbone(x1)), self.pruned_forward(x2)

    def stats(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"output_std": output_std(z1), "pruned_output_std": output_std(z2)}


def _mask_name(weight_name: str) -> str:
    return "mask_" + weight_name.replace(".", "_")
