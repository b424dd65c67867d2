"""MoCo v2 (He et al., CVPR 2020; Chen et al., 2020, "Improved baselines"): the SSP of ImageNet-LT and iNaturalist
in Yang & Xu (2020, Sec. 4.2). A query is told apart from a queue of keys of other images:

    q = normalize(g_q(f_q(x_q))),   k = normalize(g_k(f_k(x_k)))       two views of an image; no gradient to k
    L = -log( exp(q.k / tau) / (exp(q.k / tau) + sum_j exp(q.n_j / tau)) )      InfoNCE over the K queued keys n_j
                                                                                (MoCo Eq. 1)
    theta_k <- m theta_k + (1 - m) theta_q     after every optimizer step       (MoCo Eq. 2)

then the batch's keys replace the K oldest ones in the queue, first in first out (MoCo Sec. 3.2). v2 over v1: an MLP
head g (Linear-ReLU-Linear, no BatchNorm, as builder.py's ``mlp=True``), tau = 0.2, blur in the views, cosine lr.

Checked against facebookresearch/moco (moco/builder.py, the same file as YyzHarry/imbalanced-semi-self
moco/builder.py): the loss is asymmetric as there, x_q = views[0] is the only view that gets a gradient (the MoCo
CIFAR-10 demo's ``--symmetric`` option, which doubles the forward passes per step, is not followed). Departures:
the key encoder moves in ``on_step_end``, after the optimizer step, where builder.py moves it at the start of the
next forward, the same sequence of weights; and the queue is [K, d] with keys as rows and takes any batch size, where
builder.py keeps [d, K] and asserts that the batch divides K.

Several processes: keys are gathered from all of them before they are enqueued, so every process holds the same
queue. Shuffling BN (MoCo Sec. 3.3) is not implemented. It is a multi-process trick (each process computes its keys
on a different shuffle of the global batch); on one process there is nothing to shuffle across, but what it prevents
is still there: BatchNorm statistics shared within a batch can tell the current batch's key from the queued ones.
MoCo's CIFAR-10 demo imitates it on one GPU with a SplitBatchNorm and reports about 4 points of kNN accuracy lost
without it after 800 epochs.
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from imbssl.config import MethodConfig
from imbssl.engine.distributed import gather
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std

log = logging.getLogger(__name__)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """g = Linear-ReLU-Linear with biases and without BatchNorm (MoCo v2, builder.py with ``mlp=True``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


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


class MoCo(SSLMethod):
    """Evaluated, as the references do, through the query encoder: ``eval_backbone`` is f_q, the projector g_q."""

    name = "moco"
    # YyzHarry pretrain_moco.py: SGD, lr 0.015 at batch 128 (0.03 per 256 images, as MoCo's own code), wd 1e-4.
    defaults = OptimDefaults(name="sgd", base_lr=0.03, weight_decay=1e-4)

    def __init__(self, backbone: nn.Module, cfg: MethodConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.projector = mlp_head(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        # The key encoder starts as a copy of the query encoder and only moves by EMA (MoCo Eq. 2).
        self.key_encoder = nn.Sequential(OrderedDict(
            (part, copy.deepcopy(getattr(self, part))) for part in ("backbone", "projector")))
        self.key_encoder.requires_grad_(False)
        self.temperature, self.key_momentum = cfg.moco_temperature, cfg.key_momentum
        # Buffers, so checkpoints hold them and a resumed run contrasts against exactly the same keys.
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the slot of the oldest key

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x_q, x_k = views
        q = F.normalize(self.projector(self.backbone(x_q)), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_encoder(x_k), dim=1)
        # A copy of the queue: the loss's backward needs the keys it was computed with, enqueue overwrites them.
        logits = contrastive_logits(q, k, self.queue.clone(), self.temperature)
        self.enqueue(gather(k))
        return StepOutput(info_nce(logits), {"output_std": output_std(q),
                                             "instance_acc": (logits.detach().argmax(1) == 0).float().mean()})

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

    def on_step_end(self, step: int, total_steps: int, optimizer: Optimizer) -> None:
        self.update_key_encoder()

    @torch.no_grad()
    def update_key_encoder(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for the backbone and the head (MoCo Eq. 2), m constant."""
        query = [*self.backbone.parameters(), *self.projector.parameters()]
        torch._foreach_lerp_(list(self.key_encoder.parameters()), query, 1 - self.key_momentum)
