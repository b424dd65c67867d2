"""Reading and writing the reference-equality fixtures: what a method's authors' code computed in one training step.

The ``make_*.py`` scripts here run the authors' code (a local checkout at a pinned commit, in the reference
environment: torch 2.14.1, torchvision 0.29.1) and write one fixture each; the ``test_ref_*.py`` tests give imbssl
the same weights and views and compare. This module imports only torch and safetensors, so both sides share it.

A fixture is one safetensors file. A tensor of up to ``FULL_LIMIT`` elements is stored whole; a larger one (a
ResNet-18's convolutions, MoCo's queue) as its ``fingerprint``, four float64 numbers that any change of one
element moves, so that a fixture stays small whatever the architecture. Initial weights are not stored at all:
both sides draw them with ``seeded_weights`` from the names and shapes kept in the metadata, and the test checks
the draw against the stored fingerprints before it uses it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
FULL_LIMIT = 16384
_PRINT_SUFFIX = "::fingerprint"


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """[sum, l1 norm, l2 norm, dot with seeded random signs] in float64: equal for equal tensors, and any change of
    one element moves the signed dot by that change."""
    flat = tensor.detach().reshape(-1).double()
    signs = torch.randint(0, 2, flat.shape, generator=torch.Generator().manual_seed(flat.numel())).double() * 2 - 1
    return torch.stack([flat.sum(), flat.abs().sum(), flat.norm(), flat @ signs])


def seeded_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """A state dict drawn from ``seed``, the same on every torch version: weights ~ N(0, 1/fan_in), norm weights
    1 + N(0, 0.1^2), biases and running means N(0, 0.1^2), running variances 1 + U(0, 0.5), counters 0.

    Names are drawn in the order given, each from its own generator, so the reference and imbssl (after mapping
    the names) hold the same numbers.
    """
    weights = {}
    for i, (name, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            weights[name] = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_var":
            weights[name] = 1 + 0.5 * torch.rand(shape, generator=g)
        elif len(shape) > 1:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            weights[name] = torch.randn(shape, generator=g) / fan_in ** 0.5
        elif leaf == "weight":
            weights[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[name] = 0.1 * torch.randn(shape, generator=g)
    return weights


def save(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``fixtures/<name>.safetensors``: small tensors whole, large ones as fingerprints; ``meta`` as JSON."""
    stored = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.numel() > FULL_LIMIT:
            stored[key + _PRINT_SUFFIX] = fingerprint(tensor)
        else:
            stored[key] = tensor.contiguous()
    FIXTURES.mkdir(exist_ok=True)
    path = FIXTURES / f"{name}.safetensors"
    save_file(stored, str(path), metadata={"meta": json.dumps(meta)})
    return path


@dataclass
class Fixture:
    tensors: dict[str, torch.Tensor]  # whole tensors, and fingerprints under "<key>::fingerprint"
    meta: dict

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def keys(self, prefix: str = "") -> list[str]:
        """The stored keys under ``prefix``, fingerprinted ones by their own name."""
        keys = (k.removesuffix(_PRINT_SUFFIX) for k in self.tensors)
        return [k for k in keys if k.startswith(prefix)]


def load(name: str) -> Fixture:
    from safetensors import safe_open

    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return Fixture(load_file(str(path)), meta)


@dataclass
class Difference:
    """The largest differences found: absolute, and relative to the size of the reference's value (``scale``)."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    scale: float = 0.0

    def add(self, other: Difference) -> Difference:
        return Difference(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel))


def difference(actual: torch.Tensor, fixture: Fixture, key: str) -> Difference:
    """How far ``actual`` is from the fixture's ``key``: elementwise against a whole tensor (relative to its largest
    magnitude), or fingerprint against fingerprint (relative to the l1 norm, which bounds how far one can move)."""
    if key in fixture.tensors:
        expected = fixture.tensors[key]
        assert actual.shape == expected.shape, f"{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        delta = (actual.detach().double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        scale = expected.double().abs().max().item() if expected.numel() else 0.0
    else:
        expected = fixture.tensors[key + _PRINT_SUFFIX]
        delta = (fingerprint(actual) - expected).abs().max().item()
        scale = expected[1].item()
    return Difference(delta, delta / scale if scale > 0 else delta, scale)


def assert_close(actual: dict[str, torch.Tensor], fixture: Fixture, prefix: str = "", rtol: float = 1e-5,
                 atol: float = 1e-7) -> Difference:
    """Every fixture key under ``prefix`` against ``actual[key without prefix]``, within ``atol + rtol * scale``;
    the keys must match both ways. Returns the largest difference, for docs/reference-equality.md."""
    expected_keys = {k[len(prefix):] for k in fixture.keys(prefix)}
    assert expected_keys == set(actual), (f"{prefix or 'keys'}: missing {sorted(expected_keys - set(actual))}, "
                                          f"extra {sorted(set(actual) - expected_keys)}")
    worst = Difference()
    for key in sorted(actual):
        diff = difference(actual[key], fixture, prefix + key)
        assert diff.max_abs <= atol + rtol * diff.scale, \
            f"{prefix}{key}: max abs difference {diff.max_abs:.3g} (relative {diff.max_rel:.3g})"
        worst = worst.add(diff)
    return worst
