"""imbssl's MoCo v2 against facebookresearch/moco, one training step (fixtures made by make_moco.py).

The reference is the CIFAR-10 demo's ``ModelMoCo`` (the colab-notebook branch): split BatchNorm in both encoders (8
groups of a batch of 16), the key encoder's batch in a random order, the asymmetric loss as the notebook runs it,
with moco/builder.py's MLP head on a ResNet-10 of torchvision's layout (CIFAR stem). imbssl gets the same weights,
views, queue, pointer and key permutation, takes one step with its own optimizer (SGD at the demo's lr 0.06, wd 5e-4,
momentum 0.9) and ``on_step_end``; the loss, every gradient, both encoders' weights and BatchNorm statistics, the
queue and its pointer must agree to fp32 round-off.

On purpose, imbssl differs from the demo in three ways the comparison accounts for: its queue is [K, d] (the
demo's [d, K], compared transposed); it moves the key encoder after the step (``on_step_end``), where the demo moves
it at the start of the next forward, so the fixture's key encoder is taken after that next update, and on the first
step the demo's update of a key encoder equal to the query's is the identity up to rounding; and its split
BatchNorm counts its training batches (``num_batches_tracked``) as BatchNorm does, where the demo's stays at 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

from imbssl.config import OptimConfig  # noqa: E402
from imbssl.engine.optim import build_optimizer  # noqa: E402
from imbssl.engine.schedules import Schedules, constant_schedule  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods import build_method  # noqa: E402
from imbssl.methods.moco import MoCoConfig, SplitBatchNorm  # noqa: E402
from imbssl.models.resnet import BasicBlock, ResNet  # noqa: E402

pytestmark = pytest.mark.slow  # every test takes the demo's step on a ResNet-10, seconds each

FIXTURE = fixture_io.load("moco-step")
META = FIXTURE.meta
#: the demo's ModelBase is an nn.Sequential "net" of torchvision's children: its indices, as imbssl's names
STAGES = {"net.0.": "backbone.stem.0.", "net.1.": "backbone.stem.1.", "net.3.0.": "backbone.layers.0.",
          "net.4.0.": "backbone.layers.1.", "net.5.0.": "backbone.layers.2.", "net.6.0.": "backbone.layers.3.",
          "net.9.0.": "projector.0.", "net.9.2.": "projector.2."}


def imbssl_name(theirs: str) -> str:
    """``encoder_q.net.4.0.downsample.1.weight`` -> ``backbone.layers.1.shortcut.1.weight``; encoder_k's under
    ``key_encoder.``; a name without an encoder prefix is the query encoder's."""
    encoder, _, name = theirs.partition(".") if theirs.startswith("encoder_") else ("encoder_q", "", theirs)
    prefix = next(p for p in STAGES if name.startswith(p))
    ours = STAGES[prefix] + name[len(prefix):].replace("downsample.", "shortcut.")
    return f"key_encoder.{ours}" if encoder == "encoder_k" else ours


def initial_queue() -> torch.Tensor:
    """The demo's queue: its [d, K] draw normalised along d, from the fixture's seed."""
    drawn = fixture_io.seeded_weights({"queue": META["queue_shape"]}, META["queue_seed"])["queue"]
    return F.normalize(drawn, dim=0)


def build_moco(**settings) -> torch.nn.Module:
    """imbssl's MoCo on ResNet-10 with the demo's settings and the fixture's initial state, checked against it."""
    demo = META["demo"]
    cfg = MoCoConfig(**{"proj_hidden": 512, "proj_dim": demo["dim"], "queue_size": demo["K"], "key_momentum": demo["m"],
                        "temperature": demo["T"], "bn_splits": demo["bn_splits"], "shuffle_bn": True, **settings})
    method = build_method(cfg, ResNet(3, [64, 128, 256, 512], (1, 1, 1, 1), BasicBlock, stem="cifar"))
    weights = fixture_io.seeded_weights(META["shapes"], META["seed"])
    queue = initial_queue()
    # the reference's draw, to the float64 rounding of the fingerprints' sums
    fixture_io.assert_close({**weights, "queue": queue}, FIXTURE, "init.", rtol=1e-12, atol=0)
    state = {imbssl_name(f"encoder_{e}.{name}"): value for name, value in weights.items() for e in "qk"}
    state |= {"queue": queue.T.contiguous(), "queue_ptr": torch.tensor(META["start_ptr"])}
    method.load_state_dict(state, strict=True)
    return method


def one_step(method: torch.nn.Module) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """The fixture's step: the views, the demo's key permutation, imbssl's SGD at the demo's lr, ``on_step_end``."""
    batch, optim = META["batch"], META["optim"]
    cfg = OptimConfig(name="sgd", base_lr=optim["lr"] * 256 / batch, weight_decay=optim["weight_decay"],
                      momentum=optim["momentum"], batch_size=batch)
    optimizer = build_optimizer(method, cfg, method.defaults, batch)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(optim["lr"], rel=1e-15)
    method.train()
    method.key_order = FIXTURE["input.key_order"].clone()
    Schedules(method, optimizer, {"lr": constant_schedule(optim["lr"], 1)}, 1, 1).apply(0)  # the engine's, at step 0
    out = optimizer_step(method, optimizer, [FIXTURE["input.im_q"], FIXTURE["input.im_k"]], torch.arange(batch))
    method.on_step_end()
    return out.loss, optimizer


def compare(actual: dict[str, torch.Tensor], prefix: str, rtol: float = 1e-5,
            atol: float = 1e-7) -> fixture_io.Difference:
    return fixture_io.assert_close(actual, FIXTURE, prefix, rtol=rtol, atol=atol)


def counters(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def after_step_state(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """imbssl's state after the step under the fixture's names: weights, BatchNorm statistics, counters."""
    ours = method.state_dict()
    return {f"{e}.{name}": ours[imbssl_name(f"{e}.{name}")] for e in ("encoder_q", "encoder_k")
            for name in META["shapes"]}


@pytest.fixture(scope="module")
def stepped():
    torch.manual_seed(0)
    method = build_moco()
    loss, _ = one_step(method)
    return method, loss


def test_loss_and_every_gradient_equal_the_demos(stepped):
    method, loss = stepped
    diff = fixture_io.difference(loss, FIXTURE, "loss")
    assert diff.max_abs <= 1e-7 + 1e-6 * diff.scale, diff
    params = dict(method.named_parameters())
    grads = {f"encoder_q.{name}": params[imbssl_name(name)].grad for name in META["shapes"]
             if f"grad.encoder_q.{name}" in FIXTURE.keys("grad.")}
    compare(grads, "grad.")


def test_weights_statistics_and_key_encoder_after_the_step_equal_the_demos(stepped):
    method, _ = stepped
    state = after_step_state(method)
    compare({k: v for k, v in state.items() if not counters(k)} | {k: v - 1 for k, v in state.items() if counters(k)},
            "after.")
    # The one difference, on purpose: every split BatchNorm counted its one training batch, the demo's none.
    theirs = {k: FIXTURE[f"after.{k}"] for k in state if counters(k)}
    assert theirs and all(int(v) == 0 for v in theirs.values())
    assert all(int(state[k]) == 1 for k in theirs)


def test_queue_and_pointer_after_the_step_equal_the_demos(stepped):
    method, _ = stepped
    start, batch = META["start_ptr"], META["batch"]
    compare({"queue": method.queue.T, "queue_block": method.queue[start:start + batch].T,
             "queue_ptr": method.queue_ptr.view(1)}, "state.", atol=1e-7)
    assert int(method.queue_ptr) == 0  # the block at the end of the queue filled, the pointer wrapped


def test_without_shuffling_bn_the_step_is_not_the_demos():
    """What imbssl computed before shuffling BN (plain BatchNorm, keys in the batch's order): the loss and the
    gradients move far beyond round-off, so the equality above rests on the split BatchNorm and the shuffle."""
    method = build_moco(bn_splits=1, shuffle_bn=False)
    loss, _ = one_step(method)
    diff = fixture_io.difference(loss, FIXTURE, "loss")
    assert diff.max_rel > 1e-3
    assert not any(isinstance(m, SplitBatchNorm) for m in method.modules())
