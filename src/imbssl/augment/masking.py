"""Masking of MSN's anchor views (Assran et al. 2022, Sec. 3): a random share of the patches is dropped.

A ViT drops patch tokens (``kept_tokens`` lists the ones it encodes). A CNN has no tokens, so its input
patches are zeroed instead (``mask_patches``, the cells of a grid outside the kept ones): a documented departure
that lets PMSN run on the same CNN as every other method. Both drop exactly ``round(ratio * patches)`` patches of
each image, as ``kept_tokens`` draws them.
"""
from __future__ import annotations

import math

import torch


def kept_tokens(batch: int, num_tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[batch, n_kept] sorted token indices, n_kept = num_tokens - round(ratio * num_tokens) (at least 1)."""
    n_kept = max(1, num_tokens - round(ratio * num_tokens))
    scores = torch.rand(batch, num_tokens, generator=generator, device=generator.device)
    return scores.argsort(dim=1)[:, :n_kept].sort(dim=1).values


def grid_cells(height: int, width: int, patch: int) -> int:
    """The cells of a ``patch``-pixel grid over a ``height`` x ``width`` image (the last row and column may be
    partial)."""
    return math.ceil(height / patch) * math.ceil(width / patch)


def mask_patches(images: torch.Tensor, kept: torch.Tensor, patch: int) -> torch.Tensor:
    """``images`` [B, C, H, W] with the cells of a ``patch``-pixel grid (row-major) outside ``kept`` [B, n_kept]
    set to 0 (the channel mean, on standardised images)."""
    batch, _, height, width = images.shape
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    keep = torch.zeros(batch, rows * cols, device=images.device, dtype=images.dtype)
    keep.scatter_(1, kept.to(images.device), 1.0)
    cells = keep.view(batch, 1, rows, cols).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return images * cells[:, :, :height, :width]
