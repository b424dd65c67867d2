"""The supervised CIFAR augmentation, batched on the device: random crop with zero padding, then a flip.

The LDAM-DRW recipe (Cao et al. 2019) builds it per image with torchvision in DataLoader workers:

    RandomCrop(32, padding=4) -> RandomHorizontalFlip -> ToTensor -> Normalize

Here the whole batch is cropped at once: each image's offset is drawn from the generator, and the
crop is one gather from the padded batch, so there is no per-image Python work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from imbssl.augment.views import BatchRows, Normalize, whole_batch


class PadCropFlip:
    """uint8 NCHW -> normalised float views: pad by ``pad`` zeros, crop back to the input size, flip with p=1/2.

    ``num_views`` views a call, each drawn anew: 1 for a classifier, or an SSL method's views with ``augment.crop:
    pad`` (Rotation as pretrain_rot.py feeds it)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, pad: int = 4, flip_prob: float = 0.5,
                 num_views: int = 1) -> None:
        self.normalize, self.pad, self.flip_prob, self.num_views = Normalize(mean, std), pad, flip_prob, num_views

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 rows: BatchRows | None = None) -> list[torch.Tensor]:
        return [self.global_view(images, generator, rows) for _ in range(self.num_views)]

    def global_view(self, images: torch.Tensor, generator: torch.Generator,
                    rows: BatchRows | None = None) -> torch.Tensor:
        """The view of ``images``, ``rows`` of a batch, each image cropped and flipped as in the whole batch's view."""
        rows = whole_batch(images, rows)
        offsets = torch.randint(0, 2 * self.pad + 1, (rows.size, 2), generator=generator,
                                device=images.device)[rows.slice]
        flip = (torch.rand(rows.size, generator=generator, device=images.device) < self.flip_prob)[rows.slice]
        batch, _, height, width = images.shape
        # Zero padding in pixel space is black, as torchvision pads the PIL image before ToTensor and Normalize.
        padded = F.pad(images, (self.pad,) * 4)
        ys = offsets[:, :1] + torch.arange(height, device=images.device)  # [B, H]
        xs = offsets[:, 1:] + torch.arange(width, device=images.device)  # [B, W]
        xs = torch.where(flip[:, None], xs.flip(1), xs)
        crops = padded[torch.arange(batch, device=images.device)[:, None, None], :, ys[:, :, None], xs[:, None, :]]
        return self.normalize(crops.permute(0, 3, 1, 2))  # the gather puts channels last: [B, H, W, C]
