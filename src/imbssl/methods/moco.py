"""MoCo v2 (He et al., CVPR 2020; Chen et al., 2020, "Improved baselines"): the SSP of ImageNet-LT and iNaturalist
in Yang & Xu (2020, Sec. 4.2). A query is told apart from a queue of keys of other images:

    q = normalize(g_q(f_q(x_q))),   k = normalize(g_k(f_k(x_k)))       two views of an image; no gradient to k
    L = -log( exp(q.k / tau) / (exp(q.k / tau) + sum_j exp(q.n_j / tau)) )      InfoNCE over the K queued keys n_j
                                                                                (MoCo Eq. 1)
    theta_k <- m theta_k + (1 - m) theta_q     after every optimizer step       (MoCo Eq. 2)

then the batch's keys replace the K oldest ones in the queue, first in first out (MoCo Sec. 3.2). v2 over v1: an MLP
head g (Linear-ReLU-Linear, no BatchNorm, as builder.py's ``mlp=True``), tau = 0.2, blur in the views, cosine lr.

Shuffling BN (MoCo Sec. 3.3). BatchNorm computes its statistics over a batch, so an image's query and its key, each
normalised with the statistics of a batch that holds the other, can be told apart from the queued keys by those
statistics: the model "cheats" the pretext task instead of learning features. The references break the link:

- across processes, moco/builder.py ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``: the key encoder sees a
  random permutation of the global batch, each process normalising its own part of it, and the keys are put back
  in order (``shuffle_global_batch`` / ``unshuffle_global_batch`` in engine/distributed.py);
- on one GPU, the CIFAR-10 demo (``colab/moco_cifar10_demo.ipynb``): BatchNorm over ``bn_splits`` groups of the
  batch (``SplitBatchNorm``), as ``bn_splits`` GPUs would compute it, in BOTH encoders, and the key encoder's batch
  in a random order (``_batch_shuffle_single_gpu``), so that an image's key is normalised in another group than its
  query. The demo reports about 4 points of kNN accuracy lost without it after 800 epochs.

imbssl does both: ``method.bn_splits`` (8, the demo's) counts the BatchNorm groups of the global batch, so on P
processes each normalises its rows in ``bn_splits / P`` groups (P = 8: builder.py's setting exactly), and
``method.shuffle_bn`` permutes the key encoder's global batch. The permutation is drawn from the epoch's generator
with the views (``views``), so it is the same on every process and again on resume.

Checked step by step against the CIFAR demo's ``ModelMoCo`` (tests/reference/test_ref_moco.py), with builder.py's
MLP head, and against builder.py's shuffle on two processes (tests/test_distributed.py). The loss is asymmetric as
in builder.py and in the demo as its notebook runs it (``args.symmetric = False``): x_q = views[0] is the only view
that gets a gradient. Departures: the key encoder moves in ``on_step_end``, after the optimizer step, where the
references move it at the start of the next forward, the same sequence of weights; the queue is [K, d] with keys as
rows and takes any batch size, where the references keep [d, K] and assert that the batch divides K; a
``SplitBatchNorm`` counts its training batches (``num_batches_tracked``) as BatchNorm does, where the demo's leaves
the counter at 0, and takes batches that do not split evenly (the trainer's near-equal batches), where the demo's
needs the batch to divide.

Several processes: keys are gathered from all of them before they are enqueued, so every process holds the same
queue.
"""
from __future__ import annotations

import logging
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from imbssl.augment.views import BatchRows
from imbssl.configbase import ProjectorSection
from imbssl.engine.distributed import gather_with_grad, shuffle_global_batch, unshuffle_global_batch, world_size
from imbssl.engine.ema import ema_teacher, ema_update
from imbssl.engine.schedules import constant_schedule
from imbssl.errors import ImbsslError
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std

log = logging.getLogger(__name__)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """g = Linear-ReLU-Linear with biases and without BatchNorm (MoCo v2, builder.py with ``mlp=True``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of ``num_splits`` groups of the global batch, each its own,
    as that many GPUs would compute them: the MoCo CIFAR-10 demo's SplitBatchNorm, shuffling BN on one process.

    Group g of a process's rows holds rows g, g + G, g + 2G, ... (G groups): the demo's grouping, which views
    [N, C, H, W] as [N / G, G * C, H, W]. On P processes, G = num_splits / P, so the global batch is always
    normalised in ``num_splits`` groups. The running statistics take each group's BatchNorm update from the same
    running values and average them over the groups, as the demo's. Outside training this is BatchNorm2d itself.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def local_splits(self) -> int:
        """G: this process's share of the global batch's groups."""
        processes = world_size()
        if self.num_splits % processes:
            raise ImbsslError(f"method.bn_splits={self.num_splits} is not a multiple of the {processes} "
                              f"processes: each process normalises its rows in bn_splits / processes "
                              f"BatchNorm groups; set it to {processes} for one group per process, as moco/builder.py")
        return self.num_splits // processes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.running_mean is None):  # the running statistics: nothing to split
            return super().forward(x)
        groups = self.local_splits()
        if groups == 1:
            return super().forward(x)
        if len(x) < groups:
            raise ImbsslError(f"a batch of {len(x)} images cannot be split into {groups} BatchNorm groups: lower "
                              f"method.bn_splits or raise optim.batch_size")
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Each group updates its own copy of the running statistics: rows of [G, C], averaged afterwards.
        tracked = self.training and self.running_mean is not None
        means = self.running_mean.repeat(groups) if tracked else None
        variances = self.running_var.repeat(groups) if tracked else None
        y = (self._even_groups(x, groups, means, variances, factor) if len(x) % groups == 0
             else self._uneven_groups(x, groups, means, variances, factor))
        if tracked:
            with torch.no_grad():
                self.running_mean.copy_(means.view(groups, -1).mean(0))
                self.running_var.copy_(variances.view(groups, -1).mean(0))
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)  # keep train.channels_last's layout for the next conv
        return y

    def _even_groups(self, x: torch.Tensor, groups: int, means: torch.Tensor | None, variances: torch.Tensor | None,
                     factor: float) -> torch.Tensor:
        """One BatchNorm over [N / G, G * C, H, W]: channel (g, c) holds channel c of the rows of group g."""
        n, c = x.shape[:2]
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        grouped = x.reshape(n // groups, groups * c, *x.shape[2:])
        return F.batch_norm(grouped, means, variances, weight, bias, True, factor, self.eps).reshape(x.shape)

    # Eager under train.compile: traced, its per-group slices of a batch size that changes make a dynamic-shape
    # recompile take minutes (over 10 on a 2-core CPU, where the even path's takes seconds).
    @torch.compiler.disable
    def _uneven_groups(self, x: torch.Tensor, groups: int, means: torch.Tensor | None,
                       variances: torch.Tensor | None, factor: float) -> torch.Tensor:
        """A batch that G does not divide: the same groups (rows g, g + G, ...), one BatchNorm each."""
        c = x.shape[1]
        parts = [F.batch_norm(x[g::groups], None if means is None else means.view(groups, c)[g],
                              None if variances is None else variances.view(groups, c)[g], self.weight, self.bias,
                              True, factor, self.eps) for g in range(groups)]
        grouped_rows = torch.cat([torch.arange(g, len(x), groups, device=x.device) for g in range(groups)])
        return torch.cat(parts)[torch.argsort(grouped_rows)]


def split_batchnorms(module: nn.Module, num_splits: int) -> nn.Module:
    """Every BatchNorm2d of ``module`` as a ``SplitBatchNorm`` holding the same parameter and buffer tensors, so the
    state_dict (and a saved backbone.pt) is unchanged; returns ``module``."""
    if type(module) is nn.BatchNorm2d:
        split = SplitBatchNorm(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(split, name, tensor)
        return split.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, split_batchnorms(child, num_splits))
    return module


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, 1 + K]: q.k / tau in column 0, then q.n_j / tau for the K queued keys: the exponents of MoCo Eq. 1.

    In float32 even under bf16 autocast: dividing by tau = 0.2 multiplies the rounding errors of the cosines by 5.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        return torch.cat([(q * k).sum(1, keepdim=True), q @ queue.float().T], dim=1) / temperature


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """L = -log( exp(l_0) / sum_j exp(l_j) ) averaged over the batch, the positive in column 0 (MoCo Eq. 1)."""
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class MoCoConfig(ProjectorSection):
    """CIFAR-sized defaults, as the MoCo CIFAR-10 demo has them. The MLP head is sized by proj_hidden and proj_dim
    (the papers: the feature size, then 128)."""

    name: Literal["moco"] = "moco"
    queue_size: int = Field(4096, ge=1, description="K, negative keys in the queue; 4096 suits CIFAR-sized sets "
                                                    "(MoCo's CIFAR-10 demo), 65,536 is the ImageNet value")
    key_momentum: float = Field(0.99, ge=0, lt=1, description="m of the key encoder, k <- m k + (1 - m) q; 0.99 for "
                                                              "CIFAR-sized sets, 0.999 is the ImageNet value")
    temperature: float = Field(0.2, gt=0, description="tau of the InfoNCE loss (v2: 0.2, v1: 0.07)")
    shuffle_bn: bool = Field(True, description="shuffling BN (MoCo Sec. 3.3): the key encoder sees the global batch "
                                               "in a random order, so an image's key and query are normalised with "
                                               "different images (across processes as moco/builder.py, within "
                                               "bn_splits groups as the CIFAR-10 demo); false = keys in the batch's "
                                               "own order")
    bn_splits: int = Field(8, ge=1, description="BatchNorm groups of the global batch in both encoders, the GPUs "
                                                "emulated (the CIFAR-10 demo's --bn-splits 8); under torchrun each "
                                                "process splits its rows into bn_splits / processes groups (a "
                                                "multiple of the process count); 1 = plain BatchNorm")


class MoCo(SSLMethod):
    """Evaluated, as the references do, through the query encoder: ``eval_backbone`` is f_q, the projector g_q."""

    name = "moco"
    display_name = "MoCo v2"
    config_class = MoCoConfig
    # YyzHarry pretrain_moco.py: SGD, lr 0.015 at batch 128 (0.03 per 256 images, as MoCo's own code), wd 1e-4.
    defaults = OptimDefaults(name="sgd", base_lr=0.03, weight_decay=1e-4)

    def __init__(self, backbone: nn.Module, cfg: MoCoConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.shuffle_bn, self.bn_splits = cfg.shuffle_bn, cfg.bn_splits
        if self.bn_splits > 1:  # both encoders, as the demo's ModelBase: its queries are split as its keys
            split_batchnorms(self.backbone, self.bn_splits)
        self.projector = mlp_head(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        # The key encoder starts as a copy of the query encoder and only moves by EMA (MoCo Eq. 2).
        self.key_encoder = ema_teacher(self, ("backbone", "projector"))
        self.split_layers = sum(isinstance(m, SplitBatchNorm) for m in self.modules())
        self.temperature, self.key_momentum = cfg.temperature, cfg.key_momentum
        # Buffers, so checkpoints hold them and a resumed run contrasts against exactly the same keys.
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the slot of the oldest key
        #: the permutation of the next step's global batch for the key encoder, drawn with its views
        self.key_order: torch.Tensor | None = None

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def views(self, make_views: Callable[..., list[torch.Tensor]], images: torch.Tensor, generator: torch.Generator,
              rows: BatchRows, indices: torch.Tensor) -> list[torch.Tensor]:
        """The engine's views, then the key encoder's order of the global batch, from the same generator: the same
        on every process, and the same again when a run resumes."""
        views = super().views(make_views, images, generator, rows, indices)
        if self.shuffle_bn:
            self.key_order = torch.randperm(rows.size, generator=generator, device=generator.device)
        return views

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x_q, x_k = views
        q = F.normalize(self.projector(self.backbone(x_q)), dim=1)
        with torch.no_grad():
            keys, mine = self.encode_keys(x_k)
        # A copy of the queue: the loss's backward needs the keys it was computed with, enqueue overwrites them.
        logits = contrastive_logits(q, keys[mine], self.queue.clone(), self.temperature)
        self.enqueue(keys)
        return StepOutput(info_nce(logits), {"output_std": output_std(q),
                                             "instance_acc": (logits.detach().argmax(1) == 0).float().mean()})

    @torch.no_grad()
    def encode_keys(self, x_k: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """The keys of the whole global batch, in its order, and where this process's images lie in it.

        With ``shuffle_bn`` the key encoder sees the global batch permuted (``key_order``, or a fresh
        torch.randperm as the references draw it, when no views were made for this step), each process its part
        of it, and the keys are put back in order: shuffling BN (MoCo Sec. 3.3).
        """
        if not self.shuffle_bn:
            return gather_with_grad(F.normalize(self.key_encoder(x_k), dim=1))
        order, self.key_order = self.key_order, None  # one step's order, used once
        shuffled, order, mine = shuffle_global_batch(x_k, order)
        return unshuffle_global_batch(F.normalize(self.key_encoder(shuffled), dim=1), order), mine

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """First in, first out: the keys overwrite the oldest ones from ``queue_ptr`` on, wrapping round modulo K."""
        size = len(self.queue)
        keys = keys[-size:]  # of a batch larger than the queue, only its newest K keys would stay anyway
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def on_train_start(self, images: torch.Tensor, make_view: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                       generator: torch.Generator) -> None:
        """Warns when the queue outnumbers the images: each image's own older keys then sit among its negatives."""
        if len(self.queue) > len(images):
            log.warning("MoCo's queue holds %d keys but there are %d training images, so every image's own older "
                        "keys are among its negatives; set method.queue_size below the number of images",
                        len(self.queue), len(images))

    def on_epoch_start(self, epoch: int) -> None:
        """Refuses a run whose split BatchNorms were converted away (train.sync_batchnorm), which would silently
        normalise the queries and keys of the global batch together again."""
        if sum(isinstance(m, SplitBatchNorm) for m in self.modules()) != self.split_layers:
            raise ImbsslError(f"method.bn_splits={self.bn_splits} needs MoCo's own split BatchNorm, which "
                              f"train.sync_batchnorm replaced; set method.bn_splits=1 to normalise over the "
                              f"global batch, or train.sync_batchnorm=false")

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """tau and the key encoder's m, constant (MoCo v2); optim.temperature_schedule may replace tau (TS)."""
        return {"temperature": constant_schedule(self.temperature, total_steps),
                "key_momentum": constant_schedule(self.key_momentum, total_steps)}

    def on_step_end(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for the backbone and the head (MoCo Eq. 2)."""
        ema_update(self.key_encoder, self, self.key_momentum)
