"""Multi-teacher distillation, step 4 of the offline-clustering pipeline (paper Sec. 3.1).

A student backbone f_s with K+1 MLP regression heads r_base, r_1..r_K learns, from one augmented
view v of each image x, to predict the frozen base model's and the image's cluster expert's outputs:

    q_s = SimSiam_s(v),  q_base = SimSiam_base(v),  q_expert(k) = SimSiam_expert(k)(v)   with k the cluster of x
    L_distill = 1/2 ||r_base(q_s) - q_base||^2 + 1/2 ||r_k(q_s) - q_expert(k)||^2,  ||.||^2 = MSE   (Eq. 2)

q is "the output of SimSiam" in the space ``distill_target`` names (config.SPACES): the projector's z by
default, so the student, which has "the same architecture and parameter as SimSiam_base", carries the
base's projector (``heads``) and trains it with its backbone; or the predictor's p (projector and
predictor carried); or the backbone's features f(v) (no head carried). Only the backbone is evaluated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imbssl.augment import Normalize
from imbssl.methods.base import SSLMethod, StepOutput, output_std
from imbssl.methods.simsiam import SimSiam
from imbssl.models.heads import mlp


class FrozenTeacher(nn.Module):
    """A trained model (backbone and heads up to the distillation space) that is never updated and always runs
    in inference mode (BatchNorm running stats).

    Each teacher was trained on inputs standardised with its own training set's channel statistics;
    ``input_scale`` and ``input_shift`` re-standardise the student's view to them.
    """

    def __init__(self, encoder: nn.Module, input_scale: torch.Tensor, input_shift: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_shift", input_shift)

    @classmethod
    def for_views(cls, encoder: nn.Module, own: Normalize, views: Normalize) -> "FrozenTeacher":
        """Teacher of views standardised with ``views``: (x - m_t)/s_t = v s_v/s_t + (m_v - m_t)/s_t."""
        return cls(encoder, views.std / own.std, (views.mean - own.mean) / own.std)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.encoder(views * self.input_scale + self.input_shift)


def distill_loss(base_pred: torch.Tensor, base_target: torch.Tensor, expert_pred: torch.Tensor,
                 expert_target: torch.Tensor) -> torch.Tensor:
    """1/2 MSE(r_base(q_s), q_base) + 1/2 MSE(r_k(q_s), q_expert(k)) (Eq. 2); targets carry no gradient."""
    return 0.5 * F.mse_loss(base_pred, base_target.detach()) + 0.5 * F.mse_loss(expert_pred, expert_target.detach())


class MultiTeacherDistill(SSLMethod):
    """Student backbone, the heads it carries (``heads``, applied in order; none for backbone features) and the
    regression heads r; ``clusters[i]`` is the cluster of training image i, ``output_dim`` the size of q."""

    name = "distill"
    defaults = SimSiam.defaults  # the paper gives no distillation optimizer: the student keeps SimSiam's Table 1
    num_views = 1  # "a single-view augmentation" (Sec. 3.1)

    def __init__(self, backbone: nn.Module, base: FrozenTeacher, experts: list[FrozenTeacher], clusters: torch.Tensor,
                 head_hidden: int, heads: nn.ModuleDict | None = None, output_dim: int | None = None) -> None:
        dim = output_dim or backbone.feature_dim
        super().__init__(backbone, dim)
        self.heads = heads if heads is not None else nn.ModuleDict()
        self.base_teacher = base
        self.expert_teachers = nn.ModuleList(experts)
        self.register_buffer("clusters", clusters.long())
        self.base_head = mlp(dim, head_hidden, dim, num_layers=2, last_bn=False)
        self.expert_heads = nn.ModuleList(mlp(dim, head_hidden, dim, num_layers=2, last_bn=False) for _ in experts)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        (v,) = views
        clusters = self.clusters[indices]
        q_s = self.embed(v)
        loss = distill_loss(self.base_head(q_s).float(), self.base_teacher(v).float(),
                            self.expert_predictions(q_s, clusters).float(), self.expert_targets(v, clusters))
        return StepOutput(loss, {"output_std": output_std(q_s)})

    def embed(self, v: torch.Tensor) -> torch.Tensor:
        """q_s: the student's backbone, then the heads it carries."""
        q = self.backbone(v)
        for head in self.heads.values():
            q = head(q)
        return q

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return dict(self.heads)

    def expert_predictions(self, q_s: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """r_k(q_s) with each sample's own k.

        Every head sees the whole batch, so the BatchNorm inside it normalises over the batch even
        when a cluster has one sample in it; each sample then keeps the row of its own head.
        """
        all_heads = torch.stack([head(q_s) for head in self.expert_heads])  # [K, B, D]
        return all_heads[clusters, torch.arange(len(clusters), device=clusters.device)]

    def expert_targets(self, v: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """q_expert(k) of each sample: every expert embeds only the views of its own cluster."""
        targets = torch.empty(len(v), self.output_dim, device=v.device)
        for k, expert in enumerate(self.expert_teachers):
            members = (clusters == k).nonzero().squeeze(1)
            if len(members):
                targets[members] = expert(v[members]).float()
        return targets
