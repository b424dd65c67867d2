"""DINO (methods/dino.py, Caron et al. 2021): its centring, teacher temperature and multi-crop loss by hand, its
config section, the freezing of the last layer and the clipping of each tensor, a digits run and a resumed run. Two
processes that train as one: tests/test_distributed.py. Equality with the authors' code and lightly's loss:
tests/reference/test_ref_dino.py."""
import math

import numpy as np
import pytest
import torch

from imbssl.config import ConfigError, ModelConfig, OptimConfig, build_config
from imbssl.engine.checkpoint import load_safe
from imbssl.engine.optim import build_optimizer
from imbssl.engine.runlog import read_metrics
from imbssl.engine.schedules import Schedules
from imbssl.engine.trainer import CHECKPOINT_FILE, optimizer_step
from imbssl.methods import build_method
from imbssl.methods.dino import DINOConfig, centre, multi_crop_loss, teacher_temperature_schedule
from imbssl.models import build_backbone
from imbssl.pipelines.evaluate import evaluate_run
from imbssl.pipelines.pretrain import pretrain


def test_centring_subtracts_the_centre_then_moves_it_to_the_batch_mean():
    """z - c with the old c; then c <- 0.9 c + 0.1 mean(z) (Eq. 4): the batch mean of z is (2, 4)."""
    z, center = torch.tensor([[1.0, 3.0], [3.0, 5.0]]), torch.tensor([1.0, 1.0])
    assert torch.equal(centre(z, center, momentum=0.9), torch.tensor([[0.0, 2.0], [2.0, 4.0]]))
    assert torch.allclose(center, torch.tensor([1.1, 1.3]))


def test_multi_crop_loss_pairs_each_global_view_with_every_other_view_by_hand():
    """Teacher views 0 and 1 put all mass on dimensions 0 and 1; the student's three views give dimension 0 the
    probabilities 3/4, 1/2 and 1/4. The pairs (0, 1), (0, 2), (1, 0), (1, 2) cost -log 1/2, -log 1/4, -log 1/4 and
    -log 3/4; the pairs of a view with itself, (0, 0) and (1, 1), are skipped (Eq. 3)."""
    p_teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [G=2, B=1, K=2]
    logits = torch.tensor([[[math.log(3), 0.0]], [[0.0, 0.0]], [[0.0, math.log(3)]]])  # [V=3, B=1, K=2]
    expected = (math.log(2) + math.log(4) + math.log(4) - math.log(3 / 4)) / 4
    assert multi_crop_loss(p_teacher, logits).item() == pytest.approx(expected, rel=1e-6)


def test_sharpening_and_centring_by_hand():
    """The teacher's P_t = softmax((z - c) / tau_t): at tau_t = 0.04 a gap of 0.1 between two dimensions is a factor
    e^2.5; a centre equal to the gap evens it out."""
    method = build_method(DINOConfig(out_dim=2, proj_hidden=8, proj_dim=4),
                          build_backbone(ModelConfig(backbone="small_cnn", width=0.25), 3))
    method.teacher.forward = lambda views: torch.tensor([[0.1, 0.0], [0.1, 0.0]])
    method.teacher_temperature = 0.04
    p = method.teacher_distributions([torch.zeros(1, 3, 8, 8)] * 2)
    assert p.shape == (2, 1, 2)
    assert p[0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-2.5)), rel=1e-6)
    assert torch.allclose(method.center, torch.tensor([0.01, 0.0]))  # 0.1 of the way to the batch mean
    method.center.copy_(torch.tensor([0.1, 0.0]))
    assert torch.allclose(method.teacher_distributions([torch.zeros(1, 3, 8, 8)] * 2), torch.full((2, 1, 2), 0.5))


def test_the_teacher_temperature_warms_up_per_epoch_as_their_schedule():
    """0.04 -> 0.07 over 3 epochs of 2 steps: epoch e holds linspace(0.04, 0.07, 3)[e], then 0.07; a warm-up longer
    than the run is cut; without a warm-up tau_t is constant."""
    schedule = teacher_temperature_schedule(0.04, 0.07, 3, total_steps=10, steps_per_epoch=2)
    assert np.allclose(schedule, [0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07, 0.07])
    assert np.allclose(teacher_temperature_schedule(0.04, 0.07, 30, 4, 2), [0.04, 0.04] + [0.04 + 0.03 / 29] * 2)
    assert np.array_equal(teacher_temperature_schedule(0.01, 0.04, 0, 3, 1), [0.04] * 3)


@pytest.mark.parametrize("section,problem", [
    ({"teacher_temp": 0}, "method.teacher_temp: Input should be greater than 0"),
    ({"center_momentum": 1}, "method.center_momentum: Input should be less than 1"),
    ({"nlayers": 0}, "method.nlayers: Input should be greater than or equal to 1"),
    ({"out_dim": 1}, "method.out_dim: Input should be greater than or equal to 2"),
    ({"clip_grad": -1}, "method.clip_grad: Input should be greater than or equal to 0"),
    ({"teacher_momentum": 0.99}, "method.teacher_momentum is not a key of dino's section"),
])
def test_config_section_refuses_bad_values_in_one_line(section, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        build_config({"method": {"name": "dino", **section}})
    assert "\n" not in str(err.value)


def small_dino(**section) -> tuple:
    """A DINO on the small CNN, its AdamW and schedules over 2 epochs of 2 steps, and 2 + 2 views of 6 images."""
    torch.manual_seed(0)
    method = build_method(DINOConfig(out_dim=16, proj_hidden=32, proj_dim=8, **section),
                          build_backbone(ModelConfig(backbone="small_cnn", width=0.25), 3))
    optimizer = build_optimizer(method, OptimConfig(), method.defaults, 6)
    schedules = Schedules(method, optimizer, {"lr": np.full(4, 0.01)}, 4, 2)
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(6, 3, 16, 16, generator=gen) for _ in range(2)]
    views += [torch.randn(6, 3, 8, 8, generator=gen) for _ in range(2)]
    return method, optimizer, schedules, views


def step(method, optimizer, schedules, views, global_step: int, steps_per_epoch: int = 2):
    if global_step % steps_per_epoch == 0:
        method.on_epoch_start(global_step // steps_per_epoch)
    schedules.apply(global_step)
    out = optimizer_step(method, optimizer, views, torch.arange(len(views[0])))
    method.on_step_end()
    return out


def test_the_last_layer_is_frozen_in_the_first_epoch_and_its_norm_stays_1():
    """--freeze_last_layer 1: no gradient reaches the last layer and it does not move in epoch 0, then it learns;
    --norm_last_layer: its weight norm g is no parameter of the optimizer and stays 1 in student and teacher."""
    method, optimizer, schedules, views = small_dino()
    last = method.head.last_layer
    assert all(last.weight_g is not p for group in optimizer.param_groups for p in group["params"])
    before = last.weight_v.detach().clone()
    for s in (0, 1):
        step(method, optimizer, schedules, views, s)
        assert last.weight_v.grad is None and torch.equal(last.weight_v, before)
        assert method.head.mlp[0].weight.grad is not None
    step(method, optimizer, schedules, views, 2)
    assert last.weight_v.grad is not None and not torch.equal(last.weight_v, before)
    assert torch.equal(last.weight_g, torch.ones_like(last.weight_g))
    assert torch.equal(method.teacher.head.last_layer.weight_g, torch.ones_like(last.weight_g))


def test_a_free_weight_norm_learns():
    method, optimizer, schedules, views = small_dino(norm_last_layer=False, freeze_last_layer=0)
    step(method, optimizer, schedules, views, 0)
    assert not torch.equal(method.head.last_layer.weight_g, torch.ones_like(method.head.last_layer.weight_g))


def test_each_tensor_is_clipped_on_its_own():
    """--clip_grad: every tensor's gradient norm is cut to the clip norm, and the tensors below it keep theirs."""
    raw, _, schedules, views = small_dino(clip_grad=0)
    clipped, optimizer, clipped_schedules, _ = small_dino(clip_grad=1.0)
    step(raw, torch.optim.SGD(raw.param_groups(), lr=0.0), schedules, views, 0)
    step(clipped, optimizer, clipped_schedules, views, 0)
    raw_grads = {k: p.grad for k, p in raw.named_parameters() if p.grad is not None}
    cut = 0
    for name, p in clipped.named_parameters():
        if p.grad is None:
            continue
        norm = raw_grads[name].norm()
        if norm > 1.0:
            cut += 1
            assert torch.allclose(p.grad, raw_grads[name] / (norm + 1e-6), rtol=1e-5, atol=0), name
        else:
            assert torch.equal(p.grad, raw_grads[name]), name
    assert 0 < cut < len(raw_grads)


def test_the_weight_decay_goes_from_optim_weight_decay_to_weight_decay_end_on_a_cosine():
    """Their wd_schedule on the weights (biases and normalisation weights without decay); the teacher gets neither
    gradient nor decay and follows the student by EMA."""
    method, optimizer, schedules, views = small_dino(weight_decay_end=0.2)
    decayed, free = optimizer.param_groups
    values = [schedules.apply(s)["weight_decay"] for s in range(4)]
    assert np.allclose(values, 0.2 + (0.04 - 0.2) * (1 + np.cos(np.pi * np.arange(4) / 4)) / 2)
    assert decayed["weight_decay"] == values[-1] and free["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    teacher = {id(p) for p in method.teacher.parameters()}
    assert not teacher & {id(p) for group in optimizer.param_groups for p in group["params"]}


def dino_cfg(tiny_cfg, **sections):
    """DINO at the authors' optimizer settings, K = 256, 2 local crops, on the tiny config's digits."""
    return tiny_cfg(method={"name": "dino", "out_dim": 256, "proj_hidden": 128, "proj_dim": 64},
                    augment={"local_crops": 2}, **sections)


@pytest.mark.slow
def test_a_digits_run_learns_the_teacher_without_collapse(tiny_cfg, tmp_path):
    """4 epochs on digits: the student's KL divergence to the teacher, the loss minus the teacher's entropy (Fig. 7),
    falls (about 2.2 to 1.9); the teacher's entropy stays well below log K, its uniform collapse (about 3.6 of 5.5;
    a teacher as soft as the student, tau_t = tau_s, reaches 5.2), and the student's outputs do not collapse to a
    point (collapse_ratio about 0.19). The probes read the teacher's backbone. (At this scale DINO does not beat a
    randomly initialised backbone's probes, about 82%.)"""
    run = pretrain(dino_cfg(tiny_cfg, optim={"epochs": 4}, eval={"knn_k": [5]}), tmp_path / "run")
    first, *_, last = [r for r in read_metrics(run) if "epoch/loss" in r]
    kl = [r["epoch/loss"] - r["epoch/teacher_entropy"] for r in (first, last)]
    assert kl[1] < kl[0] - 0.1
    assert last["epoch/teacher_entropy"] < 0.8 * math.log(256)
    assert last["epoch/collapse_ratio"] > 0.1
    result = evaluate_run(run)
    assert result.linear.top1 > 50 and result.knn[5].top1 > 50  # chance: 10


@pytest.mark.slow
def test_a_resumed_run_equals_a_straight_one(tiny_cfg, interrupted_then_resumed):
    """The centre and the teacher are saved; the last layer, frozen in the first epoch, is free in the third, which
    the resumed run starts with (a run that kept the freezing of its first epoch would leave it unchanged)."""
    cfg = dino_cfg(tiny_cfg, data={"subset": {"profile": "exp", "imbalance": 10}},
                   optim={"epochs": 3, "batch_size": 100})
    straight, resumed = interrupted_then_resumed(cfg)
    a, b = (load_safe(run / CHECKPOINT_FILE)["method"] for run in (straight, resumed))
    assert a.keys() == b.keys() and "center" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
