"""Batched, device-side SimSiam/SimCLR augmentations (see :mod:`imbssl.augment.views`)."""
from imbssl.augment.views import MultiCrop, Normalize, ViewAugment, channel_stats

__all__ = ["MultiCrop", "Normalize", "ViewAugment", "channel_stats"]
