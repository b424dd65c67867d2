"""What the training loop asks of whatever it trains: an SSL method or a supervised classifier."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from imbssl.augment.views import BatchRows

#: makes one augmented view of a uint8 batch from a generator
MakeView = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class StepOutput:
    """A step's loss, a mean over the task's rows, and its statistics.

    ``weight`` is for a loss that is a weighted mean, sum_i w_i l_i / sum_i w_i (class-weighted CE): the sum of
    this process's w_i. Under several processes the loss is then shared by its part of the global weight rather
    than of the global rows, so that the gradient is the global batch's weighted mean's. None for a plain mean.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars; the engine syncs them rarely
    weight: torch.Tensor | None = None


class TrainingTask(nn.Module):
    """A model and its objective; ``training_step(views, indices)`` is what the engine calls each step.

    The hooks default to nothing and the batches to a random permutation of the images, so a task is
    just its ``training_step`` unless it needs more (an EMA teacher, a deferred re-weighting, a sampler).
    ``output_dim`` is the size of the vectors whose std (``stats["output_std"]``) the collapse monitor
    watches; a task that reports no ``output_std`` is not watched.
    """

    output_dim: int = 0
    #: whether ``gradient_clipping``'s norm bounds each parameter's gradient on its own (DINO's utils.clip_gradients)
    #: rather than the norm of all of them together (torch's clip_grad_norm_, MSN's)
    clips_each_tensor: bool = False

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one of every trainable parameter unless a part needs its own settings."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def epoch_batches(self, num_images: int, num_batches: int, epoch: int,
                      generator: torch.Generator) -> list[torch.Tensor]:
        """The epoch's batches of indices into the training images: near-equal batches of a random permutation,
        which cover every image once, so none is dropped and no tail batch is so small that BatchNorm
        statistics (or SimCLR's negatives) degenerate."""
        return list(torch.randperm(num_images, generator=generator, device=generator.device).tensor_split(num_batches))

    def views(self, make_views: Callable[..., list[torch.Tensor]], images: torch.Tensor, generator: torch.Generator,
              rows: BatchRows, indices: torch.Tensor) -> list[torch.Tensor]:
        """The step's training views of ``images``, this process's ``rows`` of the global batch (the training images
        at ``indices[rows.slice]``; ``indices``: the whole global batch's), drawn as in the views of the whole batch:
        the engine's augmentation, unless a task boosts it per image (BCL)."""
        return make_views(images, generator, rows)

    def on_train_start(self, images: torch.Tensor, make_view: MakeView, generator: torch.Generator) -> None:
        """Called once before the first step of a fresh run, not on resume: to initialise from the data."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based), on resume too: for settings that change at an epoch (DRW)."""

    def gradient_clipping(self) -> tuple[list[nn.Parameter], float] | None:
        """The parameters whose gradient norm the engine clips before each optimizer step, and that norm; None (the
        default) clips nothing. MSN clips its encoder as msn_train.py does; DINO each of its tensors
        (``clips_each_tensor``)."""
        return None

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """The task's per-step hyper-parameters, name -> one value for each of the run's ``total_steps`` steps
        (engine/schedules.py). Before each step the engine sets attribute ``name`` of the task to that step's value;
        a parameter group may follow one of them (``"wd_schedule": name``). None by default."""
        return {}

    def on_step_end(self) -> None:
        """Called after each optimizer step, with the step's scheduled values still set: EMA updates."""

    def epoch_stats(self, labels: np.ndarray | None) -> dict[str, float]:
        """Figures about the epoch just trained, added to its summary."""
        return {}
