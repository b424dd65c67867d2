"""The EMA teacher of MoCo's key encoder, ExCB's teacher and MSN's target encoder: a frozen copy of named parts of
the student that moves only by an exponential moving average of the student's weights."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn


def ema_teacher(student: nn.Module, parts: Iterable[str]) -> nn.Sequential:
    """A copy of the student's ``parts`` (its child modules of those names), in that order and under those names, with
    no gradient: the teacher starts as the student (MoCo Sec. 3.2, BYOL, DINO, ExCB, MSN). Its state is saved with
    the student's as ``<attribute>.<part>...``; BatchNorm statistics are its own, computed on what it sees."""
    teacher = nn.Sequential(OrderedDict((part, copy.deepcopy(getattr(student, part))) for part in parts))
    return teacher.requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for each part of ``teacher``, from the student's part of that name
    (MoCo Eq. 2, BYOL Eq. 1's xi update, DINO Sec. 3.1): after the optimizer step, at the step's scheduled m."""
    names = [name for name, _ in teacher.named_children()]
    teacher_params = [p for name in names for p in getattr(teacher, name).parameters()]
    student_params = [p for name in names for p in getattr(student, name).parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)  # one fused kernel, not one per tensor
