"""Rotation prediction (Gidaris et al., ICLR 2018, "RotNet"): the SSP of CIFAR-LT in Yang & Xu (2020, Sec. 4.2).

An image x is shown rotated, R_r(x) with r x 90 degrees counter-clockwise, and a linear head on the backbone features
names the rotation r. Two forms, ``method.rotations``:

    all:  L = 1/(4B) sum_x sum_r CE(W f(R_r(x)) + b, r),  r = 0..3        (RotNet Sec. 2.1, K = 4 rotations)
    one:  L = 1/B    sum_x CE(W f(R_r(x)(x)) + b, r(x)),  one r per image  (Yang & Xu's pretrain_rot.py)

``all`` rotates one augmented view per image all four ways in the same batch, as RotNet's loader does
(gidariss/FeatureLearningRotNet, dataloader.py ``_load_function``: four copies, labels [0, 1, 2, 3]). ``one`` is the
reference form of "Rethinking the value of labels": its utils.py ``rotation`` turns each image once, by a label from
a shuffled list of 0, 1, 2, 3 repeated over the batch, so an epoch shows each image in one rotation, at a quarter of
the forward passes. ``one`` draws its labels in ``views``, from the step's generator after the crops, so a resumed
run and every process of a data-parallel run draw the same ones.

The head is linear, as in both references (RotNet's NIN ``Classifier``; pretrain_rot.py trains the network's own
``fc`` with num_classes=4): the rotation has to be linearly readable from f(x), so the backbone, which is what SSP
hands on, does the work, not a head that is thrown away.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from imbssl.augment.views import BatchRows
from imbssl.configbase import MethodSection
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std

NUM_ROTATIONS = 4


def rotate_four_ways(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[4B, C, H, W] images and [4B] labels: the batch rotated by r x 90 degrees for r = 0..3, rotation-major.

    Row r B + i is image i rotated by label r. torch.rot90 over (H, W) turns counter-clockwise for r > 0.
    """
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(len(x))
    return rotated, labels


def rotate_each(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] square images, image i turned by labels[i] x 90 degrees counter-clockwise: pretrain_rot.py's
    ``torch.rot90(inputs[i], target[i], [1, 2])`` for every i, batched (a gather, no host-device sync)."""
    turned = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(NUM_ROTATIONS)])
    return turned[labels, torch.arange(len(x), device=x.device)]


def balanced_rotation_labels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch] labels in 0..3 as pretrain_rot.py draws them (utils.py ``rotation``):
    ``np.random.permutation([0, 1, 2, 3] * (int(batch / 4) + 1))[:batch]``, each label about a quarter of the batch."""
    repeated = torch.arange(NUM_ROTATIONS, device=generator.device).repeat(batch // NUM_ROTATIONS + 1)
    return repeated[torch.randperm(len(repeated), generator=generator, device=generator.device)][:batch]


class RotationConfig(MethodSection):
    name: Literal["rotation"] = "rotation"
    rotations: Literal["all", "one"] = Field(
        "all", description="all = each view in all four rotations, 4B images a step (RotNet's loader); one = each "
                           "image in one rotation, drawn as Yang & Xu's pretrain_rot.py (utils.rotation: a shuffled "
                           "list of 0-3 repeated over the batch), B images a step")


class Rotation(SSLMethod):
    name = "rotation"
    display_name = "Rotation"
    config_class = RotationConfig
    # pretrain_rot.py: SGD, lr 0.1 at batch 128 (0.2 per 256 images under the linear scaling rule), wd 2e-4.
    defaults = OptimDefaults(name="sgd", base_lr=0.2, weight_decay=2e-4)
    num_views = 1

    def __init__(self, backbone: nn.Module, cfg: RotationConfig) -> None:
        super().__init__(backbone, backbone.feature_dim)  # the collapse monitor watches the features f(x)
        self.classifier = nn.Linear(backbone.feature_dim, NUM_ROTATIONS)
        self.rotations = cfg.rotations
        #: rotations "one": the labels of this process's rows of the step, drawn by ``views``, used by the step
        self.step_rotations: torch.Tensor | None = None

    def views(self, make_views: Callable[..., list[torch.Tensor]], images: torch.Tensor, generator: torch.Generator,
              rows: BatchRows, indices: torch.Tensor) -> list[torch.Tensor]:
        views = super().views(make_views, images, generator, rows, indices)
        if self.rotations == "one":  # drawn for the whole global batch, as its crops are
            self.step_rotations = balanced_rotation_labels(rows.size, generator)[rows.slice]
        return views

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        if self.rotations == "all":
            rotated, labels = rotate_four_ways(views[0])
        else:
            if self.step_rotations is None:
                raise RuntimeError("Rotation with rotations=one: the step's labels are drawn by views(); set "
                                   "step_rotations to call training_step alone")
            labels, self.step_rotations = self.step_rotations, None
            rotated = rotate_each(views[0], labels)
        features = self.backbone(rotated)
        logits = self.classifier(features)
        loss = F.cross_entropy(logits.float(), labels)
        return StepOutput(loss, {"output_std": output_std(features),
                                 "rotation_acc": (logits.detach().argmax(1) == labels).float().mean()})
