"""imbssl's SimCLR set up as SDCLR's and TS's ``train_simCLR.py`` set up theirs, for test_ref_simclr.py and
test_ref_ts.py: the CIFAR ResNet-18, their projection head, a fixture's weights and views, one step, compared.

Their projection head (``models/utils.proj_head``: Linear with bias, BN, ReLU, Linear without bias, BN with affine)
is not imbssl's SimCLR head (Linear without bias, BN, ReLU, Linear with bias; SimCLR Eq. 2's g): the tests swap it in,
so that what they compare is the backbone, the loss, the optimizer and the step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fixture_io  # noqa: E402

from imbssl.config import ModelConfig  # noqa: E402
from imbssl.engine.trainer import optimizer_step  # noqa: E402
from imbssl.methods import build_method  # noqa: E402
from imbssl.methods.simclr import ContrastiveSection, SimCLR  # noqa: E402
from imbssl.models import build_backbone  # noqa: E402
from imbssl.models.resnet import torchvision_state_dict  # noqa: E402

#: their head's modules (``model.fc`` = proj_head) -> the places of the same layers in ``reference_head``
HEAD_NAMES = {"fc.fc1.": "projector.0.", "fc.bn1.": "projector.1.", "fc.fc2.": "projector.3.",
              "fc.bn2.": "projector.4."}


def reference_head(dim: int, out: int) -> nn.Sequential:
    """``proj_head(dim, out)`` of SDCLR's / TS's models/utils.py, layer for layer."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out))


def imbssl_names(method: SimCLR) -> dict[str, str]:
    """The references' names (torchvision's ResNet names, ``fc.*`` for the head) -> the method's, the backbone's
    by imbssl's own export map (``torchvision_state_dict``, which appends a zero ``fc`` the references replace)."""
    exported = [k for k in torchvision_state_dict(method.backbone) if not k.startswith("fc.")]
    names = dict(zip(exported, (f"backbone.{k}" for k in method.backbone.state_dict())))
    for key in method.projector.state_dict():
        theirs = next(r for r, ours in HEAD_NAMES.items() if f"projector.{key}".startswith(ours))
        names[theirs + f"projector.{key}"[len(HEAD_NAMES[theirs]):]] = f"projector.{key}"
    return names


def method_on_fixture(fixture: fixture_io.Fixture, cfg: ContrastiveSection) -> tuple[SimCLR, dict[str, str]]:
    """``cfg``'s method (SimCLR or TS's SimCLR) on the CIFAR ResNet-18 with their head, holding the fixture's initial
    weights (drawn again from the seed, checked against the fixture's prints of them)."""
    backbone = build_backbone(ModelConfig(backbone="resnet18", stem="cifar"), 3)
    method = build_method(cfg, backbone)
    method.projector = reference_head(backbone.feature_dim, cfg.proj_dim)
    names = imbssl_names(method)
    initial = fixture_io.seeded_weights(fixture.meta["shapes"], fixture.meta["seed"])
    fixture_io.assert_close(initial, fixture, "init.", rtol=1e-12, atol=0)  # fingerprints: float64 sums
    method.load_state_dict({names[k]: v for k, v in initial.items()}, strict=True)
    return method, names


def normalized_views(fixture: fixture_io.Fixture) -> list[torch.Tensor]:
    """The two views as their model sees them after its first layer, ``NormalizeByChannelMeanStd``."""
    mean = torch.tensor(fixture.meta["normalize_mean"])[None, :, None, None]
    std = torch.tensor(fixture.meta["normalize_std"])[None, :, None, None]
    return [fixture[f"input.view{i}"].sub(mean).div(std) for i in (1, 2)]


#: biases feeding a BatchNorm in training mode: their gradient is zero but for round-off (BN subtracts the batch
#: mean), about 1e-7 on either side, so they are checked to be that small rather than equal
ZERO_GRAD_BIASES = ("fc.fc1.bias",)
ROUND_OFF = 1e-6


def compare_noise_aware(actual: dict[str, torch.Tensor], fixture: fixture_io.Fixture, prefix: str, rtol: float,
                        atol: float, noise: tuple[str, ...] = ()) -> fixture_io.Difference:
    """``fixture_io.assert_close``, except that the keys in ``noise`` (pure round-off on both sides) must only stay
    under ``ROUND_OFF``; the returned largest difference leaves them out."""
    fixture_io.assert_close({k: v for k, v in actual.items() if k not in noise}, fixture_io.Fixture(
        {k: v for k, v in fixture.tensors.items() if fixture_io.name_of(k)[len(prefix):] not in noise
         and k.startswith(prefix)}, fixture.meta), prefix, rtol, atol)
    worst = fixture_io.Difference()
    for key in sorted(actual):
        diff = fixture_io.difference(actual[key], fixture, prefix + key)
        if key in noise:
            assert actual[key].abs().max() <= ROUND_OFF and diff.scale <= ROUND_OFF, f"{prefix}{key} is not ~0"
        else:
            worst = worst.add(diff)
    return worst


def step_and_compare(method: SimCLR, names: dict[str, str], fixture: fixture_io.Fixture,
                     optimizer: torch.optim.Optimizer, rtol: float = 1e-5,
                     atol: float = 1e-7) -> dict[str, fixture_io.Difference]:
    """One ``optimizer_step`` on the fixture's views; the loss, every gradient, the weights and the BatchNorm buffers
    after it against the reference's. Returns the largest differences per group."""
    views = normalized_views(fixture)
    out = optimizer_step(method, optimizer, views, torch.arange(views[0].shape[0]))
    params, buffers = dict(method.named_parameters()), dict(method.named_buffers())
    loss = fixture_io.difference(out.loss, fixture, "loss")
    assert loss.max_abs <= atol + rtol * loss.scale, f"loss {out.loss.item():.7f}: {loss}"
    ref_params = [k for k in names if names[k] in params]
    grads = {k: params[names[k]].grad for k in ref_params}
    return {
        "loss": loss,
        "grads": compare_noise_aware(grads, fixture, "grad.", rtol, atol, noise=ZERO_GRAD_BIASES),
        "after": fixture_io.assert_close({k: params[names[k]] for k in ref_params}, fixture, "after.", rtol, atol),
        "state": fixture_io.assert_close({k: buffers[names[k]] for k in names if names[k] in buffers}, fixture,
                                         "state.", rtol, atol),
    }
