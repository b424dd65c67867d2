"""SDCLR step by step against VITA-Group/SDCLR's own code (fixtures/sdclr.safetensors, make_sdclr.py).

The same seeded CIFAR ResNet-18 with SDCLR's 3-layer dual-BN head, the same two views of 8 images, SDCLR's masks
at 90% global magnitude pruning, one step of SGD at lr 0.5: imbssl's masks, loss, every gradient and every weight
and buffer after the step equal the reference's to fp32 round-off.

One difference is on purpose (methods/sdclr.py): the reference runs the pruned branch twice per step (once under
no_grad for the dense branch's loss, once for its own), so the pruned branch's BatchNorm statistics move twice;
imbssl takes one backward pass of the undetached loss (the same gradient) and moves them once. With one extra
no-grad pruned forward (the reference's form), everything is equal; by default, exactly those statistics differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from sdclr_bcl_helpers import (assert_grads_close, pruned_bn_statistics, reference_keys, reference_views,  # noqa: E402
                               sdclr_mask_name, sdclr_name, subset)

from imbssl.config import ModelConfig, OptimConfig  # noqa: E402
from imbssl.engine.optim import build_optimizer  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods import SDCLR, build_method  # noqa: E402
from imbssl.methods.sdclr import SDCLRConfig  # noqa: E402
from imbssl.models import build_backbone  # noqa: E402

pytestmark = pytest.mark.slow  # two full steps of a ResNet-18 on 8 images, each several seconds

FIXTURE = fixture_io.load("sdclr")
CONFIG = FIXTURE.meta["config"]
RTOL = 1e-5


def _sdclr() -> SDCLR:
    """imbssl's SDCLR on a CIFAR ResNet-18, holding the reference's seeded initial weights."""
    cfg = SDCLRConfig(proj_dim=CONFIG["output_ch"], temperature=CONFIG["temperature"],
                      prune_ratio=CONFIG["prune_percent"])
    method = build_method(cfg, build_backbone(ModelConfig(backbone="resnet18"), 3))
    init = fixture_io.seeded_weights(FIXTURE.meta["shapes"], FIXTURE.meta["seed"])
    fixture_io.assert_close(init, FIXTURE, "init.", rtol=1e-12, atol=0)  # this torch draws the same numbers
    missing, unexpected = method.load_state_dict({sdclr_name(k): v for k, v in init.items()}, strict=False)
    assert not unexpected and all(k.startswith("mask_") for k in missing), (missing, unexpected)
    return method


def _step(method: SDCLR, reference_bn_updates: bool) -> torch.Tensor:
    """SDCLR's epoch start (pruning) and one training step, as the trainer takes it; returns the loss."""
    method.train()
    method.on_epoch_start(0)
    optimizer = build_optimizer(method, OptimConfig(), method.defaults, batch_size=512)  # 0.25 per 256 images
    assert optimizer.param_groups[0]["lr"] == CONFIG["lr"]
    assert optimizer.param_groups[0]["weight_decay"] == CONFIG["weight_decay"]
    views = reference_views(FIXTURE)
    if reference_bn_updates:  # the reference's no-grad pruned forward, before its two backward passes
        with torch.no_grad():
            method.pruned_forward(views[1])
    return optimizer_step(method, optimizer, views, torch.arange(len(views[0]))).loss


def _loss_difference(loss: torch.Tensor) -> fixture_io.Difference:
    diff = fixture_io.difference(loss.reshape(()), FIXTURE, "loss")
    assert diff.max_abs <= RTOL * diff.scale, f"loss: {loss.item()} against {FIXTURE['loss'].item()}"
    return diff


def _masks(method: SDCLR) -> dict[str, torch.Tensor]:
    masks = method.masks()
    return {k: masks[sdclr_mask_name(k)] for k in reference_keys(FIXTURE, "state.mask.")}


def _grads(method: SDCLR) -> dict[str, torch.Tensor]:
    params = dict(method.named_parameters())
    return {k: params[sdclr_name(k)].grad for k in reference_keys(FIXTURE, "grad.")}


def _after(method: SDCLR) -> dict[str, torch.Tensor]:
    state = method.state_dict()
    return {k: state[sdclr_name(k)] for k in reference_keys(FIXTURE, "after.")}


def test_sdclr_step_equals_the_reference_with_its_second_pruned_forward():
    """With the reference's extra no-grad pruned forward: masks exact, loss, gradients and every weight and buffer
    after the step within fp32 round-off."""
    method = _sdclr()
    outputs = []  # the head's, in the reference's order: pruned (no_grad), dense, pruned
    method.projector.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    loss = _step(method, reference_bn_updates=True)
    diffs = {"masks": fixture_io.assert_close(_masks(method), FIXTURE, "state.mask.", rtol=0, atol=0),
             "outputs": fixture_io.assert_close(dict(zip(["pruned_no_grad", "dense", "pruned"], outputs)), FIXTURE,
                                                "out.", rtol=RTOL),
             "loss": _loss_difference(loss),
             "grads": assert_grads_close(_grads(method), FIXTURE, ("fc.fc1.bias",), RTOL),
             "after": fixture_io.assert_close(_after(method), FIXTURE, "after.", rtol=RTOL)}
    for group, diff in diffs.items():  # pytest -s shows them: the figures of docs/reference-equality.md
        print(f"sdclr {group}: max abs {diff.max_abs:.3g}, max rel {diff.max_rel:.3g}")


def test_sdclr_step_differs_by_default_only_in_the_pruned_batchnorm_statistics():
    """imbssl's own step (one pruned forward): the loss, every gradient and every weight equal the reference's, and
    so do all BatchNorm statistics but the pruned branch's, which moved once where the reference's moved twice."""
    method = _sdclr()
    _loss_difference(_step(method, reference_bn_updates=False))
    assert_grads_close(_grads(method), FIXTURE, ("fc.fc1.bias",), RTOL)
    after = _after(method)
    twice = {k for k in after if pruned_bn_statistics(k)}
    assert len(twice) == 3 * sum(".bn_list.1.running_mean" in k for k in after) > 0
    fixture_io.assert_close({k: v for k, v in after.items() if k not in twice},
                            subset(FIXTURE, "after.", twice, keep=False), "after.", rtol=RTOL)
    for key in twice:
        assert fixture_io.difference(after[key], FIXTURE, "after." + key).max_abs > 1e-4, key
    counters = [after[k].item() for k in twice if k.endswith("num_batches_tracked")]
    assert set(counters) == {1} and FIXTURE["after.bn1.bn_list.1.num_batches_tracked"].item() == 2
