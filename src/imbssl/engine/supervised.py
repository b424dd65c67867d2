"""Long-tailed supervised training as a task of the one training loop (engine/trainer.py).

``LongTailClassifier`` is a backbone and a classifier trained on labels with a long-tailed loss. The
re-balancing schedules of the LDAM-DRW recipe are its epoch hooks:

- DRW (deferred re-weighting): class-balanced loss weights from ``defer_epoch`` on;
- DRS (deferred re-sampling): class-balanced batches from ``defer_epoch`` on;
- cRT (Kang et al. 2020): a frozen backbone and a new classifier, trained on class-balanced batches.

Checkpoints, logs, schedules, NaN checks, resume and data-parallel training are the SSL engine's, unchanged; a
class-weighted loss tells the engine its mean's weight (``StepOutput.weight``), so it splits over processes exactly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbssl.config import LossConfig
from imbssl.engine.task import StepOutput, TrainingTask
from imbssl.losses import (class_balanced_weights, cross_entropy, focal_loss, ldam_loss, ldam_margins,
                           logit_adjusted_loss)


class NormedLinear(nn.Module):
    """Cosine logits cos(x, w_c): the classifier LDAM's margins and scale are defined on (Cao et al. 2019)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) / in_dim ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


def class_balanced_batches(labels: Tensor, num_batches: int, generator: torch.Generator) -> list[Tensor]:
    """As many draws as images, each class equally likely and each image uniform within its class (Kang et al.
    2020, Sec. 3): image i is drawn with probability proportional to 1 / n_(y_i), with replacement."""
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()
    draws = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    return list(draws.tensor_split(num_batches))


class LongTailClassifier(TrainingTask):
    """``head(backbone(x))`` trained with ``loss_cfg`` on ``labels`` (one per training image, on the device).

    ``sample_weight`` (one per training image) scales each image's loss: omega of self-training's pseudo-labels.
    """

    def __init__(self, backbone: nn.Module, labels: Tensor, num_classes: int, loss_cfg: LossConfig,
                 freeze_backbone: bool = False, balanced_sampling: bool = False,
                 sample_weight: Tensor | None = None) -> None:
        super().__init__()
        self.backbone, self.cfg, self.num_classes = backbone, loss_cfg, num_classes
        head = NormedLinear if loss_cfg.name == "ldam" else nn.Linear
        self.head = head(backbone.feature_dim, num_classes)
        counts = torch.bincount(labels, minlength=num_classes).float()
        if (counts == 0).any():
            raise ValueError(f"classes {torch.flatnonzero(counts == 0).tolist()} have no training image")
        # Derived from the labels each run, so not saved: a checkpoint holds weights and optimizer state only.
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("sample_weight", sample_weight, persistent=False)
        self.register_buffer("prior", counts / counts.sum(), persistent=False)
        self.register_buffer("cb_weights", class_balanced_weights(counts, loss_cfg.beta), persistent=False)
        self.register_buffer("margins", ldam_margins(counts, loss_cfg.ldam_max_margin), persistent=False)
        self.frozen, self.always_balanced = freeze_backbone, balanced_sampling
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.on_epoch_start(0)  # sets class_weight and balanced_now, which every epoch sets anew

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    @property
    def logit_scale(self) -> float:
        """What the logits are multiplied by before a softmax: LDAM's s for its cosines, else 1."""
        return self.cfg.ldam_scale if self.cfg.name == "ldam" else 1.0

    def train(self, mode: bool = True) -> "LongTailClassifier":
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics too: cRT leaves it bit-identical
            self.backbone.eval()
        return self

    def deferred(self, epoch: int) -> bool:
        """Whether the deferred re-balancing (DRW or DRS) is on in ``epoch`` (0-based)."""
        return self.cfg.deferral != "none" and epoch >= self.cfg.defer_epoch

    def on_epoch_start(self, epoch: int) -> None:
        reweight = self.cfg.reweight == "cb" or (self.cfg.deferral == "drw" and self.deferred(epoch))
        self.class_weight = self.cb_weights if reweight else None
        self.balanced_now = self.always_balanced or (self.cfg.deferral == "drs" and self.deferred(epoch))

    def epoch_batches(self, num_images: int, num_batches: int, epoch: int, generator: torch.Generator) -> list[Tensor]:
        if self.balanced_now:
            return class_balanced_batches(self.labels, num_batches, generator)
        return super().epoch_batches(num_images, num_batches, epoch, generator)

    def loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        cfg, weight = self.cfg, self.class_weight
        if cfg.name == "focal":
            return focal_loss(logits, target, cfg.focal_gamma, weight, sample_weight, cfg.focal_form)
        if cfg.name == "ldam":
            return ldam_loss(logits, target, self.margins, cfg.ldam_scale, weight, sample_weight)
        if cfg.name == "logit_adjusted":
            return logit_adjusted_loss(logits, target, self.prior, cfg.la_tau, weight, sample_weight)
        return cross_entropy(logits, target, weight, sample_weight)

    def mean_weight(self, target: Tensor) -> Tensor | None:
        """sum_i w_yi, the denominator of the class-weighted losses' mean (CE, LDAM, LA: PyTorch's weighted mean);
        None where the loss is a plain mean over the images (no class weights, or focal, whose weights only scale
        its terms)."""
        if self.class_weight is None or self.cfg.name == "focal":
            return None
        return self.class_weight[target].sum()

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        logits, target = self(views[0]), self.labels[indices]
        sample_weight = None if self.sample_weight is None else self.sample_weight[indices]
        loss = self.loss(logits.float(), target, sample_weight)
        return StepOutput(loss, {"train_acc": (logits.argmax(1) == target).float().mean().detach() * 100},
                          weight=self.mean_weight(target))

    def epoch_stats(self, labels: np.ndarray | None) -> dict[str, float]:
        return {"class_weighted": float(self.class_weight is not None),
                "class_balanced_sampling": float(self.balanced_now)}
