"""What crosses processes when training is distributed: every operation here is the identity on one process
(torch.distributed not initialised), so a method calls them unconditionally."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all processes when training is distributed; ``x`` itself otherwise."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def mean_over_processes_with_grad(x: torch.Tensor) -> torch.Tensor:
    """As ``mean_over_processes``, but the gradient flows back to every process's ``x`` (MSN's mean prediction)."""
    if is_distributed():
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x) / dist.get_world_size()
    return x


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0 in rank order; ``tensor`` itself on one process.

    all_gather carries no gradient, hence no_grad: this is for values such as MoCo's keys, never for a loss.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
