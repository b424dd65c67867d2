"""Batched, device-side SimSiam/SimCLR augmentations (see :mod:`imbssl.augment.views`)."""
from imbssl.augment.views import Normalize, ViewAugment, channel_stats

__all__ = ["Normalize", "ViewAugment", "channel_stats"]
