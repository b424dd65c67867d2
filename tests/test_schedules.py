"""engine/schedules.py and engine/ema.py: the per-step arrays against their formulas, the one place that sets them
(optimizer groups and the task's hyper-parameters), and resume across a schedule's change points."""
import math

import numpy as np
import pytest
import torch
from conftest import Interrupt, crash_after
from torch import nn

from imbssl.augment import PadCropFlip
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.ema import ema_teacher, ema_update
from imbssl.engine.runlog import read_metrics
from imbssl.config import OptimConfig
from imbssl.engine.schedules import (ScheduleError, Schedules, constant_schedule, cosine_schedule,
                                     ema_momentum_schedule, restart_schedule, step_schedule, ts_temperature_schedule)
from imbssl.engine.task import StepOutput, TrainingTask
from imbssl.engine.trainer import CHECKPOINT_FILE, Trainer, TrainSettings
from imbssl.pipelines.pretrain import BACKBONE_FILE, lr_schedule, pretrain


# -- the arrays against their formulas -------------------------------------------------------------
def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.py ``cosine_scheduler``, as written there."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def test_cosine_schedule_is_dinos_after_a_warm_up_that_starts_at_base_over_w():
    lr = cosine_schedule(0.5, 0.01, 100, warmup_steps=10)
    assert lr.shape == (100,)
    assert lr[0] == 0.05 and lr[4] == 0.25 and lr[9] == lr[10] == 0.5  # (s + 1) / W, then the cosine's top
    assert lr[55] == pytest.approx(0.01 + 0.49 / 2, rel=1e-15)  # half way through the 90 cosine steps
    assert np.allclose(lr[10:], dino_cosine_scheduler(0.5, 0.01, 10, 10, warmup_epochs=1)[10:], rtol=1e-13, atol=0)
    assert np.allclose(cosine_schedule(2.0, 1.0, 30), dino_cosine_scheduler(2.0, 1.0, 3, 10), rtol=1e-13, atol=0)
    assert np.all(np.diff(lr[10:]) < 0) and lr[-1] > 0.01  # one step short of the final value, as DINO's


def test_step_schedule_holds_each_factor_from_its_milestone_epoch():
    """LDAM-DRW: 5 warm-up epochs, x0.01 from epoch 160, x0.0001 from 180 (here 4 steps an epoch)."""
    lr = step_schedule(0.1, 200 * 4, 4, 5, [160, 180], [0.01, 0.0001])
    assert lr[0] == 0.1 * (1 / 20) and lr[19] == lr[20] == 0.1
    assert lr[159 * 4 + 3] == 0.1 and lr[160 * 4] == 0.1 * 0.01 and lr[180 * 4] == 0.1 * 0.0001 == lr[-1]


def test_restart_schedule_is_two_cosines_the_second_from_its_own_top():
    """GH's lr: warm-up, 0.5 -> 0.3 until the restart at epoch 25, then 0.3 -> 0 (here 3 steps an epoch)."""
    lr = lr_schedule(0.5, OptimConfig(epochs=40, warmup_epochs=10, lr_schedule="restart", milestones=[25],
                                      lr_factors=[0.6, 0.6]), 3)
    assert np.array_equal(lr, restart_schedule(0.5, 120, 30, 75, 0.3, 0.3))
    assert np.array_equal(lr[:75], cosine_schedule(0.5, 0.3, 75, 30)) and lr[29] == lr[30] == 0.5
    assert lr[75] == 0.3 and np.array_equal(lr[75:], cosine_schedule(0.3, 0.0, 45)) and lr[74] > 0.3
    assert np.all(np.diff(lr[30:75]) < 0) and np.all(np.diff(lr[75:]) < 0)


@pytest.mark.parametrize("settings, message", [
    ({"milestones": [25, 30], "lr_factors": [0.6, 0.6]}, "restart takes one milestone"),
    ({"milestones": [25], "lr_factors": [0.6]}, "restart takes one milestone"),
    ({"milestones": [5], "lr_factors": [0.6, 0.6]}, "must fall after the warm-up"),
    ({"milestones": [40], "lr_factors": [0.6, 0.6]}, "before epochs=40")])
def test_a_restart_schedule_without_one_epoch_inside_the_run_and_two_factors_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(epochs=40, warmup_epochs=10, lr_schedule="restart", **settings)


def test_ema_momentum_rises_from_base_to_one_on_byols_cosine():
    m = ema_momentum_schedule(0.996, 1000)
    for k in (0, 1, 250, 500, 999):  # BYOL Sec. 3.2: tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
        assert m[k] == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / 1000) + 1) / 2, rel=1e-15)
    assert m[0] == pytest.approx(0.996, rel=1e-15) and np.all(np.diff(m) > 0) and m[-1] < 1


def test_ts_temperature_follows_the_authors_code_per_epoch_and_per_step():
    """tau(t) = tau- + (tau+ - tau-) (1 + cos(pi t / t_max)) / 2, t the 1-based epoch (their loop) or the fractional
    epoch from 0 (update: step); 3 steps an epoch, t_max 2 epochs."""
    per_epoch = ts_temperature_schedule(0.1, 0.9, 2, 12, 3, per_epoch=True)
    per_step = ts_temperature_schedule(0.1, 0.9, 2, 12, 3, per_epoch=False)
    tau = lambda t: 0.1 + 0.8 * (1 + math.cos(math.pi * t / 2)) / 2  # noqa: E731
    assert per_epoch.tolist() == pytest.approx([tau(s // 3 + 1) for s in range(12)], rel=1e-15)
    assert per_step.tolist() == pytest.approx([tau(s / 3) for s in range(12)], rel=1e-15)
    assert per_epoch[3] == pytest.approx(0.1) and per_step[0] == 0.9 and per_step[6] == pytest.approx(0.1)


# -- one place sets every scheduled value -----------------------------------------------------------
class ScheduledToy(TrainingTask):
    """Three parameter groups (one on the lr schedule, one ``fixed_lr``, one with its own weight-decay schedule)
    and two hyper-parameters of its own; records what each step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.head, self.scale = (nn.Parameter(torch.ones(shape)) for shape in ((3,), (2,), (2, 2)))
        self.temperature = 0.5  # the constant a run's TS schedule replaces
        self.optimizer: torch.optim.Optimizer | None = None
        self.seen: list[dict[str, float]] = []

    def param_groups(self) -> list[dict]:
        return [{"params": [self.weight]}, {"params": [self.head], "fixed_lr": True},
                {"params": [self.scale], "wd_schedule": "scale_decay"}]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {"temperature": constant_schedule(self.temperature, total_steps),
                "teacher_momentum": ema_momentum_schedule(0.9, total_steps),
                "scale_decay": cosine_schedule(1e-3, 1e-4, total_steps)}

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        groups = self.optimizer.param_groups
        self.seen.append({"lr": groups[0]["lr"], "fixed_lr": groups[1]["lr"], "scale_decay": groups[2]["weight_decay"],
                          "temperature": self.temperature})
        return StepOutput(views[0].mean() * (self.weight.sum() + self.head.sum() + self.scale.sum()) / self.temperature)

    def on_step_end(self) -> None:
        self.seen[-1]["teacher_momentum"] = self.teacher_momentum


def test_the_engine_sets_every_schedule_at_every_step_and_logs_it(tmp_path):
    """lr, a group's weight decay, the task's momentum and temperature, as the task sees them at step s, are the
    precomputed arrays at s; the fixed_lr group keeps its base lr; each metric record holds its step's values."""
    toy = ScheduledToy()
    toy.optimizer = torch.optim.SGD(toy.param_groups(), lr=0.4, momentum=0.9, weight_decay=5e-4)
    total, steps_per_epoch = 9, 3  # 20 images in batches of 8, 3 epochs
    lr = cosine_schedule(0.4, 0.0, total, warmup_steps=2)
    temperature = ts_temperature_schedule(0.1, 1.0, 1, total, steps_per_epoch, per_epoch=False)
    images = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
    settings = TrainSettings(epochs=3, batch_size=8, log_every=1, progress=False)
    trainer = Trainer(toy, toy.optimizer, {"lr": lr, "temperature": temperature}, images,
                      PadCropFlip(torch.zeros(1), torch.ones(1), pad=0), tmp_path, settings)
    trainer.fit()

    expected = {"lr": lr, "fixed_lr": np.full(total, 0.4), "scale_decay": cosine_schedule(1e-3, 1e-4, total),
                "temperature": temperature, "teacher_momentum": ema_momentum_schedule(0.9, total)}
    assert len(toy.seen) == total
    for step, seen in enumerate(toy.seen):
        assert seen == {name: values[step] for name, values in expected.items()}, step
    assert [g["weight_decay"] for g in toy.optimizer.param_groups[:2]] == [5e-4, 5e-4]  # not scheduled
    records = [r for r in read_metrics(tmp_path) if "train/lr" in r]
    assert [r["step"] for r in records] == list(range(total))
    for name in ("lr", "scale_decay", "temperature", "teacher_momentum"):
        assert [r[f"train/{name}"] for r in records] == pytest.approx(expected[name].tolist(), rel=1e-15), name


def test_schedules_refuse_a_wrong_length_and_a_name_nothing_takes():
    toy = ScheduledToy()
    optimizer = torch.optim.SGD(toy.param_groups(), lr=0.1)
    with pytest.raises(ScheduleError, match="schedule 'lr' has \\(8,\\) values for a run of 9 steps"):
        Schedules(toy, optimizer, {"lr": np.zeros(8)}, 9, 3)
    with pytest.raises(ScheduleError, match="schedule 'student_temperature': neither ScheduledToy nor"):
        Schedules(toy, optimizer, {"lr": np.zeros(9), "student_temperature": np.ones(9)}, 9, 3)
    with pytest.raises(ScheduleError, match="no schedule 'lr', which the optimizer's groups follow"):
        Schedules(toy, optimizer, {}, 9, 3)


def test_a_group_with_a_weight_decay_end_goes_there_on_a_cosine_from_its_own():
    """DINO's weight decay: the group that sets ``weight_decay_end`` follows the schedule "weight_decay", a cosine
    from the optimizer's weight decay to that value; the others keep theirs; two groups cannot want two cosines."""
    weights, biases = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [weights], "weight_decay_end": 0.4},
                                   {"params": [biases], "weight_decay": 0.0}], lr=0.1, weight_decay=0.04)
    schedules = Schedules(TrainingTask(), optimizer, {"lr": np.full(4, 0.1)}, 4, 2)
    assert np.array_equal(schedules.values["weight_decay"], cosine_schedule(0.04, 0.4, 4))
    for step in range(4):
        schedules.apply(step)
        assert optimizer.param_groups[0]["weight_decay"] == cosine_schedule(0.04, 0.4, 4)[step]
        assert optimizer.param_groups[1]["weight_decay"] == 0.0
    other = torch.optim.AdamW([{"params": [weights], "weight_decay_end": 0.4},
                               {"params": [biases], "weight_decay_end": 0.1}], weight_decay=0.04)
    with pytest.raises(ScheduleError, match="parameter groups go from and to different weight decays"):
        Schedules(TrainingTask(), other, {"lr": np.full(4, 0.1)}, 4, 2)


# -- the EMA teacher ---------------------------------------------------------------------------------
def test_ema_teacher_is_a_frozen_copy_of_the_named_parts_and_moves_by_the_given_momentum():
    student = nn.Module()
    student.backbone, student.projector, student.predictor = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)
    teacher = ema_teacher(student, ("backbone", "projector"))
    assert [name for name, _ in teacher.named_children()] == ["backbone", "projector"]
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(t, s) and t is not s for t, s in zip(teacher.parameters(), [
        *student.backbone.parameters(), *student.projector.parameters()]))
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, 0.75)
    students = [*student.backbone.parameters(), *student.projector.parameters()]
    for t, b, s in zip(teacher.parameters(), before, students, strict=True):
        assert torch.allclose(t, 0.75 * b + 0.25 * s, rtol=0, atol=1e-7)  # theta_t <- m theta_t + (1 - m) theta_s


# -- resume -------------------------------------------------------------------------------------------
STEP_LR = {"epochs": 4, "warmup_epochs": 2, "lr_schedule": "step", "milestones": [2, 3], "lr_factors": [0.1, 0.01]}


@pytest.mark.slow
def test_resume_at_the_warm_up_end_and_a_milestone_is_bit_exact(tiny_cfg, interrupted_then_resumed):
    """The crash after epoch 2 falls where the warm-up ends and the first milestone drops the lr."""
    straight, resumed = interrupted_then_resumed(tiny_cfg(optim=STEP_LR))
    a, b = load_safe(straight / BACKBONE_FILE)["backbone"], load_safe(resumed / BACKBONE_FILE)["backbone"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [[r for r in read_metrics(run) if "train/lr" in r] for run in (straight, resumed)]
    assert records[0] == records[1]
    lrs = sorted({r["train/lr"] for r in records[0]}, reverse=True)
    assert len(lrs) > 3 and lrs[1] < lrs[0] and lrs[-2:] == pytest.approx([lrs[0] * 0.1, lrs[0] * 0.01])


@pytest.mark.slow
def test_a_checkpoint_from_before_schedules_with_its_lambdalr_state_resumes_exactly(tiny_cfg, tmp_path):
    """Old checkpoints hold a "scheduler" (a LambdaLR's state) and their optimizer groups an "initial_lr": both are
    ignored, and the run continues as an uninterrupted one."""
    cfg = tiny_cfg(optim=STEP_LR)
    straight = pretrain(cfg, tmp_path / "straight")
    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "old", callbacks=[crash_after(2)])
    checkpoint = tmp_path / "old" / CHECKPOINT_FILE
    state = load_safe(checkpoint)
    groups = state["optimizer"]["param_groups"]
    for group in groups:
        group["initial_lr"] = group["lr"]
    state["scheduler"] = {"base_lrs": [g["lr"] for g in groups], "last_epoch": 30, "_step_count": 31,
                          "_get_lr_called_within_step": False, "_last_lr": [g["lr"] for g in groups],
                          "lr_lambdas": [None] * len(groups)}
    torch.save(state, checkpoint)
    resumed = pretrain(cfg, tmp_path / "old", resume=True)
    assert "scheduler" not in load_safe(checkpoint)
    a, b = load_safe(straight / BACKBONE_FILE)["backbone"], load_safe(resumed / BACKBONE_FILE)["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resuming_with_more_epochs_puts_excbs_centroid_decay_on_the_new_cosine(tiny_cfg, tmp_path, monkeypatch):
    """Every scheduled value comes from the step and the run's new length. Before engine/schedules.py the first
    step after the resume ran at the centroids' decay that the optimizer state held, the old run's next value
    (1e-4 at the end of a 2-epoch cosine), where the 3-epoch cosine gives 3.25e-4."""
    decays, step = [], torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        decays.append(self.param_groups[-1]["weight_decay"])  # ExCB's centroids, its last group
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    method = {"name": "excb", "proj_hidden": 32, "pred_hidden": 32, "num_clusters": 16,
              "centroid_weight_decay": [1e-3, 1e-4]}
    run = tmp_path / "run"
    pretrain(tiny_cfg(method=method, optim={"epochs": 2}), run)
    decays.clear()
    pretrain(tiny_cfg(method=method, optim={"epochs": 3}), run, resume=True)
    steps_per_epoch = len(decays)
    assert decays == pytest.approx(cosine_schedule(1e-3, 1e-4, 3 * steps_per_epoch)[2 * steps_per_epoch:].tolist(),
                                   rel=1e-12)
