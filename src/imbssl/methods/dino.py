"""DINO (Caron et al., ICCV 2021, "Emerging properties in self-supervised vision transformers"): self-distillation
with no labels. A student g_s learns to give every view of an image the distribution that an EMA teacher g_t gives
the image's global views:

    P_s(x) = softmax(g_s(x) / tau_s),   P_t(x) = softmax((g_t(x) - c) / tau_t)        (Eq. 1; centring, Sec. 3.1)
    L = mean over x in {x_1^g, x_2^g}, x' in V, x' != x of H(P_t(x), P_s(x'))          (Eq. 3)
    c <- m c + (1 - m) mean_i g_t(x_i), over the teacher's outputs of the global batch (Eq. 4)
    theta_t <- lambda theta_t + (1 - lambda) theta_s, lambda on a cosine from 0.996 to 1  (Sec. 3.1)

H(a, b) = -sum_k a_k log b_k (Eq. 2). Eq. 3 sums over the view pairs; their ``DINOLoss`` averages them, as here, and
each H over the batch. Centring (subtracting c) keeps one dimension from dominating, the low tau_t (sharpening)
keeps the teacher from going uniform; neither works alone (Sec. 5.3).

g is the backbone then ``DINOHead`` (models/heads.py): a 3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck,
l2-normalised, then a weight-normalised Linear to K = out_dim, its norm g fixed at 1 (``norm_last_layer``) unless set
free. As their ``MultiCropWrapper``, the backbone runs once per crop size and the head on all views together.

The defaults are main_dino.py's argparse defaults (facebookresearch/dino), which are those of their ViTs: AdamW at
lr 0.0005 per 256 images, weight decay on a cosine from 0.04 to 0.4 (biases and normalisation weights without),
each tensor's gradient clipped to norm 3, K = 65,536 (too many for small data: presets set out_dim), tau_t = 0.04
without warm-up (their README's ViT-S/16 run warms it up from 0.04 to 0.07 over 30 epochs and learns g,
``--norm_last_layer false``), the last layer frozen during the first epoch. Their README's ResNet-50 run changes the
optimizer and the crops: SGD at lr 0.03, weight decay 1e-4 to 1e-4, global crops of scale 0.14-1 and local ones of
0.05-0.14. The lr follows the run's ``optim`` schedule: their
10 warm-up epochs are optim.warmup_epochs, and imbssl's cosine ends at 0 where theirs ends at --min_lr 1e-6.

ExCB (methods/excb.py) is DINO's descendant and takes its multi-crop cross-entropy and, as its ``centering``
baseline, its centring from here.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from imbssl.configbase import ProjectorSection
from imbssl.engine.distributed import batch_mean
from imbssl.engine.ema import ema_teacher, ema_update
from imbssl.engine.schedules import ema_momentum_schedule
from imbssl.methods.base import OptimDefaults, SSLMethod, StepOutput, output_std, weight_decay_groups
from imbssl.models.heads import DINOHead


# -- the loss (Eq. 2-3) and the centring (Eq. 4), shared with ExCB ---------------------------------------------
def cross_entropies(p_teacher: torch.Tensor, logits_student: torch.Tensor) -> torch.Tensor:
    """[G, V]: H(p_t(x'), softmax(logits(x''))) averaged over the batch, for teacher view x' and student view x''
    (Eq. 2), from ``p_teacher`` [G, B, K] and ``logits_student`` [V, B, K]."""
    log_p = F.log_softmax(logits_student, dim=-1)
    return -torch.einsum("ibk,jbk->ij", p_teacher, log_p) / p_teacher.shape[1]


def other_view_terms(p_teacher: torch.Tensor, logits_student: torch.Tensor) -> torch.Tensor:
    """The terms of Eq. 3: ``cross_entropies`` of every teacher view x' (the global views, first among the student's)
    and every student view x'' != x', flattened teacher view by teacher view (their ``DINOLoss`` skips v == iq)."""
    num_global, num_views = p_teacher.shape[0], logits_student.shape[0]
    other_view = ~torch.eye(num_global, num_views, dtype=torch.bool, device=logits_student.device)
    return cross_entropies(p_teacher, logits_student)[other_view]


def multi_crop_loss(p_teacher: torch.Tensor, logits_student: torch.Tensor) -> torch.Tensor:
    """Eq. 3 averaged over its G (V - 1) view pairs, as their ``DINOLoss`` (``total_loss /= n_loss_terms``):
    ``p_teacher`` [G, B, K] the teacher's distributions of the G global views, ``logits_student`` [V, B, K] the
    student's logits (divided by tau_s) of all V views, global ones first."""
    return other_view_terms(p_teacher, logits_student).mean()


@torch.no_grad()
def centre(z: torch.Tensor, center: torch.Tensor, momentum: float) -> torch.Tensor:
    """z - c for the teacher's outputs ``z`` [N, K]; then c <- m c + (1 - m) mean(z) in place (Eq. 4), the mean over
    the rows of every process together, as their ``update_center`` all-reduces it. c moves after it is used."""
    centred = z - center
    center.lerp_(batch_mean(z), 1 - momentum)
    return centred


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, total_steps: int,
                                 steps_per_epoch: int) -> np.ndarray:
    """tau_t at every step: from ``warmup_temp`` at epoch 0 linearly to ``temp`` at epoch ``warmup_epochs - 1``, then
    ``temp``, held for each epoch (their ``DINOLoss.teacher_temp_schedule``, indexed by the epoch). A warm-up longer
    than the run is cut, not stretched: a step's tau_t depends on its epoch alone."""
    epochs = np.arange(total_steps) // steps_per_epoch
    per_epoch = np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs[-1] + 1, temp)])
    return per_epoch[epochs]


# -- the method -----------------------------------------------------------------------------------------------
class DINOConfig(ProjectorSection):
    """main_dino.py's flags under their names, at their argparse defaults (their ViTs'), and the head's and loss's
    arguments that are not flags (``DINOHead``'s, ``DINOLoss``'s) at theirs. optim.weight_decay is their
    --weight_decay, the start of the cosine to ``weight_decay_end``; augment.local_crops their --local_crops_number."""

    name: Literal["dino"] = "dino"
    proj_hidden: int = Field(2048, ge=1, description="the head MLP's hidden width (DINOHead's hidden_dim)")
    proj_dim: int = Field(256, ge=1, description="the head's bottleneck, l2-normalised before the last layer "
                                                 "(DINOHead's bottleneck_dim): the projector space")
    out_dim: int = Field(65536, ge=2, description="K, the last layer's outputs (--out_dim); 65,536 is for ImageNet")
    nlayers: int = Field(3, ge=1, description="Linear layers of the head's MLP (DINOHead's nlayers)")
    use_bn_in_head: bool = Field(False, description="BatchNorm after each hidden Linear of the head (--use_bn_in_head)")
    norm_last_layer: bool = Field(True, description="the last layer's weight norm g fixed at 1 (--norm_last_layer); "
                                                    "false learns it (their ViT-S/16 runs)")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="the teacher's EMA momentum lambda at step 0, "
                                                                   "raised to 1 on a cosine (--momentum_teacher)")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="tau_t at epoch 0 (--warmup_teacher_temp)")
    teacher_temp: float = Field(0.04, gt=0, description="tau_t after the warm-up (--teacher_temp)")
    warmup_teacher_temp_epochs: int = Field(0, ge=0, description="epochs of tau_t's linear warm-up "
                                                                 "(--warmup_teacher_temp_epochs)")
    student_temp: float = Field(0.1, gt=0, description="tau_s (DINOLoss's student_temp)")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="m of the centre c (Eq. 4; DINOLoss's "
                                                                "center_momentum)")
    weight_decay_end: float = Field(0.4, ge=0, description="the weight decay at the end, reached on a cosine from "
                                                           "optim.weight_decay (--weight_decay_end)")
    clip_grad: float = Field(3.0, ge=0, description="the largest gradient norm of each parameter tensor; 0 = no "
                                                    "clipping (--clip_grad)")
    freeze_last_layer: int = Field(1, ge=0, description="epochs during which the last layer does not move "
                                                        "(--freeze_last_layer)")

    def unused_keys(self) -> set[str]:
        unused = set() if self.warmup_teacher_temp_epochs else {"warmup_teacher_temp"}
        return unused | ({"proj_hidden", "use_bn_in_head"} if self.nlayers == 1 else set())


class DINO(SSLMethod):
    name = "dino"
    display_name = "DINO"
    config_class = DINOConfig
    defaults = OptimDefaults(name="adamw", base_lr=0.0005, weight_decay=0.04)  # main_dino.py's argparse (ViTs)
    uses_local_crops = True
    clips_each_tensor = True  # their utils.clip_gradients

    def __init__(self, backbone: nn.Module, cfg: DINOConfig) -> None:
        super().__init__(backbone, cfg.out_dim)
        self.head = DINOHead(backbone.feature_dim, cfg.out_dim, cfg.proj_hidden, cfg.proj_dim, cfg.nlayers,
                             cfg.use_bn_in_head, cfg.norm_last_layer)
        # The teacher starts as the student (their load_state_dict) and only moves by EMA.
        self.teacher = ema_teacher(self, ("backbone", "head"))
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(cfg.out_dim))  # c of Eq. 4, saved in checkpoints
        self.last_layer_frozen = cfg.freeze_last_layer > 0  # epoch 0's; on_epoch_start sets each epoch's

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        global_views, local_views = views[:self.num_views], views[self.num_views:]
        p_teacher = self.teacher_distributions(global_views)
        # the backbone on each crop size, then the head on all views together: their MultiCropWrapper
        features = torch.cat([self.backbone(torch.cat(group)) for group in (global_views, local_views) if group])
        outputs = self.head(features, freeze_last_layer=self.last_layer_frozen)
        loss = multi_crop_loss(p_teacher, (outputs / self.cfg.student_temp).unflatten(0, (len(views), -1)))
        return StepOutput(loss, {"output_std": output_std(outputs[:len(global_views) * len(global_views[0])]),
                                 "teacher_entropy": torch.special.entr(p_teacher).sum(-1).mean()})

    @torch.no_grad()
    def teacher_distributions(self, global_views: list[torch.Tensor]) -> torch.Tensor:
        """P_t of each global view, [G, B, K], from the centred outputs (Eq. 1); moves the centre (Eq. 4)."""
        z = self.teacher(torch.cat(global_views))
        p = F.softmax(centre(z, self.center, self.cfg.center_momentum) / self.teacher_temperature, dim=-1)
        return p.unflatten(0, (len(global_views), -1))

    # -- engine hooks ---------------------------------------------------------------------------------------------
    @property
    def eval_backbone(self) -> nn.Module:
        """The teacher's backbone, which DINO evaluates (Sec. 5.2: the teacher outperforms the student)."""
        return self.teacher.backbone

    @property
    def eval_heads(self) -> dict[str, nn.Module]:
        return {"projector": self.teacher.head.mlp}

    def param_groups(self) -> list[dict]:
        """No teacher parameter, nor g where it is fixed; biases and normalisation weights (1-d) without weight decay,
        the rest on the cosine to ``weight_decay_end`` (their get_params_groups and wd_schedule)."""
        groups = weight_decay_groups([p for p in self.parameters() if p.requires_grad])
        groups[0]["weight_decay_end"] = self.cfg.weight_decay_end
        return groups

    def gradient_clipping(self) -> tuple[list[nn.Parameter], float] | None:
        """Each of the student's tensors to gradient norm ``clip_grad`` (their utils.clip_gradients); 0: none."""
        if self.cfg.clip_grad == 0:
            return None
        return [p for p in self.parameters() if p.requires_grad], self.cfg.clip_grad

    def on_epoch_start(self, epoch: int) -> None:
        """The last layer frozen during the first ``freeze_last_layer`` epochs (their cancel_gradients_last_layer)."""
        self.last_layer_frozen = epoch < self.cfg.freeze_last_layer

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """The teacher's momentum lambda, from ``momentum_teacher`` to 1 on a cosine (their momentum_schedule); tau_t
        with its warm-up (``teacher_temperature_schedule``)."""
        cfg = self.cfg
        return {"teacher_momentum": ema_momentum_schedule(cfg.momentum_teacher, total_steps),
                "teacher_temperature": teacher_temperature_schedule(
                    cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, total_steps,
                    steps_per_epoch)}

    def on_step_end(self) -> None:
        """The teacher's EMA update at the step's momentum."""
        ema_update(self.teacher, self, self.teacher_momentum)
