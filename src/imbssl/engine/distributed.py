"""Data-parallel training across processes (launched by torchrun): the process group and what crosses processes.

Every operation here is the identity on one process (torch.distributed not initialised), so the engine and the
methods call them unconditionally.

How a step is shared (docs/scale-out.md): every process draws the same seeded global batch, takes its contiguous
rows of it (``rank_rows``) and weights its loss by its share of the batch; the gradients are then summed over
processes (``sum_gradients``), which makes them the gradient of the loss of the whole global batch. Whatever couples
the images of a batch crosses processes too: BatchNorm statistics (``convert_sync_batchnorm``), SimCLR's negatives
(``gather_with_grad``), ExCB's cluster histogram (``sum_over_processes``), MoCo's keys (``gather``), MSN's mean
prediction (``batch_mean_with_grad``) and masks (``place_in_global_batch``).
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_gather, all_reduce

from imbssl.augment.views import BatchRows
from imbssl.errors import ImbsslError, ProcessLost

# torch 2.13 deprecates these differentiable collectives in favour of a private module
# (torch.distributed._functional_collectives); the public ones are kept until they go, without the warning.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, metrics and the run's files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- the process group -----------------------------------------------------------------------------
@contextmanager
def process_group(device: str, timeout_s: float) -> Iterator[None]:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for the
    block, NCCL when ``device`` (``train.device``) is CUDA and gloo otherwise; does nothing for a single process.

    A collective that waits ``timeout_s`` for a process that crashed or hangs fails instead of waiting forever, so a
    dead rank stops the job. Processes other than rank 0 log warnings and errors only.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        yield
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:  # "cuda" is then this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    package_log = logging.getLogger("imbssl")
    level = package_log.level
    if not is_main():
        package_log.setLevel(logging.WARNING)
    try:
        yield
    except RuntimeError as err:
        if (lost := lost_connection(err)) is None:
            raise
        raise ProcessLost(f"another process of this torchrun job stopped ({lost}); its own error, or torchrun's "
                          f"summary, says why") from err
    finally:
        package_log.setLevel(level)
        dist.destroy_process_group()


#: what gloo and NCCL report when the process at the other end of a collective has died
_CONNECTION_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_connection(err: BaseException) -> str | None:
    """The phrase by which ``err`` says that a collective lost another process of the job; None for other errors."""
    if not isinstance(err, RuntimeError):
        return None
    return next((phrase for phrase in _CONNECTION_LOST if phrase in str(err)), None)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do: it fills a cache that they then only read.

    Should rank 0 fail in the block, the others still go on, and fail in it with the same message.
    """
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


T = TypeVar("T")


def main_only(work: Callable[..., T]) -> Callable[..., T | None]:
    """``work`` (an evaluation, a report) run by rank 0 alone while the other processes wait for it; they get None.

    A recipe under torchrun trains every run data-parallel and evaluates and reports on rank 0: the others must not
    race ahead to the next run's collectives while rank 0 still writes this one's files, which they read next.
    """
    @functools.wraps(work)
    def on_main(*args, **kwargs) -> T | None:
        try:
            return work(*args, **kwargs) if is_main() else None
        finally:
            barrier()
    return on_main


def require_one_process(what: str) -> None:
    """Refuse ``what`` under torchrun: parts that are not data-parallel would deadlock in the process group."""
    if world_size() > 1:
        raise ImbsslError(f"{what} runs on one process only; start it without torchrun (docs/scale-out.md)")


# -- sharing the global batch ----------------------------------------------------------------------
def rank_rows(batch_size: int) -> BatchRows:
    """This process's rows of a global batch: its contiguous part as ``tensor_split(world_size)[rank]`` cuts it
    (the first ``batch_size % world_size`` processes take one row more)."""
    size, extra = divmod(batch_size, world_size())
    start = rank() * size + min(rank(), extra)
    return BatchRows(batch_size, start, start + size + (rank() < extra))


def sum_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Every gradient summed over processes, in one all-reduce of them all flattened together.

    An explicit all-reduce rather than DistributedDataParallel: a method's ``training_step`` is not one ``forward``
    (ExCB and MSN run several, plus an EMA teacher), so DDP's reducer would have to be told which parameters each
    step leaves unused; the cost is that communication does not overlap the backward pass.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))


@torch.no_grad()
def broadcast_from_main(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process: a process whose initialisation differed by a rounding (a
    k-means on more threads, a non-deterministic kernel) would otherwise train a model of its own, silently."""
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


# -- what methods exchange -------------------------------------------------------------------------
def sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over all processes (no gradient); ``x`` itself on one process."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


def batch_mean_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(0)`` over the rows of every process together, the gradient flowing back to every process's rows
    (MSN's mean prediction p_bar): the global batch's mean however unevenly it is split. One all-reduce of the
    row sums and the row count together."""
    if not is_distributed():
        return x.mean(0)
    total = all_reduce(torch.cat([x.sum(0).flatten(), x.new_tensor([len(x)])]))
    return (total[:-1] / total[-1]).view(x.shape[1:])


@torch.no_grad()
def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """``batch_mean_with_grad`` without the gradient (DINO's centre)."""
    return batch_mean_with_grad(x)


def _row_counts(rows: int, device: torch.device) -> list[int]:
    """How many rows each process holds, in rank order."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows], device=device))
    return [int(c) for c in counts]


def place_in_global_batch(rows: int, device: torch.device) -> tuple[int, slice]:
    """(the global batch's size, where this process's ``rows`` lie in it) when each process holds contiguous rows
    in rank order; ``(rows, all of them)`` on one process. For what a method draws per image itself (MSN's masks):
    drawn for the global batch and sliced, it does not depend on how the batch is split."""
    if not is_distributed():
        return rows, slice(0, rows)
    counts = _row_counts(rows, device)
    start = sum(counts[:rank()])
    return sum(counts), slice(start, start + rows)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every process's rows of ``x`` concatenated in rank order (with contiguous slices: the global batch in order),
    and where this process's own rows lie in it; ``(x, all of x)`` on one process.

    The gradient reaching each row flows back to the process that holds it (SimCLR's negatives). Processes may hold
    different numbers of rows: each pads to the largest count for the all-gather, which needs equal shapes.
    """
    if not is_distributed():
        return x, slice(0, len(x))
    counts = _row_counts(len(x), x.device)
    padded = torch.cat([x, x.new_zeros(max(counts) - len(x), *x.shape[1:])])
    parts = [part[:count] for part, count in zip(all_gather(padded), counts)]
    start = sum(counts[:rank()])
    return torch.cat(parts), slice(start, start + len(x))


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """``gather_with_grad`` without the gradient, for values such as MoCo's keys; ``x`` itself on one process."""
    return gather_with_grad(x)[0]


@torch.no_grad()
def shuffle_global_batch(x: torch.Tensor,
                         order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """MoCo's shuffling BN, first half (moco/builder.py ``_batch_shuffle_ddp``): every process's rows of ``x``
    gathered into the global batch, permuted by rank 0's ``order`` (broadcast, so every process uses the same; None:
    a fresh ``torch.randperm``, as builder.py draws it), and this process's part of the permuted batch, as many rows
    as it holds itself. Returns (those rows, the order, where this process's own rows lie in the global batch).

    builder.py needs equal parts; here processes may hold one row more or less, as ``gather_with_grad`` allows. On
    one process: ``(x[order], order, all of x)``, without communication.
    """
    everything, mine = gather_with_grad(x)
    if order is None:
        order = torch.randperm(len(everything), device=x.device)
    if len(order) != len(everything):
        raise ValueError(f"a permutation of {len(order)} rows for a global batch of {len(everything)}")
    if is_distributed():
        order = order.to(x.device, copy=True)
        dist.broadcast(order, 0)
    return everything[order[mine]], order, mine


@torch.no_grad()
def unshuffle_global_batch(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffling BN, second half (builder.py ``_batch_unshuffle_ddp``): the rows each process computed from its
    part of the batch that ``shuffle_global_batch`` permuted by ``order``, gathered and put back in the global
    batch's order. All of them: builder.py keeps this process's own, ``[mine]`` of this; MoCo's queue takes every
    key. On one process: ``y[argsort(order)]``."""
    return gather(y)[torch.argsort(order.to(y.device))]


# -- BatchNorm over the global batch ---------------------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose statistics are those of the global batch, for CPU processes (gloo), where torch's
    SyncBatchNorm refuses to run ("expected input tensor to be on GPU").

    The mean, then the biased variance of the centred inputs, are each summed over processes by a differentiable
    all-reduce (two passes, as BatchNorm's own kernel, for the same rounding); the running statistics follow
    BatchNorm's update exactly, with the unbiased variance of the global count. Outside training, or on one process,
    this is BatchNorm itself.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [N, C, ...], got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or self.running_mean is None
        if not (uses_batch_stats and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 activations: statistics in float32
        total = all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / xf.shape[1]])]))
        mean, count = total[:-1] / total[-1], total[-1]
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As ``_BatchNorm.forward``: an EMA with ``momentum``, or the cumulative mean when momentum is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` (affine or not) normalising over the global batch: torch's SyncBatchNorm on
    CUDA, ``GlobalBatchNorm`` elsewhere. Parameters and buffers are kept (the same tensors), so an optimizer built
    afterwards, or a state_dict, sees no difference; on one process both are plain BatchNorm."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_batchnorm(module)


def batchnorm_per_process(module: nn.Module) -> bool:
    """Whether a BatchNorm of ``module`` normalises each process's part of the batch: the run then depends on the
    number of processes (SyncBatchNorm and GlobalBatchNorm normalise the global batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm))
               for m in module.modules())


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(converted, name, tensor)
        return converted.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, _to_global_batchnorm(child))
    return module
