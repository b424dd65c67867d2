"""``imbssl export RUN_DIR``: a finished run's backbone as files that other code loads without imbssl's run folder.

    backbone.safetensors       the backbone's weights (imbssl's names); the metadata holds its architecture (the
                               run's model section), input channels, feature size and input normalisation, so
                               ``load_exported`` rebuilds it exactly
    backbone-torchvision.pt    ResNet-18/34/50 only: the same weights under torchvision's names with a zero fc,
                               a plain state_dict. With the ImageNet stem it loads into torchvision.models.resnet50
                               (or 18, 34) with strict=True; a CIFAR-stem one after replacing that model's conv1 by
                               a 3x3 stride-1 conv and its maxpool by nn.Identity()

An SSL run exports its backbone.pt, a classifier run (``imbssl train``) the backbone of its model.pt.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from imbssl.augment import Normalize
from imbssl.config import ConfigError, ModelConfig, load_yaml, validate_tree
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.models import RESNETS, build_backbone, torchvision_state_dict
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG
from imbssl.pipelines.train import MODEL_FILE

SAFETENSORS_FILE = "backbone.safetensors"
TORCHVISION_FILE = "backbone-torchvision.pt"
FORMAT = "imbssl-backbone/1"


def run_backbone(run_dir: Path) -> tuple[ModelConfig, nn.Module, Normalize]:
    """The architecture, weights and input normalisation of the backbone a finished run reports."""
    model_cfg = validate_tree(ModelConfig, load_yaml(run_dir / RUN_CONFIG, empty_ok=False).get("model", {}),
                              origin=f"{run_dir / RUN_CONFIG}: model")
    if (run_dir / BACKBONE_FILE).exists():
        state = load_safe(run_dir / BACKBONE_FILE)
        weights = state["backbone"]
    elif (run_dir / MODEL_FILE).exists():
        state = load_safe(run_dir / MODEL_FILE)
        weights = {key.removeprefix("backbone."): value for key, value in state["model"].items()
                   if key.startswith("backbone.")}
    else:
        raise ConfigError(f"{run_dir} holds neither {BACKBONE_FILE} nor {MODEL_FILE}: the run has not finished")
    backbone = build_backbone(model_cfg, torch.as_tensor(state["mean"]).numel())
    backbone.load_state_dict(weights)
    return model_cfg, backbone.eval(), Normalize(state["mean"], state["std"])


def export_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write ``out_dir`` (default RUN_DIR/export)/backbone.safetensors, and the torchvision file for a ResNet."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "export")
    model_cfg, backbone, normalize = run_backbone(run_dir)
    metadata = {"format": FORMAT, "model": model_cfg.model_dump_json(), "in_channels": str(normalize.mean.numel()),
                "feature_dim": str(backbone.feature_dim), "mean": json.dumps(normalize.mean.flatten().tolist()),
                "std": json.dumps(normalize.std.flatten().tolist()), "run": str(run_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in backbone.state_dict().items()}
    written = [save_atomic(tensors, out_dir / SAFETENSORS_FILE,
                           write=lambda obj, fh: fh.write(safetensors_bytes(obj, metadata)))]
    if model_cfg.backbone in RESNETS:
        written.append(save_atomic(torchvision_state_dict(backbone), out_dir / TORCHVISION_FILE))
    return written


def load_exported(path: Path) -> tuple[nn.Module, Normalize]:
    """The backbone (in eval mode) and the input normalisation of a backbone.safetensors that ``export_run`` wrote.

    The ``Normalize`` takes uint8 [0, 255] or float [0, 1] NCHW images (docs/export.md); it refuses float [0, 255].
    """
    with safe_open(str(path), framework="pt") as exported:
        metadata = exported.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ConfigError(f"{path} is not an imbssl backbone export (format {metadata.get('format')!r})")
        weights = {key: exported.get_tensor(key) for key in exported.keys()}
    backbone = build_backbone(ModelConfig.model_validate_json(metadata["model"]), int(metadata["in_channels"]))
    backbone.load_state_dict(weights)
    mean, std = (torch.tensor(json.loads(metadata[key])) for key in ("mean", "std"))
    return backbone.eval(), Normalize(mean, std)
