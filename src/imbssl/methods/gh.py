"""Geometric Harmonization, GH (Zhou et al., NeurIPS 2023, arXiv 2310.17622): a loss added to a contrastive method
(SimCLR, Focal, SDCLR, BCL) that asks for uniformity between categories, not only between samples, so that the head
classes stop taking over the embedding space while the tail's collapse. Its ``method.gh`` section turns it on for
any method of the SimCLR family (methods/simclr.py, ``ContrastiveSection``).

As MediaBrain-SJTU/Geometric-Harmonization at 9f7057c runs it (its paper is not in ../shared/papers, so each line
cites the code): train_cifar.py for the loop and the schedule, utils.py for the loss and the allocation,
target/gen_target.py for the target.

    M = sqrt(K/(K-1)) (I_K - 1 1^T / K) U,  U = polar(A),  A ~ N(0, 1)^{K x d}          (gen_target.py)
        the geometric uniform target: K unit rows at cosine -1/(K-1) to each other (a simplex equiangular tight
        frame) in the projection's d dimensions; K = --target_dim 100, d = 128. K <= d: gen_target.py asserts
        K <= d + 1, but at K = d + 1 its U has orthonormal columns, not rows, and M is no simplex
    t = (M z) / ||M z||                 a view's projection z scored against the K directions  (train_cifar.py)
    Q = diag(r) exp(T / eps)^T diag(c)  the surrogate labels: Sinkhorn-Knopp from c = 1/N, alternating
        r <- pi / (P c),  c <- (1/N) / (P^T r)  for --sinkhorn_iter 300 rounds, P = exp(T / eps)^T [K x N], so that
        the batch's N rows of T are shared out among the K directions in the proportions pi; q_i = N (Q^T)_i sums
        to 1; eps = 0.05; no gradient                                         (utils.py ``sinkhorn``, GHLoss(0.05))
    L_GH = -1/N sum_i [ q(t1)_i . log softmax(t2_i / g) + q(t2)_i . log softmax(t1_i / g) ],  g = 0.1
        each view learns the other view's allocation                                  (utils.py ``GHLoss.loss``)
    m_i <- beta m_i + (1 - beta) t1_i   each training image's momentum scores, from its first view: beta = 0 in
        the first epoch (m_i = t1_i), 0.9 until --warm_up, --beta 0.999 after                   (train_cifar.py)
    pi_k = #{i : argmax m_i = k} / #images    the population of each direction, re-estimated after every step of
        the warm-up's last epoch and of every 20th epoch                                       (train_cifar.py)
    L = L_contrastive + w L_GH,  w = 0 for the --warm_up epochs, then (e + 1 - warm_up) / --GH_warm_up up to 1
        (e the 0-based epoch)                                                                   (train_cifar.py)

For SDCLR, t1 comes from the dense network and t2 from the pruned one (train_cifar.py ``sdclr_GH``); BCL's
memory takes the contrastive loss alone (``--bcl``: ``loss_cl``).

imbssl generates M as gen_target.py does, from a seed (``target_seed``; their script draws unseeded, and their
shipped target/100_128_target.npy is one such draw: imbssl does not ship it). Any simplex ETF is any other turned
about the origin, which a learned projection absorbs.

Several processes: the allocation, the memory and pi are the global batch's (every process gathers it and keeps
the same memory); each process averages L_GH over its own images, so the engine's share-weighted sum is the
one-process loss.

The lr: their GH runs restart the cosine at the warm-up's end (utils.py ``lr_scheduler_warm``, 0.5 -> 0.3 over the
warm-up, then 0.3 -> 1e-6), their baselines do not. imbssl's GH takes the run's lr schedule, so that X and X+GH
differ in the loss alone; ``optim.lr_schedule: restart`` with ``milestones: [warm_up]`` and ``lr_factors: [0.6,
0.6]`` is theirs (engine/schedules.py ``restart_schedule``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from imbssl.configbase import ConfigError, Section


def geometric_uniform_target(k: int, d: int, seed: int) -> torch.Tensor:
    """M [k, d], gen_target.py's ``simplex_equiangular_tight_frame(k, d)`` after ``np.random.seed(seed)``: the same
    numbers. Unit rows, every pair at cosine -1/(k-1), summing to 0."""
    if k > d:
        raise ValueError(f"{k} directions drawn in {d} dimensions: the construction needs k <= d")
    w, _, vh = np.linalg.svd(np.random.RandomState(seed).randn(k, d), full_matrices=False)
    u = w @ vh  # A's polar factor, as scipy.linalg.polar computes it
    return torch.from_numpy(np.sqrt(k / (k - 1)) * (np.eye(k) - np.ones(k) / k) @ u).float()


def target_scores(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """t = (M z) / ||M z|| for each row of z [N, d]: [N, K]."""
    return F.normalize(z @ target.T, dim=1)


@torch.no_grad()
def surrogate_labels(scores: torch.Tensor, prior: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The allocation q [N, K] of N rows of scores among K directions in the proportions ``prior`` (normalised here),
    each row summing to 1: Sinkhorn-Knopp on exp(scores / epsilon), in utils.py ``sinkhorn``'s order of operations."""
    transport = torch.exp(scores / epsilon).T  # [K, N]
    k, n = transport.shape
    rows = (prior / prior.sum()).reshape(k, 1)
    cols = torch.full((n, 1), 1.0 / n, device=scores.device)
    for _ in range(iterations):
        scale = rows / (transport @ cols)
        cols = (1.0 / n) / (transport.T @ scale)
    return (scale * transport * cols.T).T * n


def gh_loss_per_image(t1: torch.Tensor, t2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Each image's L_GH: the cross-entropy of each view's softmax(t / temperature) against the other view's
    allocation q (utils.py ``GHLoss.loss``, whose batch mean of the two terms is the mean of these)."""
    return (-(q1 * F.log_softmax(t2 / temperature, dim=1)).sum(dim=1)
            - (q2 * F.log_softmax(t1 / temperature, dim=1)).sum(dim=1))


def estimated_prior(memory: torch.Tensor) -> torch.Tensor:
    """pi: the share of the images whose momentum scores peak at each direction."""
    counts = torch.bincount(memory.argmax(dim=1), minlength=memory.shape[1])
    return (counts.double() / counts.sum()).float()


class GHSection(Section):
    """The flags of train_cifar.py, under their names there, at the README's CIFAR-100-LT command (``--warm_up 500
    --target_dim 100``) and the argparse defaults; the constants the script writes in are keys too."""

    target_dim: int = Field(100, ge=2, description="K, the directions of the geometric uniform target "
                                                   "(--target_dim); at most the method's proj_dim")
    warm_up: int = Field(500, ge=1, description="epochs of the contrastive loss alone before GH joins it "
                                                "(--warm_up; README: 500 on CIFAR-100-LT, 400 on ImageNet-LT; must be "
                                                "below the run's epochs)")
    gh_warm_up: int = Field(10, ge=0, description="epochs over which GH's weight then rises linearly to 1 "
                                                  "(--GH_warm_up); 0 = at once")
    sinkhorn_iter: int = Field(300, ge=1, description="Sinkhorn rounds of the surrogate label allocation "
                                                      "(--sinkhorn_iter)")
    beta: float = Field(0.999, ge=0, lt=1, description="the momentum of each image's scores after the warm-up "
                                                       "(--beta)")
    warm_up_beta: float = Field(0.9, ge=0, lt=1, description="that momentum during the warm-up (train_cifar.py's "
                                                             "initial beta = 0.9)")
    epsilon: float = Field(0.05, gt=0, description="the allocation's entropic regulariser, exp(t / epsilon) "
                                                   "(train_cifar.py's GHLoss(0.05, ...))")
    temperature: float = Field(0.1, gt=0, description="the temperature of L_GH's softmax (utils.py GHLoss.loss's "
                                                      "gamma = 0.1)")
    prior_every: int = Field(20, ge=1, description="epochs between estimates of the directions' population pi after "
                                                   "the warm-up (train_cifar.py's (epoch + 1) % 20)")
    target_seed: int = Field(0, ge=0, description="the numpy seed of the target's Gaussian draw (gen_target.py's is "
                                                  "unseeded)")


def gh_schedules(cfg: GHSection, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """GH's per-step values: its weight w, the memory's momentum, and 1 where pi is estimated after the step."""
    epoch = np.arange(total_steps) // steps_per_epoch
    if cfg.warm_up >= (epochs := -(-total_steps // steps_per_epoch)):
        raise ConfigError(f"method.gh.warm_up {cfg.warm_up} leaves GH no epoch of a run of {epochs}: set it lower")
    on = epoch + 1 - cfg.warm_up  # epochs of GH so far, this one counted (<= 0 in the warm-up)
    weight = np.clip(on / cfg.gh_warm_up, 0, 1) if cfg.gh_warm_up else (on > 0).astype(float)
    momentum = np.select([epoch == 0, on <= 0], [0.0, cfg.warm_up_beta], cfg.beta)
    estimate = (on >= 0) & (((epoch + 1) % cfg.prior_every == 0) | (on == 0))
    return {"gh_weight": weight, "gh_momentum": momentum, "gh_estimate": estimate.astype(float)}


class GeometricHarmonization(nn.Module):
    """GH beside a contrastive method: the target M, each training image's momentum scores and pi, in buffers (a
    checkpoint holds them), and L_GH."""

    def __init__(self, cfg: GHSection, proj_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("target", geometric_uniform_target(cfg.target_dim, proj_dim, cfg.target_seed))
        # one row per training image, sized at the start of a run or by a checkpoint
        self.register_buffer("memory", torch.zeros(0, cfg.target_dim))
        self.register_buffer("prior", torch.zeros(cfg.target_dim))

    def reset(self, num_images: int) -> None:
        self.memory = torch.zeros(num_images, self.cfg.target_dim, device=self.target.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if (saved := state_dict.get(prefix + "memory")) is not None:  # a resumed run: take the saved size
            self.memory = torch.zeros_like(saved, device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, anchors: slice = slice(None)) -> torch.Tensor:
        """L_GH of the ``anchors`` among the batch's images (the projections z1, z2 of their two views), each
        allocated with the whole batch. In float32 even under bf16 autocast: exp(t / 0.05) multiplies the scores'
        rounding errors by 20, the softmax at 0.1 by 10."""
        with torch.autocast(z1.device.type, enabled=False):
            t1, t2 = target_scores(z1.float(), self.target), target_scores(z2.float(), self.target)
            q1, q2 = (surrogate_labels(t, self.prior, self.cfg.epsilon, self.cfg.sinkhorn_iter) for t in (t1, t2))
            return gh_loss_per_image(t1[anchors], t2[anchors], q1[anchors], q2[anchors], self.cfg.temperature)

    @torch.no_grad()
    def remember(self, indices: torch.Tensor, z1: torch.Tensor, momentum: float, estimate: bool) -> None:
        """m <- momentum m + (1 - momentum) t1 for the images at ``indices``; then pi from every image's m, if
        ``estimate``."""
        with torch.autocast(z1.device.type, enabled=False):
            scores = target_scores(z1.float(), self.target)
        self.memory[indices] = momentum * self.memory[indices] + (1.0 - momentum) * scores
        if estimate:
            self.prior = estimated_prior(self.memory)
