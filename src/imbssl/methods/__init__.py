"""SSL methods, one module each (its config section, heads, loss, step). ``METHODS`` is the registry: a new method is
its module and an entry there, which also gives run configs its ``method`` section (``MethodConfig``)."""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag
from torch import nn

from imbssl.configbase import MethodSection
from imbssl.engine.task import StepOutput
from imbssl.methods.align_uniform import AlignUniform
from imbssl.methods.barlow_twins import BarlowTwins
from imbssl.methods.base import OptimDefaults, SSLMethod
from imbssl.methods.bcl import BCLD, BCLI, boost_weights, momentum_loss_update
from imbssl.methods.byol import BYOL
from imbssl.methods.dino import DINO
from imbssl.methods.excb import ExCB
from imbssl.methods.focal import Focal
from imbssl.methods.moco import MoCo, info_nce
from imbssl.methods.msn import MSN, msn_loss, prior_matching
from imbssl.methods.rotation import Rotation, rotate_four_ways
from imbssl.methods.sdclr import SDCLR, global_magnitude_masks
from imbssl.methods.simclr import SimCLR, nt_xent
from imbssl.methods.simsiam import SimSiam, simsiam_loss
from imbssl.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {cls.name: cls for cls in (SimSiam, SimCLR, ExCB, Rotation, MoCo, MSN, SDCLR,
                                                                  BCLI, BCLD, AlignUniform, BYOL, DINO,
                                                                  BarlowTwins, VICReg, Focal)}
#: each method's ``method`` section, by name
SECTIONS: dict[str, type[MethodSection]] = {name: cls.config_class for name, cls in METHODS.items()}
#: the method of a ``method`` section that names none
DEFAULT_METHOD = "simsiam"


def _section_name(section: Any) -> Any:
    """The tag of a ``method`` section: its name, or DEFAULT_METHOD for a mapping that leaves it out."""
    return section.get("name", DEFAULT_METHOD) if isinstance(section, dict) else getattr(section, "name", None)


#: a run config's ``method``: the section of the method its ``name`` names, holding that method's keys alone
MethodConfig = Annotated[Union[tuple(Annotated[section, Tag(name)] for name, section in SECTIONS.items())],
                         Discriminator(_section_name, custom_error_type="method_name",
                                       custom_error_message=f"not one of the methods {', '.join(METHODS)}")]

__all__ = ["AlignUniform", "BarlowTwins", "BCLD", "BCLI", "BYOL", "DEFAULT_METHOD", "DINO", "Focal", "METHODS", "MSN",
           "SECTIONS", "SDCLR", "VICReg", "ExCB", "MethodConfig", "MoCo", "OptimDefaults", "Rotation", "SSLMethod",
           "SimCLR", "SimSiam", "StepOutput",
           "boost_weights", "build_method", "global_magnitude_masks", "info_nce", "momentum_loss_update", "msn_loss",
           "nt_xent", "prior_matching", "rotate_four_ways", "simsiam_loss"]


def build_method(cfg: MethodConfig, backbone: nn.Module) -> SSLMethod:
    return METHODS[cfg.name](backbone, cfg)
