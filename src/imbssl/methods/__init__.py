"""SSL methods, one module each (heads, loss, step). ``build_method`` is the registry."""
from __future__ import annotations

from torch import nn

from imbssl.config import MethodConfig
from imbssl.engine.task import StepOutput
from imbssl.methods.base import OptimDefaults, SSLMethod
from imbssl.methods.bcl import BCLD, BCLI, boost_weights, momentum_loss_update
from imbssl.methods.excb import ExCB
from imbssl.methods.moco import MoCo, info_nce
from imbssl.methods.msn import MSN, msn_loss, prior_matching
from imbssl.methods.rotation import Rotation, rotate_four_ways
from imbssl.methods.sdclr import SDCLR, global_magnitude_masks
from imbssl.methods.simclr import SimCLR, nt_xent
from imbssl.methods.simsiam import SimSiam, simsiam_loss

METHODS: dict[str, type[SSLMethod]] = {cls.name: cls for cls in (SimSiam, SimCLR, ExCB, Rotation, MoCo, MSN, SDCLR,
                                                                  BCLI, BCLD)}

__all__ = ["BCLD", "BCLI", "METHODS", "ExCB", "MSN", "MoCo", "OptimDefaults", "Rotation", "SDCLR", "SSLMethod",
           "SimCLR", "SimSiam", "StepOutput", "boost_weights", "build_method", "global_magnitude_masks", "info_nce",
           "momentum_loss_update", "msn_loss", "nt_xent", "prior_matching", "rotate_four_ways", "simsiam_loss"]


def build_method(cfg: MethodConfig, backbone: nn.Module) -> SSLMethod:
    return METHODS[cfg.name](backbone, cfg)
