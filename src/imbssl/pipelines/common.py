"""Steps the pipelines share: choosing the device, loading the pre-training subset, saving a backbone."""
from __future__ import annotations

import logging
import os
import platform
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from torch import nn

from imbssl.augment import Normalize, channel_histogram, stats_from_histogram
from imbssl.config import SPACES, ConfigError, DataConfig, ModelConfig, RunConfig, Space, TrainConfig
from imbssl.data import DataError, ImageSet, StreamedImages, load_splits, select_subset, without_labels
from imbssl.data.stream import CHUNK_ROWS
from imbssl.engine.checkpoint import CheckpointError, load_safe, save_atomic
from imbssl.engine.distributed import convert_sync_batchnorm
from imbssl.engine.precision import Precision, resolve_precision
from imbssl.engine.trainer import CHECKPOINT_FILE
from imbssl.launcher import loaded as tcmalloc_loaded
from imbssl.methods import build_method
from imbssl.models import build_backbone
from imbssl.pipelines.runfolder import RUN_CONFIG, save_run_config

ConfigT = TypeVar("ConfigT", bound=BaseModel)  # a config with a train section

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
    """'NVIDIA H100 80GB HBM3' or 'AMD EPYC ... (2 cores, 2 torch threads, tcmalloc)': recorded with every run's
    figures."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    allocator = ", tcmalloc" if tcmalloc_loaded() else ""
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads{allocator})"


def training_precision(train: TrainConfig, device: torch.device, resumed_run: Path | None = None) -> Precision:
    """``train.precision`` (auto resolved for ``device``) and channels_last as the run trains with them, logged. A
    resumed run (``resumed_run``, its folder) asked to use auto goes on at the precision its config.yaml records,
    on any hardware: the one it was trained at."""
    started = _started_at(resumed_run) if resumed_run is not None and train.precision == "auto" else None
    used = Precision("auto", *started, "as the run was started") if started else \
        resolve_precision(train.precision, train.channels_last, device)
    log.info("precision: %s", used.describe())
    return used


def _started_at(run_dir: Path) -> tuple[str, bool] | None:
    """The precision and channels_last of ``run_dir``'s config.yaml, where it records a precision other than auto."""
    try:
        saved = yaml.safe_load((run_dir / RUN_CONFIG).read_text())["train"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    precision = saved.get("precision", "fp32")  # a config from before train.precision existed
    return None if precision == "auto" else (precision, bool(saved.get("channels_last", False)))


def record_precision(cfg: ConfigT, used: Precision, run_dir: Path, resume: bool) -> ConfigT:
    """``cfg`` with the precision and channels_last its run uses, which the run folder's config.yaml then records (a
    fresh run's now; a resumed one's once its checkpoint has loaded): what auto chose is how the run is resumed and
    compared. A folder that is no run folder (evaluation's fine-tuning) has no config.yaml to record it in."""
    train = cfg.train.model_copy(update={"precision": used.precision, "channels_last": used.channels_last})
    recorded = cfg.model_copy(update={"train": train})
    if not resume and (run_dir / RUN_CONFIG).exists():
        save_run_config(recorded, run_dir)
    return recorded


def ready_for_training(model: nn.Module, train: TrainConfig, device: torch.device, channels_last: bool) -> nn.Module:
    """``train``'s SyncBatchNorm and torch.compile, and ``channels_last`` (training_precision's), applied to a method
    or a classifier.

    Compiling each child in place (``nn.Module.compile``) keeps the parameter names, so checkpoints, resume and
    backbone.pt are the same with it or without it.
    """
    if train.sync_batchnorm:
        model = convert_sync_batchnorm(model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if train.compile:
        for part in model.children():
            part.compile()
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """Fix what else decides a run's numbers besides the seed (``determinism`` reads it back for pretrain.json).

    On a GPU, cuDNN's autotuner picks kernels by timing them and some kernels sum in a varying order;
    deterministic mode rules both out (warn_only: an op with no deterministic kernel warns instead of
    failing). cuBLAS needs its workspace fixed before its first call. The CPU kernels used here are
    deterministic either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def determinism() -> dict:
    """The settings ``set_determinism`` controls, as they are now."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


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
    def labels(self) -> np.ndarray | None:
        """The subset's labels; None when the run has none (data.source images, data.labels none)."""
        return self.train.labels[self.indices] if self.train.labelled else None

    @property
    def class_counts(self) -> np.ndarray | None:
        labels = self.labels
        return None if labels is None else np.bincount(labels, minlength=len(self.train.classes))

    @property
    def images(self) -> np.ndarray:
        return self.train.images[self.indices]


def load_pretrain_data(cfg: DataConfig, indices: np.ndarray | None = None) -> PretrainData:
    """The configured subset of the train split, or the given ``indices`` into it; with ``data.labels: none`` the
    subset is chosen by the labels, which are then hidden."""
    splits = load_splits(cfg)
    if indices is None:
        indices = select_subset(splits["train"].labels, cfg.subset)
    if not cfg.labelled:
        splits = without_labels(splits)
    return PretrainData(splits, np.asarray(indices, dtype=np.int64))


@contextmanager
def written_by_pretraining(run_dir: Path) -> Iterator[None]:
    """Reading a file that pre-training writes (subset.npz, backbone.pt; evaluate and export): one that cannot be read
    says how the checkpoint writes it again, where there is one."""
    try:
        yield
    except (CheckpointError, DataError) as err:
        if not (run_dir / CHECKPOINT_FILE).exists():  # a pipeline folder: its files come from the distill stage
            raise
        raise type(err)(f"{err}; `imbssl pretrain {run_dir / RUN_CONFIG} --run-dir {run_dir} --resume --no-eval` "
                        f"writes it again from the checkpoint") from None


def save_backbone(backbone: nn.Module, normalize: Normalize, path: Path,
                  heads: dict[str, nn.Module] | None = None, image_size: tuple[int, int] | None = None) -> None:
    """The pre-trained representation: backbone weights, the input normalisation they expect, the method's
    heads (``SSLMethod.eval_heads``), which the pipelines read and evaluation ignores, and the (height, width) of
    the training images, which an export resizes other images to (pipelines/export.py)."""
    save_atomic({"backbone": backbone.state_dict(), "mean": normalize.mean.cpu(), "std": normalize.std.cpu(),
                 "heads": {name: head.state_dict() for name, head in (heads or {}).items()},
                 **({"image_size": list(image_size)} if image_size else {})}, path)


def load_backbone(cfg: ModelConfig, in_channels: int, path: Path) -> tuple[nn.Module, Normalize]:
    return _backbone_from(cfg, in_channels, load_safe(path))


def _backbone_from(cfg: ModelConfig, in_channels: int, state: dict) -> tuple[nn.Module, Normalize]:
    backbone = build_backbone(cfg, in_channels)
    backbone.load_state_dict(state["backbone"])
    return backbone, Normalize(state["mean"], state["std"])


def load_encoder(cfg: RunConfig, in_channels: int, path: Path,
                 space: Space) -> tuple[nn.Module, nn.ModuleDict, Normalize]:
    """A saved model up to ``space``: its backbone, the heads that follow it there ({} for "backbone",
    projector for "projector", projector then predictor for "predictor") and its input normalisation.

    The heads are rebuilt by ``cfg.method``'s own constructor, so they have the architecture they were saved from.
    """
    state = load_safe(path)
    backbone, normalize = _backbone_from(cfg.model, in_channels, state)
    saved = state.get("heads", {})
    names = SPACES[1:SPACES.index(space) + 1]
    if missing := [name for name in names if name not in saved]:
        raise ConfigError(f"{path} holds no {missing[0]} (saved heads: {sorted(saved) or 'none'}); "
                          f"read it in a space it has, e.g. 'backbone'")
    method = build_method(cfg.method, backbone)
    heads = nn.ModuleDict({name: getattr(method, name) for name in names})
    for name, head in heads.items():
        head.load_state_dict(saved[name])
    return backbone, heads, normalize


def encoder(backbone: nn.Module, heads: nn.ModuleDict) -> nn.Module:
    """x -> the output of the last head (the backbone's features when there is none)."""
    return nn.Sequential(backbone, *heads.values())


def space_dim(cfg: RunConfig, backbone: nn.Module, space: Space) -> int:
    """The size of a vector in ``space``: the backbone's feature size or the method's output dimension d."""
    return backbone.feature_dim if space == "backbone" else cfg.method.proj_dim


def normalizer_for(images: torch.Tensor | StreamedImages) -> Normalize:
    """Standardisation by the training images' own channel statistics (uint8 NCHW, or streamed from disk)."""
    chunks = (images.host_chunks() if isinstance(images, StreamedImages)
              else (chunk.permute(0, 2, 3, 1) for chunk in images.split(CHUNK_ROWS)))
    return Normalize(*stats_from_histogram(sum(channel_histogram(chunk) for chunk in chunks)))
