"""What every SSL method gives the training engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OptimDefaults:
    """A method's optimizer settings from the papers (Table 1 of the offline-clustering paper)."""

    name: str
    base_lr: float
    weight_decay: float


@dataclass
class StepOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars; the engine syncs them rarely


class SSLMethod(nn.Module):
    """A backbone plus heads; ``training_step(views, indices)`` is all the engine calls."""

    name: ClassVar[str]
    defaults: ClassVar[OptimDefaults]
    num_views: ClassVar[int] = 2  # global views per image
    uses_local_crops: ClassVar[bool] = False  # whether training_step accepts multi-crop local views

    def __init__(self, backbone: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_dim = output_dim  # size of the vectors whose std the collapse monitor watches

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        raise NotImplementedError


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalised outputs (SimSiam, Sec. 4.1).

    About 1/sqrt(d) for well spread outputs, 0 when every image maps to one point (collapse).
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
