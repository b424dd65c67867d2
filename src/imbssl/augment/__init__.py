"""Batched, device-side augmentations: SSL views (:mod:`imbssl.augment.views`) and the supervised
pad-crop-flip (:mod:`imbssl.augment.supervised`)."""
from imbssl.augment.supervised import PadCropFlip
from imbssl.augment.views import (BatchRows, MultiCrop, Normalize, ViewAugment, channel_histogram, channel_stats,
                                  stats_from_histogram)

__all__ = ["BatchRows", "MultiCrop", "Normalize", "PadCropFlip", "ViewAugment", "channel_histogram", "channel_stats",
           "stats_from_histogram"]
