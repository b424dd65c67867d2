"""BCL, boosted contrastive learning (Zhou et al., ICML 2022): the images a network memorises least get stronger
augmentation, so the contrastive task spends more of its effort on them; in long-tailed data those are mostly the
tail's.

    l_i                                     image i's NT-Xent this step, the mean over its two views
    M_i <- l_i  (first epoch),  M_i <- (1 - beta) l_i + beta M_i  (after)     the momentum loss, beta = 0.97
    z_i = (M_i - mean M) / std M,  w_i = z_i / max_j |z_j| / 2 + 1/2          at each epoch's end, w in [0, 1]
    views: SimCLR's, then RandAugment with k ops, each applied with probability w_i at strength m_i

    BCL-I  (on SimCLR): k = 1, m_i = 10 + 20 w_i
    BCL-D  (on SDCLR):  k = 2, m_i = 5 + 25 w_i u_i,  u_i ~ U(0, 1) drawn per image and step, shared by its views

as MediaBrain-SJTU/BCL (train.py, train_sdclr.py, data/memoboosted_cifar100.py). The first epoch has no w yet
(w = 0: no RandAugment). The high-loss images are the least memorised ones, so both variants boost the same
images; they differ in the base method and the augmentation's shape. BCL-D's l is SDCLR's: each image's NT-Xent
between its dense view and its pruned view. Both take BCL's projection head (``method.reference_head``): two Linear
layers of the feature width, each followed by BatchNorm (models/simclr.py; models/sdclr.py's ``twoLayerProj=True``
with dual BN for BCL-D), not SimCLR's, nor SDCLR's three layers. M lives in a buffer, so a checkpoint holds it,
and w is a function of M, recomputed at each epoch start: a resumed run boosts exactly as an uninterrupted one.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from imbssl.augment.randaugment import MAX_STRENGTH, RandAugment
from imbssl.augment.views import BatchRows
from imbssl.engine.distributed import gather
from imbssl.engine.task import MakeView
from imbssl.eval.metrics import thirds_of_classes
from imbssl.methods.base import OptimDefaults
from imbssl.methods.sdclr import ReferenceHeadSection, SDCLR, SDCLRConfig, authors_head
from imbssl.methods.simclr import SimCLR


@torch.no_grad()
def momentum_loss_update(memory: torch.Tensor, losses: torch.Tensor, beta: float, first_epoch: bool) -> torch.Tensor:
    """M <- l in the first epoch, M <- (1 - beta) l + beta M after (BCL's shadow loss)."""
    return losses.clone() if first_epoch else torch.lerp(losses, memory, beta)


@torch.no_grad()
def boost_weights(momentum_loss: torch.Tensor) -> torch.Tensor:
    """w = z / max|z| / 2 + 1/2 for the z-scores z of the momentum losses (unbiased std, as torch.std in BCL).

    Losses that do not differ say nothing about memorisation: w = 0 (no boost) rather than BCL's NaN.
    """
    if len(momentum_loss) < 2 or momentum_loss.std() == 0:
        return torch.zeros_like(momentum_loss)
    z = (momentum_loss - momentum_loss.mean()) / momentum_loss.std()
    return z / z.abs().max() / 2 + 0.5


class BoostedSection(ReferenceHeadSection):
    """BCL's key over its base method's."""

    beta: float = Field(0.97, ge=0, lt=1, description="beta of each image's momentum loss, M <- (1 - beta) l + "
                                                      "beta M (BCL's code: 0.97)")


class BCLIConfig(BoostedSection):
    name: Literal["bcl-i"] = "bcl-i"


class BCLDConfig(BoostedSection, SDCLRConfig):
    name: Literal["bcl-d"] = "bcl-d"


class BoostedContrast:
    """BCL's memory (SimCLR's ``remember`` hook) and boosted views, over SimCLR or SDCLR."""

    num_ops: ClassVar[int]
    min_strength: ClassVar[float]
    strength_drawn: ClassVar[bool]  # m = min + (30 - min) w u, u drawn per image (BCL-D), or without u (BCL-I)

    def __init__(self, backbone: nn.Module, cfg: BoostedSection) -> None:
        super().__init__(backbone, cfg)
        self.beta = cfg.beta
        # One momentum loss per training image; sized by the images at the start of a run, or by a checkpoint.
        self.register_buffer("momentum_loss", torch.zeros(0))
        self.boost_weight = torch.zeros(0)
        self.epoch = 0

    def on_train_start(self, images: torch.Tensor, make_view: MakeView, generator: torch.Generator) -> None:
        super().on_train_start(images, make_view, generator)
        self.momentum_loss = torch.zeros(len(images), device=images.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if (saved := state_dict.get(prefix + "momentum_loss")) is not None:  # a resumed run: take the saved size
            self.momentum_loss = torch.zeros_like(saved, device=self.momentum_loss.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.epoch = epoch
        self.boost_weight = (boost_weights(self.momentum_loss) if epoch > 0
                             else torch.zeros_like(self.momentum_loss))

    def strength(self, weight: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """m = min + (30 - min) w u, in BCL's order of operations (memoboosted_cifar100.py); u = 1 for BCL-I."""
        return self.min_strength + (MAX_STRENGTH - self.min_strength) * weight * uniform

    def strength_uniforms(self, num_images: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """BCL-D's u ~ U(0, 1), one per image, shared by its views (BCL's ``np.random.rand(1)`` per __getitem__);
        ones for BCL-I."""
        if self.strength_drawn:
            return torch.rand(num_images, generator=generator, device=device)
        return torch.ones(num_images, device=device)

    def views(self, make_views: Callable[..., list[torch.Tensor]], images: torch.Tensor, generator: torch.Generator,
              rows: BatchRows, indices: torch.Tensor) -> list[torch.Tensor]:
        """SimCLR's views of the batch, each boosted by RandAugment at its image's w (both views the same w and m)."""
        weight = self.boost_weight[indices]
        uniform = self.strength_uniforms(len(weight), generator, weight.device)
        boost = RandAugment(self.num_ops, self.strength(weight, uniform), prob=weight)
        return make_views(images, generator, rows, boost=boost)

    def remember(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """M of the step's images, from the whole global batch's losses, so every process keeps the same memory."""
        batch = gather(indices)
        self.momentum_loss[batch] = momentum_loss_update(self.momentum_loss[batch], gather(losses), self.beta,
                                                         first_epoch=self.epoch == 0)

    def epoch_stats(self, labels: np.ndarray | None) -> dict[str, float]:
        """The mean w that the next epoch gives each third of the classes (labels watch, never train): does BCL
        boost the tail?"""
        if labels is None:
            return {}
        weight = boost_weights(self.momentum_loss).cpu().numpy()
        thirds = thirds_of_classes(np.bincount(labels))
        return {f"boost_weight_{third}": float(weight[np.isin(labels, classes)].mean())
                for third, classes in thirds.items()}


class BCLI(BoostedContrast, SimCLR):
    name = "bcl-i"
    display_name = "BCL-I"
    config_class = BCLIConfig
    # BCL's CIFAR command for BCL-I: SGD lr 0.5 at batch 512 (0.25 per 256), weight decay 5e-4, tau 0.2.
    defaults = OptimDefaults(name="sgd", base_lr=0.25, weight_decay=5e-4)
    num_ops, min_strength, strength_drawn = 1, 10.0, False

    def projection_head(self, feature_dim: int, cfg: BCLIConfig) -> nn.Module:
        return authors_head(feature_dim, cfg, num_layers=2)  # BCL's models/simclr.py proj_head


class BCLD(BoostedContrast, SDCLR):
    name = "bcl-d"
    display_name = "BCL-D"
    config_class = BCLDConfig
    # BCL's CIFAR command for BCL-D: SDCLR's, SGD lr 0.5 at batch 512, weight decay 1e-4, tau 0.2.
    defaults = OptimDefaults(name="sgd", base_lr=0.25, weight_decay=1e-4)
    num_ops, min_strength, strength_drawn = 2, 5.0, True
    head_layers = 2  # BCL's models/sdclr.py: proj_head(..., twoLayerProj=True), SDCLR's dual BN
