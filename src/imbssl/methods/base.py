"""What every SSL method gives the training engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer


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
    """A backbone plus heads; ``training_step(views, indices)`` is what the engine calls each step.

    The hooks below default to nothing, so a method such as SimSiam is just its ``training_step``;
    ExCB uses them for its EMA teacher, centroid initialisation and weight-decay schedule.
    """

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

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one of every trainable parameter unless a part needs its own settings."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone that is saved and evaluated (an EMA teacher's, for methods that keep one)."""
        return self.backbone

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        """The heads saved beside ``eval_backbone``, named by the space they output (config.SPACES), in the order
        they follow it: what lets a pipeline read the method's outputs, not only its features."""
        return {}

    def on_train_start(self, images: torch.Tensor, make_view: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                       generator: torch.Generator) -> None:
        """Called once before the first step of a fresh run, not on resume: to initialise from the data.
        ``make_view`` makes one global view of a batch."""

    def on_step_end(self, step: int, total_steps: int, optimizer: Optimizer) -> None:
        """Called after each optimizer step, ``step`` counting from 0 over the whole run: EMA updates and
        per-step schedules the learning-rate scheduler does not cover."""

    def epoch_stats(self, labels: np.ndarray | None) -> dict[str, float]:
        """Figures about the epoch just trained, added to its summary. ``labels`` (of the training images, None
        when unknown) are for monitoring only: no method trains on them."""
        return {}


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalised outputs (SimSiam, Sec. 4.1).

    About 1/sqrt(d) for well spread outputs, 0 when every image maps to one point (collapse).
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
