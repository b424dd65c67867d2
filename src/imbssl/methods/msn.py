"""MSN (Assran et al., ECCV 2022) and PMSN (Assran et al., ICLR 2023): masked siamese networks whose
prototypes match a cluster prior.

    z_a = g(f(mask(x_a))),   z_t = g_t(f_t(x_t))              anchor (masked) and target (EMA, unmasked) views
    p = softmax(cos(z, c_k) / tau),   K prototypes c_k         tau_a = 0.1, the target's sharpened to 0.025
    L = H(p_t, p_a) + lambda R(p_bar),   p_bar = mean of p_a over the (global) batch

R is MSN's ME-MAX, -H(p_bar), for a uniform prior, and PMSN's KL(p_bar || pi) otherwise. For pi = 1/K,
KL(p_bar || U) = log K - H(p_bar): PMSN with a uniform prior is MSN up to a constant, so one loss serves both
(``prior_matching``). The KL's direction matters: KL(pi || p_bar), which some libraries compute, is not ME-MAX.
Sinkhorn on the targets forces uniform marginals, so it is refused with a non-uniform prior (``MSNConfig``).
``method.proj_activation``, ``view_batches``, ``clip_grad_norm`` and ``model.vit_ln_eps`` give the form of MSN's
code where imbssl's default differs from it; the paper presets set it (docs/priors.md).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from imbssl.augment.masking import grid_cells, kept_tokens, mask_patches
from imbssl.configbase import ProjectorSection
from imbssl.engine.distributed import batch_mean_with_grad, place_in_global_batch, sum_over_processes
from imbssl.engine.ema import ema_teacher, ema_update
from imbssl.engine.schedules import ema_momentum_schedule
from imbssl.engine.task import MakeView
from imbssl.methods.base import (OptimDefaults, SSLMethod, StepOutput, kmeans_of_one_view, output_std,
                                 weight_decay_groups)
from imbssl.models.heads import CosineCentroids, mlp
from imbssl.priors import PriorConfig, cluster_prior, fit_power_law

#: iterations of Sinkhorn-Knopp on the targets (MSN's code uses 3)
SINKHORN_ITERATIONS = 3


def prior_matching(p_bar: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p_bar || pi) = sum_k p_bar_k log(p_bar_k / pi_k) (PMSN); log K - H(p_bar) for the uniform pi (MSN)."""
    return torch.sum(p_bar * (torch.log(p_bar + 1e-12) - torch.log(prior)))


def me_max(p_bar: torch.Tensor) -> torch.Tensor:
    """-H(p_bar), MSN's mean-entropy maximisation term (Assran et al. 2022, Eq. 2)."""
    return torch.sum(p_bar * torch.log(p_bar + 1e-12))


@torch.no_grad()
def sinkhorn(p: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """[B, K] rows that sum to 1 whose columns sum to B/K: equal-sized clusters (Cuturi 2013, as SwAV and MSN).
    B and the column sums are the global batch's when several processes share it."""
    q = p.T / sum_over_processes(p.sum())
    num_clusters, batch = q.shape[0], sum_over_processes(p.new_tensor(float(len(p))))
    for _ in range(iterations):
        q = q / sum_over_processes(q.sum(dim=1, keepdim=True)) / num_clusters
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).T


def msn_loss(p_target: torch.Tensor, logits_anchor: torch.Tensor, prior: torch.Tensor,
             weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H(p_t, p_a) + lambda KL(p_bar || pi), p_bar) for targets [B, K] and anchors [A, B, K] (A views each)."""
    log_p_anchor = F.log_softmax(logits_anchor, dim=-1)
    cross_entropy = -(p_target.unsqueeze(0) * log_p_anchor).sum(-1).mean()
    p_bar = batch_mean_with_grad(log_p_anchor.exp().flatten(0, 1))
    return cross_entropy + weight * prior_matching(p_bar, prior), p_bar


class MSNConfig(ProjectorSection):
    """MSN and PMSN (docs/priors.md). proj_activation, view_batches and clip_grad_norm give the form of MSN's code
    (facebookresearch/msn; "Differences from MSN's code"); the defaults are imbssl's."""

    name: Literal["msn"] = "msn"
    num_clusters: int = Field(512, ge=2, description="K, the number of prototypes")
    prior: PriorConfig = Field(PriorConfig(), description="pi, which the mean prediction is matched to: uniform = "
                                                          "MSN, any other = PMSN (priors.py)")
    teacher_momentum: float = Field(0.996, ge=0, le=1, description="EMA momentum m of the target encoder, raised to 1 "
                                                                   "on a cosine schedule (as ExCB's teacher)")
    anchor_temperature: float = Field(0.1, gt=0, description="tau of the anchor predictions")
    target_temperature: float = Field(0.025, gt=0, description="tau of the sharpened target predictions (0.1 "
                                                               "sharpened with T = 0.25)")
    regularization_weight: float = Field(1.0, ge=0, description="lambda of the ME-MAX / prior-matching term")
    mask_ratio: float = Field(0.3, ge=0, lt=1, description="the share of the anchor view's patches dropped (ViT "
                                                          "tokens, or zeroed input patches of a CNN)")
    mask_patch: int = Field(4, ge=1, description="on a CNN: the side of the zeroed input patches (ViT: its patch)")
    sinkhorn: bool = Field(False, description="Sinkhorn-Knopp on the targets (uniform marginals); refused with a "
                                              "non-uniform prior")
    proj_activation: Literal["relu", "gelu"] = Field(
        "relu", description="the projector's activation after each Linear-BN: relu (heads.mlp's) or gelu (MSN's "
                            "code, msn_train.init_model)")
    view_batches: Literal["each", "by_size"] = Field(
        "each", description="each = every anchor and focal view through the encoder and projector as a batch of its "
                            "own; by_size = the anchor views as one batch and the focal views as another, as MSN's "
                            "code batches the views of each size, so the projector's BatchNorm normalises the focal "
                            "views together. The same with one anchor and at most one focal view")
    clip_grad_norm: float | None = Field(
        None, gt=0, description="clip the encoder's gradient norm (backbone and projector together, not the "
                                "prototypes') at this before each optimizer step, as msn_train.py's clip_grad (3.0 in "
                                "its config); None = no clipping")

    @model_validator(mode="after")
    def _check_prior(self) -> "MSNConfig":
        if self.sinkhorn and self.prior.kind != "uniform":
            raise ValueError(f"sinkhorn forces uniform cluster marginals, which contradicts prior.kind="
                             f"{self.prior.kind}: turn sinkhorn off for a non-uniform prior")
        return self


class MSN(SSLMethod):
    name = "msn"
    display_name = "MSN"
    config_class = MSNConfig
    # MSN trains ViTs with AdamW (lr 1e-3 at batch 1024, weight decay 0.04 -> 0.4); per 256 images, fixed decay.
    defaults = OptimDefaults(name="adamw", base_lr=1e-3, weight_decay=0.04)
    uses_local_crops = True  # MSN's focal views: further anchors, small and unmasked
    learns_clusters = True

    def __init__(self, backbone: nn.Module, cfg: MSNConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.cfg = cfg
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim, num_layers=3, last_bn=False,
                             activation=cfg.proj_activation)
        self.prototypes = CosineCentroids(cfg.proj_dim, cfg.num_clusters)
        # The target encoder starts as a copy and only moves by EMA; the prototypes are shared, as in MSN.
        self.target = ema_teacher(self, ("backbone", "projector"))
        # a prior from the data is measured in on_train_start; saved in checkpoints, so a resumed run keeps it
        self.register_buffer("prior", cluster_prior(PriorConfig() if cfg.prior.from_data else cfg.prior,
                                                    cfg.num_clusters))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # seeds the masks, saved for resume

    def mask_generator(self, device: torch.device) -> torch.Generator:
        """A generator for this step's masks: the run's seed (torch.initial_seed) and the step count, so a resumed
        run draws the masks an uninterrupted one would."""
        seed = (torch.initial_seed() * 1_000_003 + int(self.steps_done)) % 2**63
        return torch.Generator(device=device).manual_seed(seed)

    @property
    def drops_tokens(self) -> bool:
        return getattr(self.backbone, "supports_token_drop", False)

    def num_patches(self, x: torch.Tensor) -> int:
        """What the mask chooses among in view ``x``: a ViT's patch tokens, or the cells of a CNN's mask grid."""
        if self.drops_tokens:
            return (x.shape[2] // self.backbone.patch) * (x.shape[3] // self.backbone.patch)
        return grid_cells(x.shape[2], x.shape[3], self.cfg.mask_patch)

    def anchor_masks(self, anchor_views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """The kept patches of each anchor view, this process's rows of masks drawn for the global batch: the
        masks of an image do not depend on how many processes share its batch."""
        batch, mine = place_in_global_batch(len(anchor_views[0]), anchor_views[0].device)
        return [kept_tokens(batch, self.num_patches(x), self.cfg.mask_ratio, generator)[mine] for x in anchor_views]

    def encode_anchor(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """f(mask(x)): a ViT encodes its ``kept`` tokens only, any other backbone gets the other patches zeroed."""
        if self.drops_tokens:
            return self.backbone(x, kept)
        return self.backbone(mask_patches(x, kept, self.cfg.mask_patch))

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        target_view, anchor_views, focal_views = views[0], views[1:self.num_views], views[self.num_views:]
        p_target = self.target_predictions(target_view)
        masks = self.anchor_masks(anchor_views, self.mask_generator(target_view.device))
        anchors = self.anchor_projections(anchor_views, masks, focal_views)
        logits = torch.stack([self.prototypes(z) for z in anchors]) / self.cfg.anchor_temperature
        loss, p_bar = msn_loss(p_target, logits, self.prior, self.cfg.regularization_weight)
        target_counts = p_target.argmax(-1).bincount(minlength=len(self.prior))
        return StepOutput(loss, {"output_std": output_std(anchors[0]),
                                 "target_confidence": p_target.amax(-1).mean(),
                                 "prior_kl": prior_matching(p_bar.detach(), self.prior),
                                 # p_bar is soft: it can cover every prototype while the targets' argmax
                                 # picks a few, so both are logged
                                 "p_bar_support": (p_bar.detach() > 0.5 * self.prior).float().mean(),
                                 "target_clusters": (target_counts > 0).sum().float()})

    def anchor_projections(self, anchor_views: list[torch.Tensor], masks: list[torch.Tensor],
                           focal_views: list[torch.Tensor]) -> list[torch.Tensor]:
        """g(f(mask(x))) of each anchor view, then g(f(x)) of each focal view. ``view_batches`` each: each view
        a batch of its own, so the projector's BatchNorm normalises each view with its own statistics; by_size: the
        anchor views as one batch and the focal views as another, as MSN's code (deit.VisionTransformer.forward
        takes the views of one size together; docs/priors.md, "Differences from MSN's code")."""
        if self.cfg.view_batches == "each":
            anchors = [self.projector(self.encode_anchor(x, kept))
                       for x, kept in zip(anchor_views, masks, strict=True)]
            return anchors + [self.projector(self.backbone(x)) for x in focal_views]
        anchors = self.projector(self.encode_anchor(torch.cat(anchor_views), torch.cat(masks)))
        focal = self.projector(self.backbone(torch.cat(focal_views))).chunk(len(focal_views)) if focal_views else ()
        return [*anchors.chunk(len(anchor_views)), *focal]

    @torch.no_grad()
    def target_predictions(self, x: torch.Tensor) -> torch.Tensor:
        """p_t = softmax(cos(z_t, c) / tau_t), the sharpened targets, optionally balanced by Sinkhorn."""
        p = F.softmax(self.prototypes(self.target(x), detach=True) / self.cfg.target_temperature, dim=-1)
        return sinkhorn(p) if self.cfg.sinkhorn else p

    # -- engine hooks -----------------------------------------------------------------------
    @property
    def eval_backbone(self) -> nn.Module:
        """The target encoder's backbone, as MSN evaluates it."""
        return self.target.backbone

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.target.projector}

    @property
    def clusterer(self) -> nn.Module:
        """The target encoder's cosine to each prototype."""
        return nn.Sequential(self.target, self.prototypes)

    @property
    def cluster_target(self) -> torch.Tensor:
        return self.prior

    def param_groups(self) -> list[dict]:
        """No target parameter; biases, normalisation weights (1-d) and the prototypes without weight decay, as
        MSN's code (``init_opt``)."""
        prototypes = self.prototypes.weight
        groups = weight_decay_groups([p for p in self.parameters() if p.requires_grad and p is not prototypes])
        groups[1]["params"].append(prototypes)
        return groups

    def gradient_clipping(self) -> tuple[list[nn.Parameter], float] | None:
        """The parameters whose gradient norm the engine clips before the optimizer step, and the norm
        (engine/trainer.clip_gradients): the encoder, backbone and projector together, at ``clip_grad_norm``, as
        msn_train.py clips ``encoder.parameters()`` (the prototypes are not part of it); None = no clipping."""
        if self.cfg.clip_grad_norm is None:
            return None
        encoder = [p for part in (self.backbone, self.projector) for p in part.parameters() if p.requires_grad]
        return encoder, self.cfg.clip_grad_norm

    @torch.no_grad()
    def on_train_start(self, images: torch.Tensor, make_view: MakeView, generator: torch.Generator) -> None:
        """A prior from the data (estimated, power_law_fit) from the k-means sizes of the target encoder's projections
        of one global view of every image, as ExCB's. The prototypes keep their random start, so which of them gets
        which share is arbitrary, as with a set power law."""
        if self.cfg.prior.from_data:
            result = kmeans_of_one_view(self.target, images, make_view, generator, len(self.prior))
            self.prior.copy_(cluster_prior(self.cfg.prior, len(self.prior), result.assignments))

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """The target encoder's momentum, m -> 1 on a cosine (as ExCB's teacher; MSN's ``momentum_scheduler``)."""
        return {"teacher_momentum": ema_momentum_schedule(self.cfg.teacher_momentum, total_steps)}

    def on_step_end(self) -> None:
        """EMA of the target encoder at the step's momentum; the next step's masks."""
        ema_update(self.target, self, self.teacher_momentum)
        self.steps_done += 1

    def epoch_stats(self, labels) -> dict[str, float]:
        """The entropy of the prior, in nats against log K, for reading prior_kl; the power-law exponent fitted to
        the prior (tau itself for power_law and power_law_fit, 0 for uniform)."""
        return {"prior_entropy": float(-(self.prior * self.prior.log()).sum()), "log_k": math.log(len(self.prior)),
                "prior_tau": fit_power_law(self.prior.cpu().numpy())}
