"""Every per-step hyper-parameter of a run, precomputed: one value per step, set by the engine in one place.

Modelled on DINO's ``cosine_scheduler`` (facebookresearch/dino, utils.py): a schedule is a numpy array with one
value for each step of the run, so the value at step s depends on s and the run's length alone, and a run resumed
at any step (or extended to more epochs) takes exactly the value an uninterrupted run takes there.

``Schedules`` holds a run's arrays by name and applies step s's values before step s (``apply``):
- the optimizer's parameter groups: ``lr`` follows the schedule "lr", times the group's ``lr_scale`` where it has one
  (Barlow Twins' biases: engine/optim.py), except in a group marked ``fixed_lr`` (SimSiam's predictor);
  ``weight_decay`` follows the schedule a group names under ``wd_schedule``, if any (ExCB's centroids), or goes on a
  cosine from its own value to the group's ``weight_decay_end`` (DINO's; the schedule "weight_decay"), and is fixed
  otherwise;
- the task's own hyper-parameters: each name its ``schedules()`` hook returns is an attribute of the task that is
  set to the step's value (an EMA momentum, a temperature).
A task adds a schedule with one entry in its ``schedules()``: ``{"teacher_momentum": ema_momentum_schedule(m,
total_steps)}``, then reads ``self.teacher_momentum``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
from torch.optim import Optimizer

from imbssl.errors import ImbsslError

if TYPE_CHECKING:  # the task module imports nothing from here at run time
    from imbssl.engine.task import TrainingTask


#: the schedule of the groups that set ``weight_decay_end``
WEIGHT_DECAY = "weight_decay"


class ScheduleError(ImbsslError, ValueError):
    """A schedule that does not fit its run: the wrong length, or a name that nothing takes."""


# -- per-step arrays ------------------------------------------------------------------------------
def cosine_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Linear warm-up to ``base_value``, then half a cosine from it to ``final_value`` (Loshchilov & Hutter, 2017):

        v(s) = base (s + 1) / W                                          s < W (the warm-up's W steps)
        v(s) = final + (base - final) (1 + cos(pi (s - W) / (S - W))) / 2    W <= s < S (the run's S steps)

    DINO's ``cosine_scheduler`` after its warm-up; the warm-up's first step already runs at base / W, as SDCLR's
    and TS's train_simCLR.py run it (their LambdaLR, stepped before each step), where DINO's ``linspace`` starts
    at 0. The last step is one step short of ``final``, as DINO's. The lr of SSL pre-training (final 0), ExCB's
    centroid weight decay (Sec. 4.1: 1e-3 -> 1e-4).
    """
    steps = np.arange(total_steps)
    progress = np.minimum(1.0, (steps - warmup_steps) / max(1, total_steps - warmup_steps))
    schedule = final_value + (base_value - final_value) * (0.5 * (1 + np.cos(np.pi * progress)))
    return np.where(steps < warmup_steps, base_value * ((steps + 1) / max(1, warmup_steps)), schedule)


def step_schedule(base_value: float, total_steps: int, steps_per_epoch: int, warmup_epochs: float,
                  milestones: list[int], factors: list[float]) -> np.ndarray:
    """Linear warm-up to ``base_value`` over ``warmup_epochs``, then ``base_value * factors[i]`` from epoch
    ``milestones[i]`` on.

    The LDAM-DRW schedule (Cao et al. 2019's CIFAR code: lr 0.1, x0.01 at epoch 160, x0.0001 at 180, 5 warm-up epochs),
    and pretrain_rot.py's for Rotation, warmed up per step rather than per epoch, so that a short warm-up on a small
    set is not one jump.
    """
    steps = np.arange(total_steps)
    factor = np.ones(total_steps)
    for milestone, milestone_factor in zip(milestones, factors, strict=True):
        factor[steps // steps_per_epoch >= milestone] = milestone_factor
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if warmup_steps:
        factor = np.where(steps < warmup_steps, (steps + 1) / warmup_steps, factor)
    return base_value * factor


def restart_schedule(base_value: float, total_steps: int, warmup_steps: int, restart_step: int, stage1_final: float,
                     stage2_base: float) -> np.ndarray:
    """Two half cosines: the warm-up and a cosine from ``base_value`` to ``stage1_final`` until ``restart_step``, then
    a cosine from ``stage2_base`` to 0 over the rest of the run (``cosine_schedule`` twice):

        v(s) = cosine_schedule(base, stage1_final, R, W)(s)          s < R (the restart's step R)
        v(s) = cosine_schedule(stage2_base, 0, S - R)(s - R)          R <= s < S

    GH's ``lr_scheduler_warm`` (MediaBrain-SJTU/Geometric-Harmonization, utils.py), which restarts the cosine where
    GH joins the loss (``--warm_up``): --lr 0.5 down to --lr_min_stage1 0.3, then from --lr_max_stage2 0.3 to
    --lr_min 1e-6. Theirs is set once an epoch from the 1-based epoch number; here every step moves, and each stage
    sits one epoch later than theirs, as ``cosine_schedule`` against their ``lr_scheduler``
    (tests/reference/test_ref_gh.py).
    """
    return np.concatenate([cosine_schedule(base_value, stage1_final, restart_step, warmup_steps),
                           cosine_schedule(stage2_base, 0.0, total_steps - restart_step)])


def constant_schedule(value: float, total_steps: int) -> np.ndarray:
    """A hyper-parameter that does not move (MoCo's momentum, a fixed temperature), scheduled all the same so that
    another schedule can replace it and every step logs it."""
    return np.full(total_steps, float(value))


def ema_momentum_schedule(base: float, total_steps: int) -> np.ndarray:
    """m(s) = 1 - (1 - base) (1 + cos(pi s / S)) / 2: the EMA teacher's momentum raised from ``base`` to 1 on a
    cosine (BYOL Sec. 3.2, tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2; DINO's ``momentum_schedule``; ExCB's
    and MSN's teachers)."""
    return 1 - cosine_schedule(1 - base, 0.0, total_steps)


def cosine_temperature(t: float | np.ndarray, tau_min: float, tau_max: float, t_max: float) -> float | np.ndarray:
    """tau(t) = tau- + (tau+ - tau-) (1 + cos(pi t / t_max)) / 2         (TS, Kukleva et al. 2023)

    The form of the authors' code (Annusha/temperature_schedules, train_simCLR.py, ``--t_max``): tau falls from
    tau+ at t = 0 to tau- at t = t_max and climbs back at 2 t_max. The paper writes cos(2 pi t / T): the same curve
    with the period T = 2 t_max, so the code's t_max = 200 is one cycle per 400 epochs, 5 in 2,000.
    High tau spreads the loss over many negatives (group-wise discrimination, which favours the tail's
    semantic clusters), low tau sharpens it onto the hardest ones (instance discrimination).
    """
    return tau_min + 0.5 * (tau_max - tau_min) * (1 + np.cos(np.pi * t / t_max))


def ts_temperature_schedule(tau_min: float, tau_max: float, t_max_epochs: float, total_steps: int,
                            steps_per_epoch: int, per_epoch: bool) -> np.ndarray:
    """TS's temperature at every step (``cosine_temperature``), with t in epochs.

    ``per_epoch``: as the reference, t is the 1-based epoch number (its loop runs ``for epoch in range(1, epochs +
    1)`` and sets tau once per step from it), so tau holds for a whole epoch and the first epoch already sits one
    epoch into the cosine. Otherwise t is the fractional epoch, step / steps per epoch, moving every step from tau+
    at step 0: for runs so short that a half period (t_max) is under an epoch or a few.
    """
    steps = np.arange(total_steps)
    t = steps // steps_per_epoch + 1 if per_epoch else steps / steps_per_epoch
    return cosine_temperature(t, tau_min, tau_max, t_max_epochs)


# -- the run's schedules, applied in one place ----------------------------------------------------
def followed_settings(group: dict) -> dict[str, str]:
    """{optimizer setting: schedule name} of a parameter group: its lr follows "lr" unless the group is marked
    ``fixed_lr``, its weight decay the schedule it names under ``wd_schedule``, if any."""
    settings = {} if group.get("fixed_lr") else {"lr": "lr"}
    if "wd_schedule" in group:
        settings["weight_decay"] = group["wd_schedule"]
    elif "weight_decay_end" in group:
        settings["weight_decay"] = WEIGHT_DECAY
    return settings


def weight_decay_schedule(groups: list[dict], total_steps: int) -> dict[str, np.ndarray]:
    """{"weight_decay": a cosine from the weight decay of the groups that set ``weight_decay_end`` (the optimizer's,
    optim.weight_decay) to that value}, or nothing where no group sets it: DINO's ``wd_schedule``,
    ``cosine_scheduler(--weight_decay, --weight_decay_end)`` (their utils.py)."""
    ends = {(group["weight_decay"], group["weight_decay_end"]) for group in groups if "weight_decay_end" in group}
    if len(ends) > 1:
        raise ScheduleError(f"parameter groups go from and to different weight decays {sorted(ends)}: one schedule "
                            f"{WEIGHT_DECAY!r} takes them")
    return {WEIGHT_DECAY: cosine_schedule(*ends.pop(), total_steps)} if ends else {}


class Schedules:
    """A run's schedules by name and who takes each: the optimizer's groups and the task's hyper-parameters.

    ``run_values`` are the run's own (the lr, from the optimizer settings) and replace the task's defaults of the
    same name (``optim.temperature_schedule``'s TS temperature replaces a contrastive method's constant one). The
    groups' settings are read here, before a checkpoint's optimizer state (which carries its own group keys) is
    loaded, so that an old checkpoint cannot change what follows which schedule.
    """

    def __init__(self, task: TrainingTask, optimizer: Optimizer, run_values: Mapping[str, np.ndarray],
                 total_steps: int, steps_per_epoch: int) -> None:
        task_values = task.schedules(total_steps, steps_per_epoch)
        group_values = weight_decay_schedule(optimizer.param_groups, total_steps)
        self.values = {name: np.asarray(values, dtype=np.float64)
                       for name, values in {**group_values, **task_values, **run_values}.items()}
        self.task, self.optimizer, self.task_names = task, optimizer, tuple(task_values)
        self.group_settings = [followed_settings(group) for group in optimizer.param_groups]
        self.lr_scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
        self._check(total_steps)

    def _check(self, total_steps: int) -> None:
        task_name = type(self.task).__name__
        for name, values in self.values.items():
            if values.shape != (total_steps,):
                raise ScheduleError(f"schedule {name!r} has {values.shape} values for a run of {total_steps} steps")
        taken = {*self.task_names, *(name for settings in self.group_settings for name in settings.values())}
        if missing := sorted(taken - set(self.values)):
            raise ScheduleError(f"no schedule {', '.join(map(repr, missing))}, which the optimizer's groups follow")
        if untaken := sorted(set(self.values) - taken):
            raise ScheduleError(f"schedule {', '.join(map(repr, untaken))}: neither {task_name} nor an optimizer "
                                f"group takes it")

    def at(self, step: int) -> dict[str, float]:
        """Every schedule's value at ``step`` (from 0 over the whole run)."""
        return {name: float(values[step]) for name, values in self.values.items()}

    def apply(self, step: int) -> dict[str, float]:
        """Sets step ``step``'s values, before that step: the groups' lr and weight decay, the task's attributes."""
        now = self.at(step)
        for group, settings, lr_scale in zip(self.optimizer.param_groups, self.group_settings, self.lr_scales,
                                             strict=True):
            for setting, name in settings.items():
                group[setting] = now[name] * lr_scale if setting == "lr" else now[name]
        for name in self.task_names:
            setattr(self.task, name, now[name])
        return now
