"""``imbssl export RUN_DIR``: a finished run's backbone as files that other code loads without imbssl's run folder.

    backbone.safetensors       the backbone's weights (imbssl's names); the metadata holds its architecture (the
                               run's model section), input channels, feature size and input normalisation, so
                               ``load_exported`` rebuilds it exactly
    backbone-torchvision.pt    ResNet-18/34/50 only: the same weights under torchvision's names with a zero fc,
                               a plain state_dict. With the ImageNet stem it loads into torchvision.models.resnet50
                               (or 18, 34) with strict=True; a CIFAR-stem one after replacing that model's conv1 by
                               a 3x3 stride-1 conv and its maxpool by nn.Identity()

An SSL run exports its backbone.pt, a classifier run (``imbssl train``) the backbone of its model.pt. Neither needs
labels: a run pre-trained on unlabelled images exports as any other.

``InputTransform`` makes the backbone's input from the images users have; ``load_for_inference`` is the repository's
torch.hub entry point (hubconf.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from imbssl.augment import Normalize
from imbssl.config import ConfigError, ModelConfig, load_yaml, validate_tree
from imbssl.engine.checkpoint import load_safe, save_atomic
from imbssl.models import RESNETS, build_backbone, torchvision_state_dict
from imbssl.pipelines.common import written_by_pretraining
from imbssl.pipelines.pretrain import BACKBONE_FILE
from imbssl.pipelines.runfolder import RUN_CONFIG
from imbssl.pipelines.train import MODEL_FILE

SAFETENSORS_FILE = "backbone.safetensors"
TORCHVISION_FILE = "backbone-torchvision.pt"
FORMAT = "imbssl-backbone/1"


class InputTransform(nn.Module):
    """The input of an exported backbone from the images users have (docs/export.md): uint8 levels in [0, 255] or
    float values in [0, 1] (``ToTensor``'s), the same image either way giving the same output; a tensor, a numpy array
    or a PIL image.

    Layout: a batch NCHW, or NHWC (numpy's and PIL's order) when its last axis, not its second, has the backbone's
    channel count; a single image CHW or HWC (HW for a one-channel backbone), which comes out CHW. Images of another
    size than the training images' (``image_size``, height and width; None: not known, left as they are) are resized
    to it as the run's data was stored: bilinear with antialiasing, both sides stretched, or, for a run whose
    ``data.resize`` was ``center_crop``, the shorter side scaled and the centre square kept. Then the run's ``mean``
    and ``std`` normalise each channel.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, image_size: tuple[int, int] | None = None,
                 resize: str = "stretch") -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.image_size = tuple(image_size) if image_size else None
        self.resize = resize

    @property
    def channels(self) -> int:
        return self.normalize.mean.numel()

    def forward(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):  # np.array copies: the array of a PIL image is read-only
            images = torch.from_numpy(np.array(images))
        if not images.is_floating_point() and images.dtype != torch.uint8:
            raise ValueError(f"integer images must be uint8 levels in [0, 255], not {images.dtype}; convert them to "
                             f"uint8 or to float in [0, 1]")
        batch = self._as_nchw(images)
        unit = batch.float() if batch.is_floating_point() else batch.float().div_(255.0)
        out = self.normalize(self._resized(unit))
        return out if images.dim() == 4 else out[0]

    def _as_nchw(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 2 and self.channels == 1:  # a grayscale image as PIL's mode L gives it
            images = images[None]
        batch = images[None] if images.dim() == 3 else images
        if batch.dim() == 4 and batch.shape[1] == self.channels:
            return batch
        if batch.dim() == 4 and batch.shape[-1] == self.channels:
            return batch.permute(0, 3, 1, 2)
        raise ValueError(f"images of shape {tuple(images.shape)}: the backbone takes {self.channels}-channel images, "
                         f"NCHW or NHWC (CHW or HWC for one image)")

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        if self.image_size is None or tuple(batch.shape[-2:]) == self.image_size:
            return batch
        if self.resize == "stretch":
            return F.interpolate(batch, self.image_size, mode="bilinear", antialias=True, align_corners=False)
        # data/sources.py's center_crop, whose stored images are square
        size, (height, width) = self.image_size[0], batch.shape[-2:]
        scale = size / min(height, width)
        height, width = max(size, round(height * scale)), max(size, round(width * scale))
        top, left = (height - size) // 2, (width - size) // 2
        scaled = F.interpolate(batch, (height, width), mode="bilinear", antialias=True, align_corners=False)
        return scaled[..., top:top + size, left:left + size]


def run_backbone(run_dir: Path) -> tuple[ModelConfig, nn.Module, InputTransform]:
    """The architecture, weights and input transform of the backbone a finished run reports."""
    tree = load_yaml(run_dir / RUN_CONFIG, empty_ok=False)
    model_cfg = validate_tree(ModelConfig, tree.get("model", {}), origin=f"{run_dir / RUN_CONFIG}: model")
    if (run_dir / BACKBONE_FILE).exists():
        with written_by_pretraining(run_dir):
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
    return model_cfg, backbone.eval(), InputTransform(state["mean"], state["std"], state.get("image_size"),
                                                      _stored_resize(tree.get("data", {})))


def _stored_resize(data: dict) -> str:
    """How the run's images were brought to ``data.image_size``: its ``data.resize`` where an image size was set."""
    return data.get("resize", "stretch") if data.get("image_size") else "stretch"


def export_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write ``out_dir`` (default RUN_DIR/export)/backbone.safetensors, and the torchvision file for a ResNet."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "export")
    model_cfg, backbone, transform = run_backbone(run_dir)
    normalize = transform.normalize
    metadata = {"format": FORMAT, "model": model_cfg.model_dump_json(), "in_channels": str(transform.channels),
                "feature_dim": str(backbone.feature_dim), "mean": json.dumps(normalize.mean.flatten().tolist()),
                "std": json.dumps(normalize.std.flatten().tolist()),
                "run": run_dir.resolve().name,  # not its path, which would show the user's folders to whoever gets it
                "image_size": json.dumps(transform.image_size), "resize": transform.resize}
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in backbone.state_dict().items()}
    written = [save_atomic(tensors, out_dir / SAFETENSORS_FILE,
                           write=lambda obj, fh: fh.write(safetensors_bytes(obj, metadata)))]
    if model_cfg.backbone in RESNETS:
        written.append(save_atomic(torchvision_state_dict(backbone), out_dir / TORCHVISION_FILE))
    return written


def load_exported(path: Path) -> tuple[nn.Module, InputTransform]:
    """The backbone (in eval mode) and the input transform of a backbone.safetensors that ``export_run`` wrote; an
    export from before the training image size was recorded gives a transform that does not resize."""
    with safe_open(str(path), framework="pt") as exported:
        metadata = exported.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ConfigError(f"{path} is not an imbssl backbone export (format {metadata.get('format')!r})")
        weights = {key: exported.get_tensor(key) for key in exported.keys()}
    backbone = build_backbone(ModelConfig.model_validate_json(metadata["model"]), int(metadata["in_channels"]))
    backbone.load_state_dict(weights)
    mean, std = (torch.tensor(json.loads(metadata[key])) for key in ("mean", "std"))
    image_size = json.loads(metadata.get("image_size", "null"))
    return backbone.eval(), InputTransform(mean, std, image_size, metadata.get("resize", "stretch"))


def load_for_inference(path: str | Path) -> tuple[nn.Module, InputTransform]:
    """The backbone (in eval mode) and its input transform from a run folder (its backbone.pt or model.pt), an
    ``imbssl export`` folder or a backbone.safetensors: hubconf.py's ``backbone``."""
    path = Path(path)
    if path.is_file():
        return load_exported(path)
    if (path / RUN_CONFIG).is_file():
        return run_backbone(path)[1:]
    if (path / SAFETENSORS_FILE).is_file():
        return load_exported(path / SAFETENSORS_FILE)
    raise ConfigError(f"{path} is neither a run folder (no {RUN_CONFIG}) nor an export (no {SAFETENSORS_FILE}) "
                      f"nor a file")
