"""Reading and writing the reference-equality fixtures: what a method's authors' code computed in one training step.

The ``make_*.py`` scripts here run the authors' code (a local checkout at a pinned commit, in the reference
environment: torch 2.14.1, torchvision 0.29.1) and write one fixture each; the ``test_ref_*.py`` tests give imbssl
the same weights and views and compare. This module imports only torch, safetensors and the standard library, so
both sides share it.

A fixture is one safetensors file. A tensor of up to ``FULL_LIMIT`` elements is stored whole; a larger one (a
ResNet-18's convolutions, MoCo's queue) as its ``fingerprint``, four float64 numbers that any change of one
element moves, so that a fixture stays small whatever the architecture. Initial weights are not stored at all:
both sides draw them with ``seeded_weights`` from the names and shapes kept in the metadata, and the test checks
the draw against the stored fingerprints before it uses it.

A script may lower the whole-tensor limit for its fixture (``save``'s ``whole_limit``) and keep some keys whole
whatever their size (``whole_prefixes``, e.g. the inputs); ``fingerprint_key`` and ``name_of`` are the only other
places that know how a fingerprint is stored. ``pinned_checkout`` is the scripts' check of the authors' checkout.
"""
from __future__ import annotations

import json
import subprocess
import sys
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


def pinned_checkout(path: str | Path, pinned: str, ref: str = "HEAD") -> str:
    """The commit of ``ref`` in the git checkout ``path``, which must be ``pinned``: a fixture records one commit of
    the authors' code. Exits with one line where ``path`` is not a git checkout or ``ref`` is at another commit.

    Every make script calls this first, so it also sets torch to one thread: the fixtures were written so, and on
    more threads the reductions round otherwise (1e-7 apart), and the files are no longer byte for byte the same."""
    torch.set_num_threads(1)
    found = subprocess.run(["git", "-C", str(path), "rev-parse", ref], capture_output=True, text=True)
    if found.returncode != 0:
        why = (found.stderr.strip().splitlines() or ["git rev-parse failed"])[0]
        sys.exit(f"{path} is not a git checkout holding {ref}: {why}")
    commit = found.stdout.strip()
    if commit != pinned:
        where = path if ref == "HEAD" else f"{path}'s {ref}"
        sys.exit(f"{where} is at {commit}, not the pinned {pinned}: check out the pinned commit")
    return commit


def fingerprint_key(name: str) -> str:
    """The key under which the fingerprint of the tensor ``name`` is stored."""
    return name + _PRINT_SUFFIX


def name_of(key: str) -> str:
    """A stored key -> the name of its tensor (a fingerprint's, without the suffix ``fingerprint_key`` adds)."""
    return key.removesuffix(_PRINT_SUFFIX)


def save(name: str, tensors: dict[str, torch.Tensor], meta: dict, whole_limit: int = FULL_LIMIT,
         whole_prefixes: tuple[str, ...] = ()) -> Path:
    """Write ``fixtures/<name>.safetensors``: tensors of up to ``whole_limit`` elements whole, larger ones as
    fingerprints, except that keys starting with one of ``whole_prefixes`` are always whole; ``meta`` as JSON."""
    stored = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.numel() > whole_limit and not key.startswith(whole_prefixes):
            stored[fingerprint_key(key)] = fingerprint(tensor)
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
        keys = (name_of(k) for k in self.tensors)
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
        expected = fixture.tensors[fingerprint_key(key)]
        delta = (fingerprint(actual) - expected).abs().max().item()
        scale = expected[1].item()
    return Difference(delta, delta / scale if scale > 0 else delta, scale)


def assert_close(actual: dict[str, torch.Tensor], fixture: Fixture, prefix: str = "", rtol: float = 1e-5,
                 atol: float = 1e-7) -> Difference:
    """Every fixture key under ``prefix`` against ``actual[key without prefix]``, within ``atol + rtol * scale``;
    the keys must match both ways. Returns the largest difference, for docs/reference-equality.md."""
    _assert_same_keys(actual, fixture, prefix)
    worst = Difference()
    for key in sorted(actual):
        worst = worst.add(_assert_within(actual[key], fixture, prefix + key, rtol, atol))
    return worst


def _weight_spacing(weights: torch.Tensor) -> float:
    """The fp32 spacing at a tensor's largest magnitude: rounding the weights after a step alone puts their change
    ``after - before`` off by up to this much, however exact the step."""
    return torch.finfo(torch.float32).eps * float(2 ** torch.floor(torch.log2(weights.abs().max().clamp_min(1e-30))))


def _assert_changes_close(changes: dict[str, torch.Tensor], after: dict[str, torch.Tensor], fixture: Fixture,
                          prefix: str, rtol: float, atol: float = 1e-7) -> Difference:
    """``assert_close`` for the weights' changes in one step (after - before), except that a change stored whole is
    allowed the ``_weight_spacing`` of its weight after the step (``after[key]``) where others are allowed ``atol``."""
    _assert_same_keys(changes, fixture, prefix)
    worst = Difference()
    for key in sorted(changes):
        whole = prefix + key in fixture.tensors
        allowed = _weight_spacing(after[key]) if whole else atol
        worst = worst.add(_assert_within(changes[key], fixture, prefix + key, rtol, allowed))
    return worst


def assert_groups_close(results: dict[str, torch.Tensor], fixture: Fixture, groups: tuple[str, ...], rtol: float,
                        group_rtol: dict[str, float] | None = None) -> dict[str, Difference]:
    """``assert_close`` (atol 0) for each of ``groups`` of ``results``, which are keyed as the fixture is: a group
    ending in "." is the fixture's keys under it (``results`` may hold more), any other group one key; ``update.``,
    the weights' changes, by ``_assert_changes_close`` with the ``after.`` results. ``group_rtol`` scales ``rtol`` for
    the groups it names. Returns the largest difference of each group."""
    found = {}
    for group in groups:
        scaled = rtol * (group_rtol or {}).get(group, 1)
        if not group.endswith("."):
            found[group] = assert_close({group: results[group]}, Fixture({group: fixture[group]}, fixture.meta),
                                        rtol=scaled, atol=0)
            continue
        expected = {k[len(group):] for k in fixture.keys(group)}
        mine = {k[len(group):]: v for k, v in results.items() if k.startswith(group) and k[len(group):] in expected}
        if group == "update.":
            after = {key: results[f"after.{key}"] for key in mine}
            found[group] = _assert_changes_close(mine, after, fixture, group, rtol=scaled)
        else:
            found[group] = assert_close(mine, fixture, group, rtol=scaled, atol=0)
    return found


def _assert_same_keys(actual: dict[str, torch.Tensor], fixture: Fixture, prefix: str) -> None:
    expected_keys = {k[len(prefix):] for k in fixture.keys(prefix)}
    assert expected_keys == set(actual), (f"{prefix or 'keys'}: missing {sorted(expected_keys - set(actual))}, "
                                          f"extra {sorted(set(actual) - expected_keys)}")


def _assert_within(actual: torch.Tensor, fixture: Fixture, key: str, rtol: float, atol: float) -> Difference:
    diff = difference(actual, fixture, key)
    assert diff.max_abs <= atol + rtol * diff.scale, \
        f"{key}: max abs difference {diff.max_abs:.3g} (relative {diff.max_rel:.3g})"
    return diff
