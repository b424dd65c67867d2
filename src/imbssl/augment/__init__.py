"""Batched, device-side augmentations: SSL views (:mod:`imbssl.augment.views`) and the supervised
pad-crop-flip (:mod:`imbssl.augment.supervised`)."""
from imbssl.augment.supervised import PadCropFlip
from imbssl.augment.views import MultiCrop, Normalize, ViewAugment, channel_stats

__all__ = ["MultiCrop", "Normalize", "PadCropFlip", "ViewAugment", "channel_stats"]
