"""Rotation prediction (Gidaris et al., ICLR 2018, "RotNet"): the SSP of CIFAR-LT in Yang & Xu (2020, Sec. 4.2).

Every image x of the batch is shown in all four rotations R_r, r = 0..3 (r x 90 degrees counter-clockwise), and a
linear head on the backbone features names the rotation:

    L = 1/(4B) sum_x sum_r CE(W f(R_r(x)) + b, r)          (RotNet Sec. 2.1, K = 4 rotations)

One augmented view per image (crop + flip, no colour jitter) is rotated all four ways in the same batch, as RotNet's
loader does (gidariss/FeatureLearningRotNet, dataloader.py ``_load_function``: four copies, labels [0, 1, 2, 3]).
Yang & Xu's pretrain_rot.py instead rotates each image once, by a shuffled balanced label (utils.py ``rotation``),
so it sees each image in one rotation per epoch where this sees all four.

The head is linear, as in both references (RotNet's NIN ``Classifier``; pretrain_rot.py trains the network's own
``fc`` with num_classes=4): the rotation has to be linearly readable from f(x), so the backbone, which is what SSP
hands on, does the work, not a head that is thrown away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imbssl.config import MethodConfig
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std

NUM_ROTATIONS = 4


def rotate_four_ways(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[4B, C, H, W] images and [4B] labels: the batch rotated by r x 90 degrees for r = 0..3, rotation-major.

    Row r B + i is image i rotated by label r. torch.rot90 over (H, W) turns counter-clockwise for r > 0.
    """
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(len(x))
    return rotated, labels


class Rotation(SSLMethod):
    name = "rotation"
    # pretrain_rot.py: SGD, lr 0.1 at batch 128 (0.2 per 256 images under the linear scaling rule), wd 2e-4.
    defaults = OptimDefaults(name="sgd", base_lr=0.2, weight_decay=2e-4)
    num_views = 1

    def __init__(self, backbone: nn.Module, cfg: MethodConfig) -> None:
        super().__init__(backbone, backbone.feature_dim)  # the collapse monitor watches the features f(x)
        self.classifier = nn.Linear(backbone.feature_dim, NUM_ROTATIONS)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        rotated, labels = rotate_four_ways(views[0])
        features = self.backbone(rotated)
        logits = self.classifier(features)
        loss = F.cross_entropy(logits.float(), labels)
        return StepOutput(loss, {"output_std": output_std(features),
                                 "rotation_acc": (logits.detach().argmax(1) == labels).float().mean()})
