"""SimSiam against both of its reference codes, one training step on the same weights and views: the loss, every
gradient, the weights after the SGD step, the BatchNorm buffers (and the learning rates) after it.

- facebookresearch/simsiam (fixtures/simsiam_fair.safetensors, make_simsiam_fair.py): the authors' code, whose head
  layout imbssl follows (no bias before a BatchNorm, an affine-free BN on the projector's output, a predictor whose
  hidden layer has BN and whose output has a bias), on torchvision's ResNet-18. Theirs has 3 projector layers,
  imbssl's SimSiam 2 (PatrickHua's CIFAR config, ``proj_layers: 2``): the test builds imbssl's projector with
  ``heads.mlp(num_layers=3)``, its own head builder. Their last Linear keeps a frozen bias: it leaves the loss and
  the gradients alone (the BN subtracts it) and moves that BN's running mean by exactly 1 - 0.9^2 times itself.
- PatrickHua/SimSiam (fixtures/simsiam_hua*.safetensors, make_simsiam_hua.py), its CIFAR config, on its
  ``resnet18_cifar_variant1`` (imbssl's CIFAR-stem ResNet-18). Its heads add biases before their BatchNorms and an
  affine output BN. With heads of its layout swapped in, imbssl equals it; with those extra parameters neutral
  (0 biases, BN weight 1, bias 0: the ``-neutral`` fixture), imbssl's own heads equal it but for the extra
  parameters' own gradients and updates, which is exactly the difference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402
from simclr_reference import ROUND_OFF, compare_noise_aware  # noqa: E402

from imbssl.config import ModelConfig, OptimConfig  # noqa: E402
from imbssl.engine.optim import build_optimizer  # noqa: E402
from imbssl.engine.schedules import Schedules, cosine_schedule  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods import build_method  # noqa: E402
from imbssl.methods.simsiam import SimSiam, SimSiamConfig  # noqa: E402
from imbssl.models import build_backbone  # noqa: E402
from imbssl.models.heads import mlp  # noqa: E402
from imbssl.models.resnet import torchvision_state_dict  # noqa: E402

FAIR = fixture_io.load("simsiam_fair")
HUA = fixture_io.load("simsiam_hua")
HUA_NEUTRAL = fixture_io.load("simsiam_hua-neutral")
#: SimSiam at seeded initial weights is ill-conditioned in float32: its loss is a mean of near-zero cosines and its
#: heads' BatchNorms see 4 rows, so float32 and float64 runs of the same step differ by up to ~1e-3 relative on
#: some gradients (against imbssl in float64, whole-tensor gradients: facebookresearch's 6.4e-4 and imbssl's 6.2e-4;
#: PatrickHua's 4.1e-5 and imbssl's 4.2e-5). The two float32 runs, the same operations in nearly the same order,
#: agree closer than that; 1e-4 leaves room for the thread count (2 threads under pytest: up to 5e-5) and still
#: catches any change of the step itself.
RTOL = 1e-4
#: PatrickHua's biases with a zero gradient but for round-off: those that feed a BatchNorm, and the projector's
#: output BN bias (it shifts z by a constant that the predictor's first BN removes; as the target z is detached)
HUA_ZERO_GRAD = ("projector.layer1.0.bias", "projector.layer3.0.bias", "predictor.layer1.0.bias",
                 "projector.layer3.1.bias")
#: PatrickHua's heads' modules -> imbssl's head indices (heads.mlp: Linear, BN, ReLU, Linear[, BN])
HUA_HEADS = {"projector.layer1.0.": "projector.0.", "projector.layer1.1.": "projector.1.",
             "projector.layer3.0.": "projector.3.", "projector.layer3.1.": "projector.4.",
             "predictor.layer1.0.": "predictor.0.", "predictor.layer1.1.": "predictor.1.",
             "predictor.layer2.": "predictor.3."}


def backbone_names(method: SimSiam, prefix: str) -> dict[str, str]:
    """The reference's ResNet names (torchvision's, under ``prefix``) -> imbssl's, by imbssl's export map."""
    exported = [k for k in torchvision_state_dict(method.backbone) if not k.startswith("fc.")]
    return {prefix + tv: f"backbone.{ours}" for tv, ours in zip(exported, method.backbone.state_dict())}


def head_names(method: SimSiam, mapping: dict[str, str]) -> dict[str, str]:
    """The reference's head names -> imbssl's, for every tensor imbssl's heads hold."""
    ours = [f"{head}.{k}" for head in ("projector", "predictor") for k in getattr(method, head).state_dict()]
    names = {}
    for theirs_prefix, ours_prefix in mapping.items():
        names.update({theirs_prefix + k[len(ours_prefix):]: k for k in ours if k.startswith(ours_prefix)})
    return names


def load_fixture_weights(method: SimSiam, names: dict[str, str], fixture: fixture_io.Fixture,
                         neutral: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The fixture's initial weights, drawn again from its seed and checked against its prints, into ``method``
    (every one of its tensors); returns the reference's whole initial state."""
    initial = fixture_io.seeded_weights(fixture.meta["shapes"], fixture.meta["seed"])
    initial.update({k: torch.full_like(initial[k], v) for k, v in (neutral or {}).items()})
    fixture_io.assert_close(initial, fixture, "init.", rtol=1e-12, atol=0)  # prints: float64 sums
    method.load_state_dict({names[k]: v for k, v in initial.items() if k in names}, strict=True)
    return initial


def only(fixture: fixture_io.Fixture, prefix: str, keys) -> fixture_io.Fixture:
    """The fixture with, under ``prefix``, only ``keys``: what imbssl has a counterpart of."""
    keys = {prefix + k for k in keys}
    return fixture_io.Fixture({k: v for k, v in fixture.tensors.items()
                               if not k.startswith(prefix) or fixture_io.name_of(k) in keys}, fixture.meta)


def sgd(method: SimSiam, fixture: fixture_io.Fixture, weight_decay: float):
    """imbssl's optimizer as the project builds it, at the reference's lr (imbssl scales base_lr by batch / 256),
    with its cosine schedule and no warm-up: its first step at the full lr, as both references' first step."""
    batch = fixture.meta["batch"]
    cfg = OptimConfig(name="sgd", base_lr=fixture.meta["lr"] * 256 / batch, weight_decay=weight_decay, momentum=0.9)
    optimizer = build_optimizer(method, cfg, method.defaults, batch)
    schedules = Schedules(method, optimizer, {"lr": cosine_schedule(optimizer.defaults["lr"], 0.0, 100)}, 100, 1)
    schedules.apply(0)
    return optimizer, schedules


def step(method: SimSiam, optimizer, fixture: fixture_io.Fixture):
    views = [fixture["input.view1"], fixture["input.view2"]]
    return optimizer_step(method, optimizer, views, torch.arange(views[0].shape[0]))


def compare(method: SimSiam, names: dict[str, str], fixture: fixture_io.Fixture, loss: torch.Tensor,
            noise: tuple[str, ...] = (), rtol: float = RTOL, atol: float = 1e-7) -> dict[str, fixture_io.Difference]:
    """Loss, gradients, weights after, BN buffers after, for every tensor of the reference that imbssl holds."""
    params, buffers = dict(method.named_parameters()), dict(method.named_buffers())
    loss_diff = fixture_io.difference(loss, fixture, "loss")
    assert loss_diff.max_abs <= atol + rtol * loss_diff.scale, f"loss {loss.item():.8f}: {loss_diff}"
    stored = fixture_keys(fixture)
    grads = {k: params[v].grad for k, v in names.items() if v in params and f"grad.{k}" in stored}
    after = {k: params[v] for k, v in names.items() if v in params}
    state = {k: buffers[v] for k, v in names.items() if v in buffers}
    return {"loss": loss_diff,
            "grads": compare_noise_aware(grads, only(fixture, "grad.", grads), "grad.", rtol, atol, noise),
            "after": fixture_io.assert_close(after, only(fixture, "after.", after), "after.", rtol, atol),
            "state": fixture_io.assert_close(state, only(fixture, "state.", state), "state.", rtol, atol)}


def fixture_keys(fixture: fixture_io.Fixture) -> set[str]:
    return {fixture_io.name_of(k) for k in fixture.tensors}


def report(name: str, worst: dict[str, fixture_io.Difference]) -> None:
    print(name, {k: (f"{v.max_abs:.2e}", f"{v.max_rel:.2e}") for k, v in worst.items()})


# facebookresearch/simsiam ---------------------------------------------------------------------------------------

def _fair_method() -> tuple[SimSiam, dict[str, str]]:
    meta = FAIR.meta
    backbone = build_backbone(ModelConfig(backbone="resnet18", stem="imagenet"), 3)
    cfg = SimSiamConfig(proj_hidden=backbone.feature_dim, proj_dim=meta["dim"], pred_hidden=meta["pred_dim"],
                        fix_predictor_lr=True)
    method = build_method(cfg, backbone)
    # their builder's projector has 3 layers (prev_dim, prev_dim, dim); imbssl's SimSiam builds 2
    method.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim, num_layers=3, last_bn=True)
    names = backbone_names(method, "encoder.") | head_names(method, {"encoder.fc.": "projector.",
                                                                       "predictor.": "predictor."})
    assert set(FAIR.meta["shapes"]) - set(names) == set(FAIR.meta["frozen"]) == {"encoder.fc.6.bias"}
    return method, names


@pytest.mark.slow
def test_fair_one_step_equals_theirs_but_for_the_frozen_bias():
    method, names = _fair_method()
    initial = load_fixture_weights(method, names, FAIR)
    optimizer, _ = sgd(method, FAIR, FAIR.meta["weight_decay"])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(FAIR.meta["lrs"], rel=1e-12)
    out = step(method, optimizer, FAIR)
    output_bn = "encoder.fc.7.running_mean"
    worst = compare(method, {k: v for k, v in names.items() if k != output_bn}, FAIR, out.loss)
    report("facebookresearch/simsiam", worst)
    # the frozen bias b before the affine-free output BN: the two forwards (one per view) moved its running mean
    # by b each time at momentum 0.1, (1 - 0.9^2) b in all; nothing else
    frozen = initial["encoder.fc.6.bias"]
    torch.testing.assert_close(FAIR["after.encoder.fc.6.bias"], frozen, rtol=0, atol=0)
    ours = dict(method.named_buffers())["projector.7.running_mean"]
    torch.testing.assert_close(FAIR[f"state.{output_bn}"] - ours, (1 - 0.9 ** 2) * frozen, rtol=1e-5, atol=1e-7)


# PatrickHua/SimSiam -----------------------------------------------------------------------------------------------

def _hua_method(own_heads: bool) -> tuple[SimSiam, dict[str, str]]:
    """imbssl's SimSiam at PatrickHua's widths on the CIFAR ResNet-18; with ``own_heads`` False, heads of
    PatrickHua's layout (biases before the BNs, an affine output BN) at imbssl's indices."""
    meta = HUA.meta
    backbone = build_backbone(ModelConfig(backbone="resnet18", stem="cifar"), 3)
    cfg = SimSiamConfig(proj_hidden=meta["proj_hidden"], proj_dim=meta["proj_dim"], pred_hidden=meta["pred_hidden"],
                        fix_predictor_lr=True)
    method = build_method(cfg, backbone)
    if not own_heads:
        feature, hidden, out, bottleneck = backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim, cfg.pred_hidden
        method.projector = nn.Sequential(nn.Linear(feature, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, out), nn.BatchNorm1d(out))
        method.predictor = nn.Sequential(nn.Linear(out, bottleneck), nn.BatchNorm1d(bottleneck),
                                         nn.ReLU(inplace=True), nn.Linear(bottleneck, out))
    names = backbone_names(method, "backbone.") | head_names(method, HUA_HEADS)
    return method, names


def test_hua_config_is_the_cifar_one():
    meta = HUA.meta
    assert (meta["repo"], meta["commit"]) == ("PatrickHua/SimSiam", "75a7c51362c30e8628ad83949055ef73829ce786")
    assert (meta["proj_layers"], meta["base_lr"], meta["weight_decay"], meta["momentum"]) == (2, 0.03, 5e-4, 0.9)
    assert sorted(meta["unused"]) == sorted(k for k in meta["shapes"] if k.startswith("projector.layer2."))


@pytest.mark.slow
def test_hua_one_step_with_its_head_layout_equals_theirs():
    method, names = _hua_method(own_heads=False)
    assert set(HUA.meta["shapes"]) - set(names) == set(HUA.meta["unused"])  # their unused layer2
    initial = load_fixture_weights(method, names, HUA)
    optimizer, schedules = sgd(method, HUA, HUA.meta["weight_decay"])
    out = step(method, optimizer, HUA)
    report("PatrickHua/SimSiam, its heads", compare(method, names, HUA, out.loss, noise=HUA_ZERO_GRAD))
    for k in HUA.meta["unused"]:  # their SGD skips a parameter without a gradient; their forward skips the layer
        group = "after." if f"after.{k}" in fixture_keys(HUA) else "state."
        assert fixture_io.difference(initial[k], HUA, group + k).max_abs == 0, k
    # after the step: the predictor's lr stays at the base lr in both; their warm-up then starts the rest at 0
    schedules.apply(1)
    predictor_group = next(g for g in optimizer.param_groups if g.get("fixed_lr"))
    assert predictor_group["lr"] == pytest.approx(HUA["state.lr.predictor"].item(), rel=1e-12)
    assert HUA["state.lr.base"].item() == HUA.meta["warmup_lr"] == 0


@pytest.mark.slow
def test_hua_differs_from_imbssl_heads_only_by_its_extra_parameters():
    """Neutral extra parameters: imbssl's own heads give the same loss, shared gradients, weights and BN buffers;
    their pre-BN biases and output-BN bias get round-off gradients (and stay 0); their output BN's affine weight is
    what is left: a real gradient, and an update that imbssl, without it, does not make."""
    method, names = _hua_method(own_heads=True)
    extra = set(HUA_NEUTRAL.meta["extra"])
    assert set(HUA_NEUTRAL.meta["shapes"]) - set(names) == set(HUA_NEUTRAL.meta["unused"]) | extra
    load_fixture_weights(method, names, HUA_NEUTRAL, neutral=HUA_NEUTRAL.meta["extra"])
    optimizer, _ = sgd(method, HUA_NEUTRAL, HUA_NEUTRAL.meta["weight_decay"])
    out = step(method, optimizer, HUA_NEUTRAL)
    report("PatrickHua/SimSiam, imbssl's heads", compare(method, names, HUA_NEUTRAL, out.loss))
    for k in HUA_ZERO_GRAD:
        assert HUA_NEUTRAL[f"grad.{k}"].abs().max() <= ROUND_OFF
    bn_weight = "projector.layer3.1.weight"  # the one real difference: a learned scale of z
    assert HUA_NEUTRAL[f"grad.{bn_weight}"].abs().max() > 100 * ROUND_OFF
    assert not torch.equal(HUA_NEUTRAL[f"after.{bn_weight}"], torch.ones_like(HUA_NEUTRAL[f"after.{bn_weight}"]))
