"""``train.precision: auto``: bf16 autocast + channels_last where the hardware runs bf16 fast, fp32 elsewhere.

A CPU without AMX or avx512_bf16 emulates bf16 and runs it 7-9x slower than fp32 (docs/benchmarks.md), so auto asks
the hardware rather than assuming. A machine whose detection is wrong (a VM that hides the CPU's flags) sets
``IMBSSL_AUTO_PRECISION=fp32|bf16``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from imbssl.configbase import ConfigError

#: what ``train.precision: auto`` becomes on this machine, whatever its hardware says
AUTO_PRECISION_ENV = "IMBSSL_AUTO_PRECISION"
#: the CPU flags (/proc/cpuinfo) of native bf16 arithmetic: Intel AMX, and AVX-512 BF16 (Intel, AMD Zen 4)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: the first CUDA architecture with bf16 tensor cores (Ampere)
BF16_CUDA_CAPABILITY = (8, 0)


class Precision(NamedTuple):
    """How a run trains: ``asked`` is train.precision as set, ``precision`` and ``channels_last`` what it uses."""

    asked: str
    precision: str
    channels_last: bool
    why: str

    def describe(self) -> str:
        """'bf16 autocast + channels_last (auto: the CPU has avx512_bf16)', for the run's log."""
        layout = " + channels_last" if self.channels_last else ""
        used = "bf16 autocast" if self.precision == "bf16" else "fp32"
        return f"{used}{layout} ({self.asked}: {self.why})" if self.asked == "auto" else f"{used}{layout} (as set)"


def resolve_precision(asked: str, channels_last: bool, device: torch.device) -> Precision:
    """``train.precision`` and ``train.channels_last`` as a run on ``device`` uses them: auto becomes bf16 +
    channels_last where bf16 is fast, else fp32 with ``channels_last`` as set."""
    if asked != "auto":
        return Precision(asked, asked, channels_last, "as set")
    if forced := auto_override():
        fast, why = forced == "bf16", f"{AUTO_PRECISION_ENV}={forced}"
    else:
        fast, why = bf16_is_fast(device)
    return Precision(asked, "bf16", True, why) if fast else Precision(asked, "fp32", channels_last, why)


def auto_override() -> str | None:
    """``IMBSSL_AUTO_PRECISION`` (fp32 or bf16), None where it is unset; the pipelines call it before a run folder is
    made, so that a bad value is refused before anything is written."""
    forced = os.environ.get(AUTO_PRECISION_ENV) or None
    if forced not in (None, "fp32", "bf16"):
        raise ConfigError(f"{AUTO_PRECISION_ENV}={forced!r} is not a precision; use fp32 or bf16")
    return forced


def bf16_is_fast(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes in bf16 natively, and the reason, in words."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        relation = ">=" if capability >= BF16_CUDA_CAPABILITY else "<"
        return capability >= BF16_CUDA_CAPABILITY, (f"CUDA compute capability {'.'.join(map(str, capability))} "
                                                    f"{relation} {'.'.join(map(str, BF16_CUDA_CAPABILITY))}")
    if device.type == "cpu":
        found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
        return bool(found), (f"the CPU has {' and '.join(found)}" if found else
                             f"the CPU has neither {' nor '.join(BF16_CPU_FLAGS)}")
    return False, f"bf16 is not known to be fast on {device.type}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo; none where there is no such file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
