"""What test_ref_sdclr.py and test_ref_bcl.py share: SDCLR's and BCL's parameter names -> imbssl's (the CIFAR
ResNet-18 and the projection heads of both codes), their views as their models normalise them, fixture subsets.

VITA-Group/SDCLR's dual-BN ResNet (models/resnet_prune_multibn.py, also BCL-D's) keeps two BatchNorms per layer,
``<layer>.bn_list.0`` for the dense branch ("nonprune") and ``<layer>.bn_list.1`` for the pruned one; imbssl keeps
the dense one in place and the pruned one in ``SDCLR.pruned_bn`` under the layer's path with "/" for ".". BCL's
plain ResNet (models/resnet.py, SimCLR and BCL-I) sits under ``backbone.``, its head under ``projector.``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import fixture_io
import torch

#: proj_head's layers -> their index in imbssl's ``bn_projector`` Sequential (Linear, BN, ReLU, Linear, BN, ...)
HEAD = {"fc1": 0, "bn1": 1, "fc2": 3, "bn2": 4, "fc3": 6, "bn3": 7}


def _backbone_module(path: str) -> str:
    """conv1 / bn1 / layerS.J.<rest> of a torchvision-style CIFAR ResNet-18 -> imbssl's ResNet module path."""
    if path in ("conv1", "bn1"):
        return {"conv1": "stem.0", "bn1": "stem.1"}[path]
    stage, block, rest = re.fullmatch(r"layer(\d)\.(\d)\.(.+)", path).groups()
    rest = {"downsample.conv": "shortcut.0", "downsample.bn": "shortcut.1",  # SDCLR's Downsample_multiple
            "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}.get(rest, rest)  # torchvision's Sequential
    return f"layers.{2 * (int(stage) - 1) + int(block)}.{rest}"


def _module(path: str, head: str) -> str:
    """A reference module path -> imbssl's, the head (``head``.fcK / .bnK) included."""
    if path.startswith(head + "."):
        return f"projector.{HEAD[path[len(head) + 1:]]}"
    return "backbone." + _backbone_module(path)


def sdclr_name(name: str) -> str:
    """A name of SDCLR's ``prune_resnet18_dual`` with ``fc = proj_head(...)`` (SDCLR, and BCL-D's model.backbone)
    -> imbssl's SDCLR state-dict key."""
    path, leaf = name.rsplit(".", 1)
    dual = re.fullmatch(r"(.+)\.bn_list\.([01])", path)
    if dual is None:
        return f"{_module(path, 'fc')}.{leaf}"
    module = _module(dual.group(1), "fc")
    return f"{module}.{leaf}" if dual.group(2) == "0" else f"pruned_bn.{module.replace('.', '/')}.{leaf}"


def bcl_simclr_name(name: str) -> str:
    """A name of BCL's models/simclr.py SimCLR (``backbone.`` ResNet-18 without fc, ``projector.`` proj_head)
    -> imbssl's SimCLR-family state-dict key."""
    part, rest = name.split(".", 1)
    path, leaf = rest.rsplit(".", 1)
    if part == "projector":
        return f"projector.{HEAD[path]}.{leaf}"
    return f"backbone.{_backbone_module(path)}.{leaf}"


def sdclr_mask_name(conv: str) -> str:
    """A prune_conv2d module of SDCLR's network -> the name of its weight in ``SDCLR.masks()``."""
    return f"{_module(conv, 'fc')}.weight"


def reference_views(fixture: fixture_io.Fixture) -> list[torch.Tensor]:
    """The fixture's two views [B, 2, C, H, W] in [0, 1], normalised as the references' models do first
    (NormalizeByChannelMeanStd, ImageNet's mean and std: sub, then div); imbssl normalises in its view pipeline."""
    mean, std = (torch.tensor(fixture.meta["normalize"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    views = fixture["input.views"]
    return [views[:, 0].sub(mean).div(std), views[:, 1].sub(mean).div(std)]


def subset(fixture: fixture_io.Fixture, prefix: str, keys: Iterable[str], keep: bool) -> fixture_io.Fixture:
    """The fixture with only (``keep``) or without (not ``keep``) the entries ``prefix`` + each of ``keys``."""
    chosen = {prefix + k for k in keys}
    return fixture_io.Fixture({k: v for k, v in fixture.tensors.items()
                               if (fixture_io.name_of(k) in chosen) == keep}, fixture.meta)


def reference_keys(fixture: fixture_io.Fixture, prefix: str) -> list[str]:
    return [k[len(prefix):] for k in fixture.keys(prefix)]


def assert_grads_close(grads: dict[str, torch.Tensor], fixture: fixture_io.Fixture, zero: tuple[str, ...],
                       rtol: float) -> fixture_io.Difference:
    """Every gradient within ``rtol`` of the reference's, except ``zero``: the bias of the head's first Linear,
    right before a train-mode BatchNorm that removes any constant, so its exact gradient is 0 and both codes hold
    round-off there (up to ~1e-7): compared in absolute terms, within 1e-6."""
    grads = dict(grads)
    zeros = {k: grads.pop(k) for k in zero}
    fixture_io.assert_close(zeros, subset(fixture, "grad.", zero, keep=True), "grad.", rtol=0, atol=1e-6)
    return fixture_io.assert_close(grads, subset(fixture, "grad.", zero, keep=False), "grad.", rtol=rtol)


def pruned_bn_statistics(key: str) -> bool:
    """A buffer of the pruned branch's BatchNorm (``bn_list.1``): what SDCLR's second pruned forward moves again."""
    return ".bn_list.1." in key and key.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
