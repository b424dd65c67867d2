"""Optimizers: SGD, AdamW and LARS on a method's parameter groups; their schedules are engine/schedules.py's."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.optim import Optimizer

if TYPE_CHECKING:  # the methods import the engine (and config.py the methods): importing either here would be circular
    from imbssl.config import OptimConfig
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


def with_own_base_lr(group: dict, base_lr: float, lr: float) -> dict:
    """A parameter group that names a ``base_lr`` of its own (per 256 images, as optim.base_lr: Barlow Twins' biases,
    their --learning-rate-biases) at that lr, following the run's lr schedule in proportion: its ``lr_scale``, the
    ratio of the two base lrs (engine/schedules.py)."""
    if "base_lr" not in group:
        return group
    scale = group["base_lr"] / base_lr
    return {**{k: v for k, v in group.items() if k != "base_lr"}, "lr": lr * scale, "lr_scale": scale}


def build_optimizer(model: SSLMethod, cfg: OptimConfig, defaults: OptimDefaults, batch_size: int) -> Optimizer:
    """lr = base_lr * batch_size / 256, the linear scaling rule used by SimSiam and SimCLR."""
    name, base_lr, weight_decay = resolve_optim(cfg, defaults)
    lr = base_lr * batch_size / 256
    params = [with_own_base_lr(group, base_lr, lr) for group in model.param_groups()]
    if name == "lars":
        return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)
