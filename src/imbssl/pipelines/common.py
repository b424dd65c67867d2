"""Steps the pipelines share: choosing the device, loading the pre-training subset, saving a backbone."""
from __future__ import annotations

import logging
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imbssl.augment import Normalize, channel_stats
from imbssl.config import ConfigError, DataConfig, ModelConfig
from imbssl.data import ImageSet, load_splits, select_subset
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.models import build_backbone

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``train.device`` (its spelling checked by the config) as a device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but this machine has no CUDA GPU (or torch was built without "
                          f"CUDA); use train.device=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available; use train.device=auto or cpu")
    return device


def describe_hardware(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'AMD EPYC ... (2 cores)': recorded with every run's figures."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensor_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (possibly memory-mapped) -> uint8 NCHW tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


@dataclass
class PretrainData:
    """The pre-training subset of the train split and what evaluation needs to know about it."""

    splits: dict[str, ImageSet]
    indices: np.ndarray  # into splits["train"]

    @property
    def train(self) -> ImageSet:
        return self.splits["train"]

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train.labels[self.indices], minlength=len(self.train.classes))

    @property
    def images(self) -> np.ndarray:
        return self.train.images[self.indices]


def load_pretrain_data(cfg: DataConfig, indices: np.ndarray | None = None) -> PretrainData:
    """The configured subset of the train split, or the given ``indices`` into it."""
    splits = load_splits(cfg)
    if indices is None:
        indices = select_subset(splits["train"].labels, cfg.subset)
    return PretrainData(splits, np.asarray(indices, dtype=np.int64))


def save_backbone(backbone: nn.Module, normalize: Normalize, path: Path) -> None:
    """The pre-trained representation: backbone weights plus the input normalisation they expect."""
    save_atomic({"backbone": backbone.state_dict(), "mean": normalize.mean.cpu(), "std": normalize.std.cpu()}, path)


def load_backbone(cfg: ModelConfig, in_channels: int, path: Path) -> tuple[nn.Module, Normalize]:
    state = load_safe(path)
    backbone = build_backbone(cfg, in_channels)
    backbone.load_state_dict(state["backbone"])
    return backbone, Normalize(state["mean"], state["std"])


def normalizer_for(images: np.ndarray) -> Normalize:
    mean, std = channel_stats(images)
    return Normalize(mean, std)
