"""Signs that a run diverged although its loss stayed finite, so the NaN guard never fired.

SimSiam at base_lr=1e6 on digits trains to a finite loss while its BatchNorm running variances reach
1e12 and its weights grow 500x; the linear probe still reads 82% (it rescales any features) while
k-NN, which compares raw distances, falls to 41%. A healthy run of the same config keeps its running
variances below 0.5 and its weight norm at its initial value, so the limits below leave a wide margin.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BN_VARIANCE_LIMIT = 1e4
NORM_GROWTH_LIMIT = 10.0
PROBE_GAP_LIMIT = 30.0  # percentage points of top-1 between the linear probe and the best k-NN


def weight_norm(module: nn.Module) -> float:
    """l2 norm of all floating-point parameters together."""
    return torch.sqrt(sum((p.detach().float() ** 2).sum() for p in module.parameters())).item()


def divergence_signs(module: nn.Module, reference_norm: float) -> list[str]:
    """What is abnormal about ``module``'s weights and BatchNorm statistics; empty when nothing is."""
    signs = []
    variances = [m.running_var.max().item() for m in module.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]
    if variances and max(variances) > BN_VARIANCE_LIMIT:
        signs.append(f"BatchNorm running variance reaches {max(variances):.2g} (limit {BN_VARIANCE_LIMIT:g})")
    growth = weight_norm(module) / reference_norm
    if growth > NORM_GROWTH_LIMIT:
        signs.append(f"the weight norm is {growth:.0f}x its initial value (limit {NORM_GROWTH_LIMIT:g}x)")
    return signs


def probe_disagreement(linear_top1: float, knn_top1: dict[str, float]) -> str | None:
    """A linear probe far above every k-NN: the features carry the classes only after rescaling."""
    best = max(knn_top1, key=knn_top1.get)
    gap = linear_top1 - knn_top1[best]
    if gap < PROBE_GAP_LIMIT:
        return None
    return f"the linear probe ({linear_top1:.1f}%) reads {gap:.0f} points above {best} ({knn_top1[best]:.1f}%)"


class DivergenceWatch:
    """Epoch callback: warns, once per run, when ``module`` shows divergence signs (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.reference_norm, self.warned = module, weight_norm(module), False

    def __call__(self, epoch: int, summary: dict) -> None:
        signs = [] if self.warned else divergence_signs(self.module, self.reference_norm)
        if signs:
            self.warned = True
            log.warning("the run is diverging at epoch %d although the loss is finite: %s; try a lower learning "
                        "rate", epoch, "; ".join(signs))
