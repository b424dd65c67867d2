"""Optimizers and learning-rate schedules: cosine for pre-training, warm-up and steps for supervised training."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from imbssl.config import OptimConfig

if TYPE_CHECKING:  # methods use the schedules below, so importing them here at run time would be circular
    from imbssl.methods.base import OptimDefaults, SSLMethod


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every weight tensor w with gradient g (after weight decay g <- g + wd * w):
        trust = eta * ||w|| / ||g||
        v <- momentum * v + trust * g
        w <- w - lr * v
    Biases and normalisation parameters (1-d tensors) skip both weight decay and the trust ratio,
    as in SimCLR.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if w.ndim > 1:
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                    g = g.mul(trust)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                w.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def resolve_optim(cfg: OptimConfig, defaults: OptimDefaults) -> tuple[str, float, float]:
    """(optimizer name, base lr, weight decay): the config where set, otherwise the method's Table 1 values."""
    name = cfg.name or defaults.name
    base_lr = cfg.base_lr if cfg.base_lr is not None else defaults.base_lr
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else defaults.weight_decay
    return name, base_lr, weight_decay


def build_optimizer(model: SSLMethod, cfg: OptimConfig, defaults: OptimDefaults, batch_size: int) -> Optimizer:
    """lr = base_lr * batch_size / 256, the linear scaling rule used by SimSiam and SimCLR."""
    name, base_lr, weight_decay = resolve_optim(cfg, defaults)
    lr = base_lr * batch_size / 256
    params = model.param_groups()
    if name == "lars":
        return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up to 1, then half a cosine down to 0 (Loshchilov & Hutter, 2017)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_temperature(t: float, tau_min: float, tau_max: float, t_max: float) -> float:
    """tau(t) = tau- + (tau+ - tau-) (1 + cos(pi t / t_max)) / 2         (TS, Kukleva et al. 2023)

    The form of the authors' code (Annusha/temperature_schedules, train_simCLR.py, ``--t_max``): tau falls from
    tau+ at t = 0 to tau- at t = t_max and climbs back at 2 t_max. The paper writes cos(2 pi t / T): the same curve
    with the period T = 2 t_max, so the code's t_max = 200 is one cycle per 400 epochs, 5 in 2,000.
    High tau spreads the loss over many negatives (group-wise discrimination, which favours the tail's
    semantic clusters), low tau sharpens it onto the hardest ones (instance discrimination).
    """
    return tau_min + 0.5 * (tau_max - tau_min) * (1 + math.cos(math.pi * t / t_max))


def scheduled_temperature(epoch: float, tau_min: float, tau_max: float, t_max: float, per_epoch: bool) -> float:
    """TS's temperature at ``epoch``, the trainer's fractional epoch (step / steps per epoch, from 0).

    ``per_epoch``: as the reference, t is the 1-based epoch number (its loop runs ``for epoch in range(1, epochs +
    1)`` and sets tau once per step from it), so tau holds for a whole epoch and the first epoch already sits one
    epoch into the cosine. Otherwise t is the fractional epoch itself, moving every step from tau+ at step 0: for
    runs so short that a half period (t_max) is under an epoch or a few.
    """
    t = math.floor(epoch) + 1 if per_epoch else epoch
    return cosine_temperature(t, tau_min, tau_max, t_max)


def ema_momentum(base: float, step: int, total_steps: int) -> float:
    """The EMA teacher's momentum at ``step``: ``base`` raised to 1 on a cosine (BYOL, DINO, ExCB, MSN)."""
    return 1 - (1 - base) * cosine_factor(step, total_steps)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for each part of ``teacher``, from the student's part of that name."""
    names = [name for name, _ in teacher.named_children()]
    teacher_params = [p for name in names for p in getattr(teacher, name).parameters()]
    student_params = [p for name in names for p in getattr(student, name).parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)  # one fused kernel, not one per tensor


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Every parameter group on ``cosine_factor``, except groups marked ``fixed_lr``, which keep their base lr."""
    def cosine(step: int) -> float:
        return cosine_factor(step, total_steps, warmup_steps)

    def constant(step: int) -> float:
        return 1.0

    return LambdaLR(optimizer, [constant if group.get("fixed_lr") else cosine for group in optimizer.param_groups])


def step_factor(step: int, steps_per_epoch: int, warmup_epochs: float, milestones: list[int],
                factors: list[float]) -> float:
    """Linear warm-up to 1 over ``warmup_epochs``, then ``factors[i]`` from epoch ``milestones[i]`` on.

    The LDAM-DRW schedule (lr 0.1, x0.01 at epoch 160, x0.0001 at 180, 5 warm-up epochs), warmed up per step
    rather than per epoch, so that a short warm-up on a small set is not one jump.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step // steps_per_epoch
    passed = [factor for milestone, factor in zip(milestones, factors) if epoch >= milestone]
    return passed[-1] if passed else 1.0


def step_schedule(optimizer: Optimizer, steps_per_epoch: int, warmup_epochs: float, milestones: list[int],
                  factors: list[float]) -> LambdaLR:
    def factor(step: int) -> float:
        return step_factor(step, steps_per_epoch, warmup_epochs, milestones, factors)

    return LambdaLR(optimizer, factor)
