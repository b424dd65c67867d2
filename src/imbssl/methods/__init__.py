"""SSL methods, one module each (heads, loss, step). ``build_method`` is the registry."""
from __future__ import annotations

from torch import nn

from imbssl.config import MethodConfig
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput
from imbssl.methods.excb import ExCB
from imbssl.methods.simclr import SimCLR, nt_xent
from imbssl.methods.simsiam import SimSiam, simsiam_loss

METHODS: dict[str, type[SSLMethod]] = {cls.name: cls for cls in (SimSiam, SimCLR, ExCB)}

__all__ = ["METHODS", "ExCB", "OptimDefaults", "SSLMethod", "SimCLR", "SimSiam", "StepOutput", "build_method",
           "nt_xent", "simsiam_loss"]


def build_method(cfg: MethodConfig, backbone: nn.Module) -> SSLMethod:
    return METHODS[cfg.name](backbone, cfg)
