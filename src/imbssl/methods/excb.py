"""ExCB (Maniadis Metaxas et al., ECCV 2024): online clustering with explicit cluster balancing.

A student learns the cluster assignments an EMA teacher gives other views of the same image:

    z_s^h = q_s(h_s(f_s(x))),   z_s^g = q̄_s(g_s(h_s(f_s(x))))       cosine to K centroids (Eq. 1-2)
    z_t = q_t(h_t(f_t(x))),     z_t^B = B(z_t; s)                    teacher, balanced (Eq. 3-4)
    p = softmax(z / tau),       tau_s for the student, tau_t for the teacher             (Eq. 5-6)
    L = 1/2 H(p_t, p_s^h) over the other views + 1/2 H(p_t, p_s^g) over all views         (Eq. 7)

s, the relative size of each cluster, is an EMA of the teacher's hard-assignment histogram (Eq. 8-9).
B raises the similarities to undersized clusters and lowers those to oversized ones (Eq. 10), so the
teacher spreads its assignments without needing a large batch. "Undersized" is relative to a target t,
the paper's 1/K or any cluster prior (``method.prior``, priors.py; docs/priors.md). ``method.balancing`` swaps B
for DINO's centring or for nothing: the two baselines are this module with one setting changed. The EMA teacher, the
multi-crop cross-entropy and the centring are DINO's (engine/ema.py, methods/dino.py). Where imbssl's
defaults differ from the official code, ``method.proj_hidden_layers``, ``head_batches`` and ``pairing`` give the
code's form, which the paper presets set (docs/excb.md, "What differs").
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from imbssl.configbase import ProjectorSection
from imbssl.engine.distributed import gather, sum_over_processes
from imbssl.engine.ema import ema_teacher, ema_update
from imbssl.engine.schedules import cosine_schedule, ema_momentum_schedule
from imbssl.engine.task import MakeView
from imbssl.eval import cluster_statistics
from imbssl.methods.base import (OptimDefaults, SSLMethod, StepOutput, kmeans_of_one_view, output_std,
                                 weight_decay_groups)
from imbssl.methods.dino import centre, cross_entropies, multi_crop_loss, other_view_terms
from imbssl.models.heads import CosineCentroids, mlp
from imbssl.priors import PriorConfig, cluster_prior, uniform_prior

#: the schedule of the centroids' weight decay (Sec. 4.1), which their optimizer group follows.
CENTROID_DECAY = "centroid_weight_decay"


# -- balancing operator B (Eq. 10) --------------------------------------------------------------
def balance_by_cases(z: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B(z; s) written as Eq. 10, with the uniform 1/K generalised to a per-cluster target size t.

        z^B = 1 - (1 - z) s/t      if s < t     (undersized: the cosine distance shrinks, z^B -> 1 at s = 0)
              (1 + z) t/s - 1      if s > t     (oversized: 1 + z shrinks, z^B -> -1 as s -> 1 for large K)
              z                    otherwise

    The readable definition; ``balance`` computes the same without branches.
    """
    ratio = sizes / target
    undersized = 1 - (1 - z) * ratio
    oversized = (1 + z) / ratio - 1
    return torch.where(ratio < 1, undersized, torch.where(ratio > 1, oversized, z))


def balance(z: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B(z; s) as Algorithm 1 computes it: two factors, each 1 except on its side of the target.

    1 - relu(1 - s/t) is s/t below the target and 1 above it; 1 - relu(1 - t/s) is t/s above and 1
    below (t/s = inf at s = 0 gives relu(-inf) = 0, no NaN). Algorithm 1 as printed starts with
    ``1 + (1 - z_t) * ...``; the minus sign here is that of Eq. 10 and of the official code.
    """
    ratio = sizes / target
    z = 1 - (1 - z) * (1 - F.relu(1 - ratio))  # s < t
    return (1 + z) * (1 - F.relu(1 - 1 / ratio)) - 1  # s > t


# -- loss (Eq. 7) and training statistics (Eq. 11-12) -------------------------------------------
def excb_loss(p_teacher: torch.Tensor, z_proj: torch.Tensor, z_pred: torch.Tensor,
              student_temperature: float, pairing: str = "paper") -> torch.Tensor:
    """Eq. 7 with each double sum averaged over its view pairs, so the loss does not scale with G and L.

    ``p_teacher`` [G, B, K] are the teacher's assignments of the global views; ``z_proj``, ``z_pred`` [V, B, K]
    the student's similarities for all V views, global ones first. The projector term skips x'' = x'.
    ``pairing`` "code" is the official code's instead (``excb_loss_as_code``). The projector term is DINO's loss
    (Eq. 3 there).
    """
    if pairing == "code":
        return excb_loss_as_code(p_teacher, z_proj, z_pred, student_temperature)
    pred_terms = cross_entropies(p_teacher, z_pred / student_temperature)
    return multi_crop_loss(p_teacher, z_proj / student_temperature) / 2 + pred_terms.mean() / 2


def excb_loss_as_code(p_teacher: torch.Tensor, z_proj: torch.Tensor, z_pred: torch.Tensor,
                      student_temperature: float) -> torch.Tensor:
    """The loss of the official code (ManiadisG/ExCB, ClusteringLoss with its ``training_match``): teacher view x'
    against the projector output of each OTHER GLOBAL view and the predictor output of every view, one mean over
    all these G (G - 1) + G V pairs. The local views meet the teacher through the predictor alone, where Eq. 7 and
    Algorithm 1 pair their projector outputs too (``method.pairing``; docs/excb.md, "What differs")."""
    proj_terms = other_view_terms(p_teacher, z_proj[:p_teacher.shape[0]] / student_temperature)
    pred_terms = cross_entropies(p_teacher, z_pred / student_temperature).flatten()
    return torch.cat([proj_terms, pred_terms]).mean()


def view_agreement(assignments: torch.Tensor) -> torch.Tensor:
    """a_avg (Eq. 12): share of (view, other view) pairs of an image that the teacher puts in one cluster.

    ``assignments`` [G, B]. Eq. 12 divides the pair count by G, which is this share for G = 2 views.
    """
    num_views = assignments.shape[0]
    same = (assignments.unsqueeze(0) == assignments.unsqueeze(1)).float().mean(-1)  # [G, G], 1 on the diagonal
    return (same.sum() - num_views) / (num_views * (num_views - 1))


# -- the method -----------------------------------------------------------------------------------
class ExCBConfig(ProjectorSection):
    """The paper's values, except K (65,536 there, for 1.28M images). proj_hidden_layers, head_batches and pairing
    give the official code's form (ManiadisG/ExCB; docs/excb.md, "What differs"); the defaults are imbssl's."""

    name: Literal["excb"] = "excb"
    pred_hidden: int = Field(128, ge=1, description="the predictor g's hidden width")
    num_clusters: int = Field(512, ge=2, description="K, the number of learned centroids (Eq. 1); 512 suits 10k-50k "
                                                     "images (docs/excb.md)")
    teacher_temperature: float = Field(0.04, gt=0, description="tau_t of the teacher softmax (Eq. 6)")
    student_temperature: float = Field(0.1, gt=0, description="tau_s of the student softmax (Eq. 5)")
    teacher_momentum: float = Field(0.996, ge=0, le=1,
                                    description="EMA momentum m of the teacher, raised to 1 on a cosine schedule")
    size_momentum: float = Field(0.999, ge=0, lt=1,
                                 description="m_s of the relative cluster sizes s (Eq. 9); 1/(1-m_s) batches")
    balancing: Literal["excb", "centering", "none"] = Field(
        "excb", description="how the teacher avoids collapse: excb = operator B (Eq. 10), centering = DINO's EMA "
                            "centre (baseline), none = nothing (baseline)")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="balancing=centering: DINO's centre EMA momentum")
    centroid_init: Literal["kmeans", "random"] = Field(
        "kmeans", description="centroids from k-means on the initial teacher projections, or random directions")
    centroid_weight_decay: tuple[float, float] | None = Field(
        (1e-3, 1e-4), description="the centroids' weight decay, cosine from the first to the second value; None = "
                                  "the optimizer's weight decay")
    proj_hidden_layers: int = Field(1, ge=1, description="hidden Linear-BN-ReLU layers of the projector h before its "
                                                         "last Linear; 2 = the official code's mlp_hidden_layers: 2 "
                                                         "(the paper's '2-layer MLP')")
    head_batches: Literal["by_size", "all"] = Field(
        "by_size", description="by_size = the global views through the backbone and the heads as one batch, the "
                               "local views as another; all = the backbone on each crop size, then the heads on all "
                               "views together (the official code), so the heads' BatchNorm normalises the global "
                               "and local views as one batch. The same without local crops")
    pairing: Literal["paper", "code"] = Field(
        "paper", description="the loss's view pairs: paper = Eq. 7, teacher view x' against the projector output of "
                             "every other view, local ones included, and the predictor output of every view, each "
                             "sum averaged over its own pairs; code = the official ClusteringLoss, the projector "
                             "outputs of the other global views only, one mean over all pairs")
    prior: PriorConfig = Field(PriorConfig(), description="the target sizes t of Eq. 10 (priors.py)")

    def unused_keys(self) -> set[str]:
        return set() if self.balancing == "centering" else {"center_momentum"}

    @model_validator(mode="after")
    def _check_prior(self) -> "ExCBConfig":
        if self.prior.from_data and self.centroid_init != "kmeans":
            raise ValueError(f"prior.kind={self.prior.kind} takes its sizes from the k-means of the centroid "
                             f"initialisation: set centroid_init=kmeans")
        return self


class ExCB(SSLMethod):
    name = "excb"
    display_name = "ExCB"
    config_class = ExCBConfig
    defaults = OptimDefaults(name="sgd", base_lr=0.15, weight_decay=1e-4)  # Sec. 4.1, ResNet-50
    uses_local_crops = True
    learns_clusters = True

    def __init__(self, backbone: nn.Module, cfg: ExCBConfig) -> None:
        super().__init__(backbone, cfg.proj_dim)
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim,
                             num_layers=cfg.proj_hidden_layers + 1, last_bn=False)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, num_layers=2, last_bn=False)
        self.centroids = CosineCentroids(cfg.proj_dim, cfg.num_clusters)
        # The teacher starts as a copy of the student without the predictor and only moves by EMA.
        self.teacher = ema_teacher(self, ("backbone", "projector", "centroids"))
        self.cfg = cfg
        num_clusters = cfg.num_clusters
        # t is laid over the initial k-means clusters in on_train_start (a prior from the data waits for them there).
        # Buffers are saved in checkpoints: a resumed run balances exactly as an uninterrupted one.
        self.register_buffer("target_sizes", uniform_prior(num_clusters))  # t of Eq. 10
        self.register_buffer("cluster_sizes", uniform_prior(num_clusters))  # s of Eq. 8-9, starting on target
        self.register_buffer("center", torch.zeros(num_clusters))  # DINO's centre, balancing="centering"
        if not cfg.prior.from_data:
            self.set_target(cluster_prior(cfg.prior, num_clusters))
        self._epoch_assignments: list[torch.Tensor] = []  # teacher clusters of this epoch's global views
        self._epoch_indices: list[torch.Tensor] = []  # and the images they come from

    @torch.no_grad()
    def set_target(self, prior: torch.Tensor, initial_assignments: np.ndarray | None = None) -> None:
        """t <- the prior, its largest share on the cluster that the initial k-means filled most (when given), and
        s <- t, so that B starts neutral. Cluster indices are arbitrary; laying the prior over the k-means sizes
        asks the least of B at the start."""
        if initial_assignments is not None:
            counts = np.bincount(initial_assignments, minlength=len(prior))
            by_size = torch.as_tensor(np.argsort(-counts, kind="stable"))
            prior = torch.empty_like(prior).index_copy_(0, by_size, torch.sort(prior, descending=True).values)
        self.target_sizes.copy_(prior)
        self.cluster_sizes.copy_(prior)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        global_views, local_views = views[:self.num_views], views[self.num_views:]
        p_teacher = self.teacher_assignments(global_views)
        projections, z_proj, z_pred = self.student_outputs(global_views, local_views)
        loss = excb_loss(p_teacher, z_proj, z_pred, self.cfg.student_temperature, self.cfg.pairing)

        # [G, B] of the global batch (gathered when several processes share it): the statistics are all of it.
        assignments = gather(p_teacher.argmax(-1).T).T
        self._epoch_assignments.append(assignments.flatten())
        self._epoch_indices.append(gather(indices).repeat(len(global_views)))
        return StepOutput(loss, {"output_std": output_std(projections),
                                 "teacher_confidence": p_teacher.amax(-1).mean(),  # c_avg, Eq. 11
                                 "view_agreement": view_agreement(assignments)})

    def student_outputs(self, global_views: list[torch.Tensor],
                        local_views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global views' projections, and z_s^h, z_s^g [V, B, K] of all V views, global ones first. The global
        views go through the backbone and the heads as one batch, the local views as another, so the heads'
        BatchNorm normalises each group with its own statistics; ``head_batches`` all runs the heads on both
        groups together, as the official code (``heads_on_all_views``; docs/excb.md, "What differs")."""
        if local_views and self.cfg.head_batches == "all":
            return self.heads_on_all_views(global_views, local_views)
        projections, z_proj, z_pred = self.student_similarities(global_views, detach_centroids=False)
        if local_views:  # the centroids learn from global views only (Sec. 4.1, Algorithm 2)
            _, z_proj_local, z_pred_local = self.student_similarities(local_views, detach_centroids=True)
            z_proj, z_pred = torch.cat([z_proj, z_proj_local]), torch.cat([z_pred, z_pred_local])
        return projections, z_proj, z_pred

    def heads_on_all_views(self, global_views: list[torch.Tensor],
                           local_views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``student_outputs`` as the official code computes them: the backbone on each crop size, then the
        projector and the predictor on the features of all views as one batch (its Classifier), so their BatchNorm
        normalises the global and local views together. The local views' z_s^h still see the centroids detached."""
        features = torch.cat([self.backbone(torch.cat(views)) for views in (global_views, local_views)])
        projections = self.projector(features)
        rows, num_views = len(global_views) * len(global_views[0]), len(global_views) + len(local_views)
        z_proj = torch.cat([self.centroids(projections[:rows]), self.centroids(projections[rows:], detach=True)])
        z_pred = self.centroids(self.predictor(projections), detach=True)
        return projections[:rows], z_proj.unflatten(0, (num_views, -1)), z_pred.unflatten(0, (num_views, -1))

    def student_similarities(self, views: list[torch.Tensor],
                             detach_centroids: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections [V*B, D] and their z_s^h, z_s^g [V, B, K] for same-sized views, one batch per size (Eq. 2)."""
        projections = self.projector(self.backbone(torch.cat(views)))
        z_proj = self.centroids(projections, detach=detach_centroids)
        z_pred = self.centroids(self.predictor(projections), detach=True)
        return projections, z_proj.unflatten(0, (len(views), -1)), z_pred.unflatten(0, (len(views), -1))

    @torch.no_grad()
    def teacher_assignments(self, global_views: list[torch.Tensor]) -> torch.Tensor:
        """p_t (Eq. 6) of each global view, [G, B, K]; updates the cluster sizes s with them (Eq. 8-9)."""
        z = self.teacher(torch.cat(global_views))  # Eq. 3
        p = F.softmax(self.prevent_collapse(z) / self.cfg.teacher_temperature, dim=-1)
        self.update_cluster_sizes(p.argmax(-1))
        return p.unflatten(0, (len(global_views), -1))

    def prevent_collapse(self, z: torch.Tensor) -> torch.Tensor:
        """ExCB's B (Eq. 4); DINO's centring z - c with c an EMA of the batch mean of z; or z unchanged."""
        if self.cfg.balancing == "excb":
            return balance(z, self.cluster_sizes, self.target_sizes)
        if self.cfg.balancing == "centering":
            return centre(z, self.center, self.cfg.center_momentum)
        return z

    def update_cluster_sizes(self, assignments: torch.Tensor) -> None:
        """s <- m_s s + (1 - m_s) s_B, with s_B the share of the batch's views in each cluster (Eq. 8-9).

        The histogram of the global batch: counts summed over processes, then divided by their total, which is exact
        however unevenly the batch is split (a mean of each process's shares would not be).
        """
        counts = sum_over_processes(torch.bincount(assignments, minlength=len(self.cluster_sizes)))
        self.cluster_sizes.lerp_(counts / counts.sum(), 1 - self.cfg.size_momentum)

    # -- engine hooks -----------------------------------------------------------------------
    @property
    def eval_backbone(self) -> nn.Module:
        """The teacher's backbone, as DINO and ExCB evaluate it."""
        return self.teacher.backbone

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.teacher.projector}

    @property
    def clusterer(self) -> nn.Module:
        return self.teacher

    @property
    def cluster_target(self) -> torch.Tensor:
        return self.target_sizes

    def param_groups(self) -> list[dict]:
        """No teacher parameter; biases and normalisation weights (1-d) without weight decay, as the official code
        (and DINO's) has it; the centroids in a group of their own, for their weight-decay schedule (Sec. 4.1)."""
        centroids = self.centroids.weight
        groups = weight_decay_groups([p for p in self.parameters() if p.requires_grad and p is not centroids])
        if self.cfg.centroid_weight_decay is None:
            groups[0]["params"].append(centroids)
            return groups
        return groups + [{"params": [centroids], "wd_schedule": CENTROID_DECAY}]

    @torch.no_grad()
    def on_train_start(self, images: torch.Tensor, make_view: MakeView, generator: torch.Generator) -> None:
        """The centroids from k-means on the teacher's projections of one global view of every image, as the
        official code does (``kmeans_of_one_view``); the prior laid over the k-means clusters."""
        if self.cfg.centroid_init != "kmeans":
            return
        result = kmeans_of_one_view(self.teacher[:2], images, make_view, generator, len(self.cluster_sizes))
        centroids = torch.from_numpy(result.centroids).to(self.centroids.weight)
        self.centroids.weight.copy_(centroids)
        self.teacher.centroids.weight.copy_(centroids)
        prior = cluster_prior(self.cfg.prior, len(self.cluster_sizes), result.assignments)
        self.set_target(prior.to(self.target_sizes), result.assignments)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """The teacher's momentum, m -> 1 on a cosine; the centroids' weight decay, a cosine from the first configured
        value at step 0 to the second at the end (Sec. 4.1: 1e-3 -> 1e-4), when configured."""
        schedules = {"teacher_momentum": ema_momentum_schedule(self.cfg.teacher_momentum, total_steps)}
        if self.cfg.centroid_weight_decay is not None:
            start, end = self.cfg.centroid_weight_decay
            schedules[CENTROID_DECAY] = cosine_schedule(start, end, total_steps)
        return schedules

    def on_step_end(self) -> None:
        """The EMA teacher update at the step's momentum."""
        ema_update(self.teacher, self, self.teacher_momentum)

    def epoch_stats(self, labels: np.ndarray | None) -> dict[str, float]:
        """The teacher's assignments during the epoch (Fig. 4c, e) and the extremes of s, relative to the target."""
        assignments = torch.cat(self._epoch_assignments).cpu().numpy()
        indices = torch.cat(self._epoch_indices).cpu().numpy()
        self._epoch_assignments, self._epoch_indices = [], []
        tracked = self.cluster_sizes / self.target_sizes
        return {**cluster_statistics(assignments, self.target_sizes.cpu().numpy(),
                                     None if labels is None else labels[indices]),
                "tracked_size_min": tracked.min().item(), "tracked_size_max": tracked.max().item()}
