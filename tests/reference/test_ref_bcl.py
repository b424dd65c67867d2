"""BCL-I and BCL-D step by step against MediaBrain-SJTU/BCL's own code (fixtures/bcl_i.safetensors,
fixtures/bcl_d.safetensors; make_bcl.py).

The same seeded CIFAR ResNet-18 with BCL's 2-layer head, the same two views of 8 images (a dataset of 8, in a
shuffled order), a seeded memory after epoch 1, one step of epoch 2 with SGD at lr 0.5: imbssl's loss, every
gradient, every weight and buffer after the step and the momentum-loss memory after it equal the reference's to fp32
round-off; so do each image's boost weight w at the next epoch and the RandAugment that w makes: k ops, strength m,
probability p (BCL-D with the reference's own u).

What "D" changes in BCL's code (train_sdclr.py against train.py): the base method is SDCLR (a pruned branch with
dual BN, 90% global magnitude pruning) and the memory holds each image's NT-Xent between its dense view and its
pruned view, the loss of the dense branch's pass (the pruned branch's pass against the detached dense outputs holds
the same numbers); RandAugment takes k = 2 ops at m = 5 + 25 w u. The memory's update and the weights are BCL-I's.

Differences on purpose: the RandAugment ops themselves run batched on float tensors, not on PIL images (their draws
differ; tests/test_bcl.py checks the ops against PIL), and BCL-D inherits SDCLR's single pruned forward, so the
pruned branch's BatchNorm statistics move once per step where BCL's move twice (as test_ref_sdclr.py shows).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from sdclr_bcl_helpers import (assert_grads_close, bcl_simclr_name, pruned_bn_statistics, reference_keys,  # noqa: E402
                               reference_views, sdclr_mask_name, sdclr_name, subset)

import imbssl.methods.bcl as bcl  # noqa: E402
from imbssl.augment import BatchRows  # noqa: E402
from imbssl.config import ModelConfig, OptimConfig  # noqa: E402
from imbssl.engine.optim import build_optimizer  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods import SDCLR, SECTIONS, build_method  # noqa: E402
from imbssl.models import build_backbone  # noqa: E402

FIXTURES = {"bcl-i": fixture_io.load("bcl_i"), "bcl-d": fixture_io.load("bcl_d")}
#: each variant's names -> imbssl's, and the bias right before a BatchNorm (exact gradient 0)
NAMES = {"bcl-i": (bcl_simclr_name, "projector.fc1.bias"), "bcl-d": (sdclr_name, "fc.fc1.bias")}
RTOL = 1e-5
VARIANTS = pytest.mark.parametrize("name", ["bcl-i", "bcl-d"])


def _bcl(name: str) -> bcl.BoostedContrast:
    """imbssl's BCL-I or BCL-D on a CIFAR ResNet-18, holding the reference's seeded weights and memory."""
    fixture = FIXTURES[name]
    cfg = fixture.meta["config"]
    pruning = {"prune_ratio": cfg["prune_percent"]} if "prune_percent" in cfg else {}  # BCL-D's
    method = build_method(SECTIONS[name](proj_dim=128, temperature=cfg["temperature"], beta=cfg["momentum_loss_beta"],
                                         **pruning),
                          build_backbone(ModelConfig(backbone="resnet18"), 3))
    init = fixture_io.seeded_weights(fixture.meta["shapes"], fixture.meta["seed"])
    fixture_io.assert_close(init, fixture, "init.", rtol=1e-12, atol=0)  # this torch draws the same numbers
    to_imbssl = NAMES[name][0]
    missing, unexpected = method.load_state_dict({to_imbssl(k): v for k, v in init.items()}, strict=False)
    assert not unexpected and all(k.startswith("mask_") or k == "momentum_loss" for k in missing), missing
    images = torch.zeros(len(fixture["input.memory"]), 3, 16, 16, dtype=torch.uint8)  # sizes the memory
    method.on_train_start(images, None, torch.Generator())
    method.momentum_loss.copy_(fixture["input.memory"])  # the memory after epoch 1
    return method


def _step(name: str, method: bcl.BoostedContrast, reference_bn_updates: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's epoch 2 (imbssl's 0-based 1) starts and takes one step; returns the loss and the per-image
    losses the memory took."""
    fixture = FIXTURES[name]
    cfg = fixture.meta["config"]
    method.train()
    method.on_epoch_start(cfg["epoch"] - 1)  # BCL-D: prunes, as train_prune does first
    optimizer = build_optimizer(method, OptimConfig(), method.defaults, batch_size=512)  # 0.25 per 256 images
    assert optimizer.param_groups[0]["lr"] == cfg["lr"]
    assert optimizer.param_groups[0]["weight_decay"] == cfg["weight_decay"]
    views = reference_views(fixture)
    if reference_bn_updates and isinstance(method, SDCLR):  # BCL-D: the reference's no-grad pruned forward
        with torch.no_grad():
            method.pruned_forward(views[1])
    remembered = []
    remember = method.remember
    method.remember = lambda indices, losses: (remembered.append(losses), remember(indices, losses))
    loss = optimizer_step(method, optimizer, views, fixture["input.index"]).loss
    return loss, remembered[0]


def _grads(name: str, method: bcl.BoostedContrast) -> dict[str, torch.Tensor]:
    params, to_imbssl = dict(method.named_parameters()), NAMES[name][0]
    return {k: params[to_imbssl(k)].grad for k in reference_keys(FIXTURES[name], "grad.")}


def _after(name: str, method: bcl.BoostedContrast) -> dict[str, torch.Tensor]:
    state, to_imbssl = method.state_dict(), NAMES[name][0]
    return {k: state[to_imbssl(k)] for k in reference_keys(FIXTURES[name], "after.")}


def _close(actual: torch.Tensor, fixture: fixture_io.Fixture, key: str, rtol: float = RTOL) -> fixture_io.Difference:
    diff = fixture_io.difference(actual.to(fixture[key].dtype), fixture, key)
    assert diff.max_abs <= rtol * diff.scale + 1e-7, f"{key}: max abs {diff.max_abs:.3g}"
    return diff


@pytest.mark.slow
@VARIANTS
def test_bcl_step_and_memory_equal_the_reference(name):
    """Loss, per-image losses, every gradient, every weight and buffer after, the memory after (BCL-D: with the
    reference's extra no-grad pruned forward, and its masks)."""
    fixture, method = FIXTURES[name], _bcl(name)
    loss, losses = _step(name, method, reference_bn_updates=True)
    diffs = {"loss": _close(loss, fixture, "loss"),
             "per-image losses": _close(losses, fixture, "state.losses"),
             "grads": assert_grads_close(_grads(name, method), fixture, (NAMES[name][1],), RTOL),
             "after": fixture_io.assert_close(_after(name, method), fixture, "after.", rtol=RTOL),
             "memory": _close(method.momentum_loss, fixture, "state.memory")}
    if name == "bcl-d":
        masks = method.masks()
        diffs["masks"] = fixture_io.assert_close({k: masks[sdclr_mask_name(k)] for k in
                                                  reference_keys(fixture, "state.mask.")},
                                                 fixture, "state.mask.", rtol=0, atol=0)
    for group, diff in diffs.items():  # pytest -s shows them: the figures of docs/reference-equality.md
        print(f"{name} {group}: max abs {diff.max_abs:.3g}, max rel {diff.max_rel:.3g}")


@pytest.mark.slow
def test_bcl_d_remembers_the_dense_against_pruned_loss():
    """BCL-D's memory quantity: each image's NT-Xent between its dense and its pruned view. In BCL's code that is
    the dense pass's loss (against the detached pruned outputs); its pruned pass (against the detached dense ones)
    holds the same numbers; imbssl's single undetached loss gives them too."""
    fixture = FIXTURES["bcl-d"]
    _, losses = _step("bcl-d", _bcl("bcl-d"), reference_bn_updates=False)
    _close(losses, fixture, "state.losses")
    torch.testing.assert_close(fixture["state.losses_pruned_pass"], fixture["state.losses"], rtol=1e-6, atol=0)
    memory = torch.lerp(fixture["state.losses"], fixture["input.memory"][fixture["input.index"]], 0.97)
    torch.testing.assert_close(fixture["state.memory"][fixture["input.index"]], memory, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_bcl_d_step_differs_by_default_only_in_the_pruned_batchnorm_statistics():
    """imbssl's own BCL-D step: everything equal the reference's but the pruned branch's BatchNorm statistics,
    which moved once where BCL's (SDCLR's) moved twice."""
    fixture, method = FIXTURES["bcl-d"], _bcl("bcl-d")
    loss, _ = _step("bcl-d", method, reference_bn_updates=False)
    _close(loss, fixture, "loss")
    _close(method.momentum_loss, fixture, "state.memory")
    assert_grads_close(_grads("bcl-d", method), fixture, (NAMES["bcl-d"][1],), RTOL)
    after = _after("bcl-d", method)
    twice = {k for k in after if pruned_bn_statistics(k)}
    assert twice
    fixture_io.assert_close({k: v for k, v in after.items() if k not in twice},
                            subset(fixture, "after.", twice, keep=False), "after.", rtol=RTOL)
    assert all(fixture_io.difference(after[k], fixture, "after." + k).max_abs > 1e-4 for k in twice)


@pytest.mark.slow
@VARIANTS
def test_bcl_boost_from_the_memory_equals_the_reference(name, monkeypatch):
    """At the next epoch's start: each image's weight w from the memory (z-score over max |z|), and the
    RandAugment it gets: BCL-I 1 op at m = 10 + 20 w, BCL-D 2 ops at m = 5 + 25 w u (u: the reference's draw), each
    op applied with probability w."""
    fixture, method = FIXTURES[name], _bcl(name)
    method.momentum_loss.copy_(fixture["state.memory"])
    method.on_epoch_start(fixture.meta["config"]["epoch"])  # the epoch after the reference's
    _close(method.boost_weight, fixture, "boost.weight", rtol=1e-6)
    built = []
    monkeypatch.setattr(bcl, "RandAugment", lambda num_ops, strength, prob: built.append((num_ops, strength, prob)))
    if "boost.uniform" in fixture.tensors:
        monkeypatch.setattr(method, "strength_uniforms", lambda n, generator, device: fixture["boost.uniform"].float())
    images = torch.arange(len(method.momentum_loss))  # the reference's boosts are of images 0..7 in order
    method.views(lambda *args, boost: None, torch.zeros(len(images), 3, 8, 8), torch.Generator(), BatchRows(len(images)),
                 images)
    (num_ops, strength, prob), = built
    assert fixture["boost.num_ops"].tolist() == [num_ops] * len(images)
    _close(strength, fixture, "boost.strength", rtol=1e-6)
    _close(prob, fixture, "boost.prob", rtol=1e-6)


#: BCL's data/randaug.py op names -> imbssl's augment/randaugment.py ones
OP_NAMES = {"ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x", "TranslateY": "translate_y",
            "Rotate": "rotate", "AutoContrast": "autocontrast", "Invert": "invert", "Equalize": "equalize",
            "Solarize": "solarize", "Posterize": "posterize", "Contrast": "contrast", "Color": "color",
            "Brightness": "brightness", "Sharpness": "sharpness", "Cutout": "cutout"}


def _uniforms_of_bcls_draws(draws: fixture_io.Fixture) -> torch.Tensor:
    """imbssl's per-image, per-slot uniforms [B, k, 5] (op, applies, then the op's own three) holding BCL's draws:
    the op's choice, whether it applies, its direction; cutout's centre (from (1, size]: u = (centre - 1) /
    (size - 1)). Slots that draw no centre get an identifier there instead (their ops do not read it), so each op
    call below can be traced to its image and slot."""
    size = draws.meta["image_size"]
    choice = draws["draw.choice_u"]
    u = torch.zeros(*choice.shape, 5, dtype=torch.float64)
    u[..., 0], u[..., 1], u[..., 2] = choice, draws["draw.apply_u"], draws["draw.sign_u"].nan_to_num(0.25)
    ident = (torch.arange(choice.numel(), dtype=torch.float64).view_as(choice) + 0.5) / choice.numel()
    cutout = ~draws["draw.cutout_x"].isnan()
    u[..., 3] = torch.where(cutout, (draws["draw.cutout_y"] - 1) / (size - 1), ident)
    u[..., 4] = torch.where(cutout, (draws["draw.cutout_x"] - 1) / (size - 1), 0.5)
    return u.float()


@pytest.mark.slow
def test_bcl_randaugment_makes_bcls_choices_from_bcls_draws(monkeypatch):
    """The batched RandAugment given BCL's own draws (64 images, 2 ops each, all 15 ops drawn): the same op table
    (names, ranges, order), and for every image and slot the same op, applied or not alike, at the same value v and
    direction, cutout at the same centre. What differs on purpose is only where the draws come from (one torch.rand
    per batch, not Python's random per PIL image) and the pixels' arithmetic (float tensors; tests/test_bcl.py
    compares each op with PIL)."""
    from imbssl.augment import randaugment as ra

    draws = fixture_io.load("bcl_randaugment")
    assert [(op.__name__, lo, hi) for op, lo, hi in ra.OPS] == [(OP_NAMES[n], lo, hi) for n, lo, hi in
                                                                draws.meta["ops"]]
    u = _uniforms_of_bcls_draws(draws)
    slot_of = {tuple(u[i, j, 3:].tolist()): (i, j) for i in range(u.shape[0]) for j in range(u.shape[1])}
    assert len(slot_of) == u.shape[0] * u.shape[1]
    calls = {}

    def recording(op):
        def run(x, value, own):
            for v, o in zip(value.tolist(), own.tolist()):
                calls[slot_of[tuple(o[1:])]] = (op.__name__, v, o[0])
            return op(x, value, own)
        return run

    images = torch.rand(u.shape[0], 3, draws.meta["image_size"], draws.meta["image_size"])
    monkeypatch.setattr(ra, "OPS", tuple((recording(op), lo, hi) for op, lo, hi in ra.OPS))
    monkeypatch.setattr(ra.torch, "rand", lambda *shape, **kwargs: u if shape == tuple(u.shape) else None)
    boost = ra.RandAugment(draws.meta["num_ops"], draws["input.strength"].float(), draws["input.prob"].float())
    boost(images, torch.Generator())
    monkeypatch.undo()
    value, applied = draws["draw.value"], ~draws["draw.value"].isnan()
    assert set(calls) == {tuple(ij) for ij in applied.nonzero().tolist()}  # the same ops applied, no other
    names = [OP_NAMES[n] for n, _, _ in draws.meta["ops"]]
    for (i, j), (name, v, sign_u) in calls.items():
        assert name == names[int(draws["draw.op"][i, j])], (i, j)
        assert abs(v - value[i, j].item()) <= 1e-6 * max(1.0, abs(value[i, j].item())), (i, j, name)
        if name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
            assert (sign_u > 0.5) == (draws["draw.sign_u"][i, j].item() > 0.5), (i, j, name)
    for (i, j), reference in zip(draws["cutout.event"].tolist(), draws["cutout.mask"]):  # BCL's very rectangles
        size = reference.shape[-1]
        out = ra.cutout(torch.zeros(1, 3, size, size), value[i, j].float().view(1), u[i, j, 2:].view(1, 3))
        assert torch.equal(out[0].ne(0).any(dim=0), reference), (i, j)
