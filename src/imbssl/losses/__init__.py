"""Supervised losses for long-tailed classification."""
from imbssl.losses.longtail import (class_balanced_weights, cross_entropy, focal_loss, ldam_loss, ldam_margins,
                                    logit_adjusted_loss, posthoc_logit_adjustment)

__all__ = ["class_balanced_weights", "cross_entropy", "focal_loss", "ldam_loss", "ldam_margins",
           "logit_adjusted_loss", "posthoc_logit_adjustment"]
