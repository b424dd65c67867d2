"""BYOL, Bootstrap Your Own Latent (Grill et al., NeurIPS 2020): an online network learns to predict, from one view
of an image, a slowly moving target network's projection of another view; no negative pairs.

    z = g_theta(f_theta(v)),   q = q_theta(z)           online: encoder, projector, predictor
    z' = g_xi(f_xi(v'))                                  target: encoder and projector, no gradient
    L_theta,xi = || q / ||q|| - z' / ||z'|| ||_2^2 = 2 - 2 <q, z'> / (||q|| ||z'||)                (Eq. 2)
    L^BYOL = L_theta,xi + L~_theta,xi        L~: v' through the online network, v through the target (Sec. 3.1)
    xi <- tau xi + (1 - tau) theta           after each optimizer step                             (Eq. 1)
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2     at step k of K, from tau_base to 1        (Sec. 3.3)

over a batch: the mean over its images of the two terms' sum, as the authors' code (deepmind/deepmind-research at
d8df415, byol/byol_experiment.py ``loss_fn``: ``helpers.regression_loss`` of each view's prediction against the
target's projection of the other, added, then ``jnp.mean``). Its heads are their ``networks.MLP``: Linear (with
bias), BatchNorm, ReLU, Linear (without bias), 4096 hidden and 256 out for both the projector and the predictor
(configs/byol.py). Its defaults are the 1000-epoch ones of configs/byol.py and Sec. 3.3: LARS (trust coefficient
1e-3, momentum 0.9), lr 0.2 per 256 images, weight decay 1.5e-6, biases and BatchNorm parameters excluded from both
the weight decay and the LARS adaptation (imbssl's LARS excludes every 1-d tensor: the same set), tau_base 0.996.
The paper's 10 warm-up epochs are ``optim.warmup_epochs``.

Each view is its own forward through each network, as their ``_forward`` applies the network once per view, so
BatchNorm normalises each view's batch alone; the target network runs in training mode, normalising with its own
batch statistics and keeping its own running ones, as theirs (``is_training=True``).

What differs from their code, on purpose: the target starts as a copy of the online network (``ema_teacher``), where
theirs draws it from another seed (their comment finds no significant difference with one seed for both); it holds no
predictor, which theirs carries along and never uses; there is no online linear classifier on the stopped
representation (imbssl evaluates with its own probes); the weights are initialised as torch's layers are, not as
haiku's; the warm-up's first step runs at lr / W where theirs runs at 0 (engine/schedules.py ``cosine_schedule``).

Checked step by step against their code and against lightly's parts: tests/reference/test_ref_byol.py.

Several processes: the loss is a mean of per-image terms, so the engine's share-weighted sum of the processes'
gradients is the gradient of the global batch; BatchNorm statistics are each process's own unless
``train.sync_batchnorm`` (their ``cross_replica_axis``) makes them the global batch's.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from imbssl.configbase import ProjectorSection
from imbssl.engine.ema import ema_teacher, ema_update
from imbssl.engine.schedules import ema_momentum_schedule
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std
from imbssl.models.heads import mlp_of_widths


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[N]: ||p_i / ||p_i|| - z_i / ||z_i|| ||_2^2 = 2 - 2 cos(p_i, z_i) for each row (Eq. 2; their
    ``helpers.regression_loss``)."""
    return (F.normalize(p, dim=-1) - F.normalize(z, dim=-1)).pow(2).sum(-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L^BYOL = mean_i [ L(p1_i, z2_i) + L(p2_i, z1_i) ]: each view's online prediction p against the target's
    projection z of the other view, with no gradient to z (Eq. 2, symmetrised as in Sec. 3.1; their ``loss_fn``)."""
    return (regression_loss(p1, z2.detach()) + regression_loss(p2, z1.detach())).mean()


class BYOLConfig(ProjectorSection):
    """The ``network_config`` and ``base_target_ema`` of their configs/byol.py, at its 1000-epoch values (Sec. 3.3)."""

    name: Literal["byol"] = "byol"
    proj_hidden: int = Field(4096, ge=1, description="the projector's hidden width (projector_hidden_size)")
    proj_dim: int = Field(256, ge=1, description="the width of the projection and of the prediction "
                                                 "(projector_output_size)")
    pred_hidden: int = Field(4096, ge=1, description="the predictor's hidden width (predictor_hidden_size)")
    base_target_ema: float = Field(0.996, ge=0, le=1, description="tau_base, the target network's EMA decay at the "
                                                                  "first step, raised to 1 on a cosine over the run "
                                                                  "(base_target_ema; their shorter presets: 0.99 for "
                                                                  "100 and 300 epochs, 0.97 for 40)")


class BYOL(SSLMethod):
    """Evaluated, as theirs, through the online network: ``eval_backbone`` is f_theta."""

    name = "byol"
    display_name = "BYOL"
    config_class = BYOLConfig
    defaults = OptimDefaults(name="lars", base_lr=0.2, weight_decay=1.5e-6)  # configs/byol.py, 1000 epochs

    def __init__(self, backbone: nn.Module, cfg: BYOLConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        # their networks.MLP: Linear (with bias) - BatchNorm - ReLU - Linear (without bias)
        self.projector = mlp_of_widths(backbone.feature_dim, [cfg.proj_hidden, cfg.proj_dim], hidden_bias=True)
        self.predictor = mlp_of_widths(cfg.proj_dim, [cfg.pred_hidden, cfg.proj_dim], hidden_bias=True)
        # The target starts as a copy of the online encoder and projector and only moves by EMA (Eq. 1).
        self.target = ema_teacher(self, ("backbone", "projector"))
        self.base_target_ema = cfg.base_target_ema
        self.target_ema = cfg.base_target_ema  # tau, the step's value of ``schedules()``

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector, "predictor": self.predictor}

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        with torch.no_grad():
            target1, target2 = self.target(x1), self.target(x2)
        loss = byol_loss(self.predictor(z1), self.predictor(z2), target1, target2)
        return StepOutput(loss, {"output_std": output_std(z1)})

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """tau from tau_base to 1 on a cosine over the run (Sec. 3.3; their ``schedules.target_ema``)."""
        return {"target_ema": ema_momentum_schedule(self.base_target_ema, total_steps)}

    def on_step_end(self) -> None:
        """xi <- tau xi + (1 - tau) theta for the encoder and the projector (Eq. 1)."""
        ema_update(self.target, self, self.target_ema)
