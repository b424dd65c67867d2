"""Frozen-backbone feature extraction for linear-probe and kNN evaluation."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn


def _batch_nchw(images: np.ndarray | Tensor, start: int, stop: int, device: torch.device) -> Tensor:
    """One uint8 NCHW batch on ``device``.

    Numpy input is NHWC (the on-disk cache layout); slicing before converting means a memmap
    only reads the rows of this batch instead of the whole array.
    """
    if isinstance(images, Tensor):
        batch = images[start:stop]
    else:
        batch = torch.from_numpy(np.array(images[start:stop])).permute(0, 3, 1, 2)
    return batch.to(device, non_blocking=True).contiguous()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: np.ndarray | Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Embed ``images`` with ``backbone`` in eval mode; returns float32 ``[N, D]`` on the CPU.

    ``images`` is uint8 NHWC numpy (may be a memmap) or a uint8 NCHW tensor. ``transform`` maps a
    uint8 NCHW batch already on ``device`` to the normalised float input the backbone expects.
    The backbone must already live on ``device``; it is not moved, so the caller's model is left
    where it was. Eval mode matters (BatchNorm running statistics, no dropout); the previous
    train/eval mode is restored afterwards so this can be called mid-training as a monitor.
    """
    if len(images) == 0:
        raise ValueError("extract_features needs at least one image")
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [
            backbone(transform(_batch_nchw(images, start, start + batch_size, device))).flatten(1).float().cpu()
            for start in range(0, len(images), batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)
