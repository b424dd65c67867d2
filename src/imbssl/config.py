"""Typed run configuration: YAML in, validated pydantic models out, ``--set`` overrides.

Every section forbids unknown keys, so a typo such as ``optim.base_lr`` -> ``optim.baselr``
fails loudly with the offending key in the message instead of silently using a default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as given."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SubsetConfig(Section):
    """Which images of the training pool are used for pre-training (data/longtail.py)."""

    profile: Literal["full", "exp", "step", "balanced"] = "full"
    imbalance: float = Field(10.0, ge=1.0, description="p (or rho): largest / smallest class count")
    minority_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="step profile: share of minority classes")
    total: int | None = Field(None, ge=1, description="balanced profile: total N (None = match the exp profile)")
    permute_classes: bool = Field(False, description="draw which classes are the head at random")
    seed: int = 0


class DataConfig(Section):
    source: Literal["digits", "cifar10", "cifar100", "imagefolder"] = "digits"
    path: str | None = Field(None, description="archive or folder; CIFAR archives are downloaded when absent")
    cache_dir: str = Field("~/.cache/imbssl", description="where decoded uint8 arrays are kept")
    download: bool = True
    image_size: int | None = Field(None, ge=4, description="resize ImageFolder images to this square size")
    subset: SubsetConfig = SubsetConfig()


class AugmentConfig(Section):
    """SimSiam/SimCLR views for small images (augment/views.py)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = Field(0.8, ge=0, le=1)
    gray_prob: float = Field(0.2, ge=0, le=1)
    blur_prob: float = Field(0.0, ge=0, le=1)
    normalize: bool = True
    local_crops: int = Field(0, ge=0, description="multi-crop: small views per image besides the global ones")
    local_size: int | None = Field(None, ge=2, description="local view side (None = half the image side)")
    local_scale: tuple[float, float] = (0.05, 0.2)


class ModelConfig(Section):
    backbone: Literal["resnet18", "small_cnn"] = "small_cnn"
    width: float = Field(1.0, gt=0, description="channel width multiplier")


class MethodConfig(Section):
    name: Literal["simsiam", "simclr"] = "simsiam"
    proj_hidden: int = 512
    proj_dim: int = Field(512, description="output dimension d (Table 1)")
    pred_hidden: int = 128
    temperature: float = Field(0.5, gt=0, description="SimCLR NT-Xent temperature")


class OptimConfig(Section):
    name: Literal["sgd", "lars"] | None = Field(None, description="None = the method's Table 1 choice")
    base_lr: float | None = Field(None, gt=0, description="lr = base_lr * batch_size / 256; None = Table 1")
    weight_decay: float | None = Field(None, ge=0, description="None = Table 1")
    momentum: float = 0.9
    batch_size: int = Field(512, ge=2)
    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(0.0, ge=0)


class TrainConfig(Section):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    data_on_device: bool = True
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    collapse_warn_below: float = Field(0.1, ge=0, description="warn when std*sqrt(d) of l2-normalised outputs falls below")
    log_every: int = Field(10, ge=1, description="steps between metric records (and NaN checks)")
    progress: bool = True


class LinearEvalConfig(Section):
    epochs: int = 100
    batch_size: int = 256
    lrs: list[float] = [0.1, 0.3, 1.0, 3.0]
    weight_decays: list[float] = [0.0, 1e-4]
    val_fraction: float = Field(0.1, gt=0, lt=1)


class EvalConfig(Section):
    labelled_size: int | None = Field(None, description="balanced labelled set size; None = N of pre-training")
    knn_k: list[int] = [20, 200]
    knn_temperature: float = 0.07
    linear: LinearEvalConfig = LinearEvalConfig()
    seed: int = 0


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.data.source == "imagefolder" and not self.data.path:
            raise ValueError("data.path is required when data.source is 'imagefolder'")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.epochs=5", "data.subset.profile=exp"]`` -> nested dict, values parsed as YAML."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            lines.append(f"{key}: {e['msg']}")
    return f"invalid config ({origin}):\n  " + "\n  ".join(lines)


def build_config(tree: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree = load_yaml(path) if path else {}
    tree = deep_merge(tree, parse_overrides(overrides))
    return build_config(tree, origin=str(path) if path else "<overrides>")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
