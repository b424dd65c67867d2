"""SimCLR (Chen et al., 2020): contrast each view with its partner against all other views in the batch.

    z = g(f(x)),  s_ij = cos(z_i, z_j) / tau
    l(i, j) = -log( exp(s_ij) / sum_{k != i} exp(s_ik) )          (NT-Xent, SimCLR Eq. 1)
    L = 1/(2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]

Several processes: each gathers the projections of the whole global batch, with their gradient, and averages l over
its own views only, against the negatives of every process; the engine's share-weighted gradient sum then makes it
the one-process loss at the global batch, exactly.

The family's section takes ``gh``, Geometric Harmonization's (methods/gh.py): its loss is added in the family's one
``training_step``, so SimCLR, Focal, SDCLR, BCL-I and BCL-D all take it.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from imbssl.configbase import ProjectorSection
from imbssl.engine.distributed import gather, gather_with_grad
from imbssl.engine.schedules import constant_schedule
from imbssl.engine.task import MakeView
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std
from imbssl.methods.gh import GeometricHarmonization, GHSection, gh_schedules
from imbssl.models.heads import bn_projector, mlp


def nt_xent_per_view(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                     anchors: slice = slice(None)) -> torch.Tensor:
    """l(2k-1, 2k) and l(2k, 2k-1) of each image k (SimCLR Eq. 1), as [2 views, images].

    ``anchors`` (images of the batch) keeps only their losses, their views still contrasted with all 2N: one
    process's part of the loss of a global batch.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    images = torch.arange(n, device=z.device)[anchors]
    rows = torch.cat([images, images + n])
    logits = z[rows] @ z.T / temperature
    # A view is never its own negative: mask it out of its softmax denominator.
    logits = logits.masked_fill(rows[:, None] == torch.arange(2 * n, device=z.device), float("-inf"))
    return F.cross_entropy(logits, (rows + n) % (2 * n), reduction="none").view(2, -1)


def nt_xent_per_image(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                      anchors: slice = slice(None)) -> torch.Tensor:
    """Each image's NT-Xent, the mean of its two views' l (``nt_xent_per_view``): what BCL tracks per image."""
    return nt_xent_per_view(z1, z2, temperature, anchors).mean(dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, anchors: slice = slice(None)) -> torch.Tensor:
    """NT-Xent over the 2N views of a batch; row i's positive is its other view (SimCLR Eq. 1). ``anchors``
    averages over those images' views alone, still contrasted with all 2N (``nt_xent_per_image``)."""
    return nt_xent_per_image(z1, z2, temperature, anchors).mean()


class ContrastiveSection(ProjectorSection):
    """The keys of the SimCLR family (SimCLR, Focal, SDCLR, BCL): NT-Xent's temperature, the projector's widths and
    GH."""

    temperature: float = Field(0.5, gt=0, description="tau of NT-Xent (SDCLR's and BCL's code: 0.2)")
    gh: GHSection | None = Field(None, description="Geometric Harmonization's loss on top (methods/gh.py); "
                                                   "None = off")

    @model_validator(mode="after")
    def _check_gh_target(self) -> "ContrastiveSection":
        if self.gh is not None and self.gh.target_dim > self.proj_dim:
            raise ValueError(f"gh.target_dim {self.gh.target_dim} exceeds proj_dim {self.proj_dim}: GH's target "
                             f"draws its directions in the projection's dimensions")
        return self


class SimCLRConfig(ContrastiveSection):
    name: Literal["simclr"] = "simclr"
    head: Literal["simclr", "bcl"] = Field(
        "simclr", description="simclr = its 2-layer MLP of proj_hidden (Table 1 of the offline-clustering paper); "
                              "bcl = the head of BCL's SimCLR baseline (models/simclr.py, heads.bn_projector with 2 "
                              "layers of the feature width), which the longtail-ssl grid gives SimCLR and SimCLR+TS "
                              "so that the SimCLR family differs in the method alone")

    def unused_keys(self) -> set[str]:
        return {"proj_hidden"} if self.head == "bcl" else set()


def simclr_head(feature_dim: int, cfg: ContrastiveSection) -> nn.Sequential:
    """SimCLR's g: Linear-BN-ReLU-Linear of proj_hidden (SimCLR Sec. 2.1, Table 1 of the offline-clustering paper)."""
    return mlp(feature_dim, cfg.proj_hidden, cfg.proj_dim, num_layers=2, last_bn=False)


class SimCLR(SSLMethod):
    name = "simclr"
    display_name = "SimCLR"
    config_class = SimCLRConfig
    defaults = OptimDefaults(name="lars", base_lr=0.3, weight_decay=1e-6)  # Table 1

    def __init__(self, backbone: nn.Module, cfg: ContrastiveSection) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.projector = self.projection_head(backbone.feature_dim, cfg)
        self.temperature = cfg.temperature
        self.gh = None if cfg.gh is None else GeometricHarmonization(cfg.gh, cfg.proj_dim)
        self.gh_weight, self.gh_momentum, self.gh_estimate = 0.0, 0.0, 0.0  # GH's schedules set them each step

    def projection_head(self, feature_dim: int, cfg: SimCLRConfig) -> nn.Module:
        """g, as ``head`` names it; the methods built on SimCLR give their authors' heads."""
        if cfg.head == "bcl":
            return bn_projector(feature_dim, cfg.proj_dim, num_layers=2)
        return simclr_head(feature_dim, cfg)

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def on_train_start(self, images: torch.Tensor, make_view: MakeView, generator: torch.Generator) -> None:
        super().on_train_start(images, make_view, generator)
        if self.gh is not None:
            self.gh.reset(len(images))

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """NT-Xent's tau, constant unless optim.temperature_schedule replaces it (TS); GH's weight, momentum and
        estimates of pi."""
        tau = {"temperature": constant_schedule(self.temperature, total_steps)}
        return tau if self.gh is None else {**tau, **gh_schedules(self.gh.cfg, total_steps, steps_per_epoch)}

    def projections(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z1 = g(f(x1)), z2 = g(f(x2)): the two views' outputs that NT-Xent contrasts, computed as one batch of 2N,
        so that every BatchNorm normalises both views together, as SimCLR's code does and SDCLR's, BCL's and TS's
        ``train_simCLR.py`` do (one forward of the [2N] batch; tests/reference/test_ref_simclr.py). Two forwards
        would give each view its own batch statistics: a different loss (1.36 against their 1.81 on that test's
        batch)."""
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        return z[:len(x1)], z[len(x1):]

    def stats(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"output_std": output_std(z1)}

    def remember(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """This process's images (``indices``) and their NT-Xent this step: for a method that tracks it (BCL)."""

    def contrastive_losses(self, z1: torch.Tensor, z2: torch.Tensor, anchors: slice) -> torch.Tensor:
        """The ``anchors``' images' contrastive losses: NT-Xent (Focal re-weights it)."""
        return nt_xent_per_image(z1, z2, self.temperature, anchors)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        z1, z2 = self.projections(*views)
        pairs, mine = gather_with_grad(torch.stack([z1, z2], dim=1).float())  # [global batch, 2 views, d]
        losses = self.contrastive_losses(pairs[:, 0], pairs[:, 1], anchors=mine)
        self.remember(indices, losses.detach())
        out = StepOutput(losses.mean(), self.stats(z1, z2))
        return out if self.gh is None else self.harmonized(out, pairs, mine, indices)

    def harmonized(self, out: StepOutput, pairs: torch.Tensor, mine: slice, indices: torch.Tensor) -> StepOutput:
        """GH's step (methods/gh.py): L + w L_GH once w > 0 (its two terms logged apart); then the global batch's
        momentum scores, and pi where scheduled."""
        if self.gh_weight > 0:
            gh = self.gh(pairs[:, 0], pairs[:, 1], anchors=mine).mean()
            out = StepOutput(out.loss + self.gh_weight * gh,
                             {**out.stats, "contrastive": out.loss.detach(), "gh": gh.detach()})
        self.gh.remember(gather(indices), pairs[:, 0].detach(), self.gh_momentum, self.gh_estimate > 0)
        return out
