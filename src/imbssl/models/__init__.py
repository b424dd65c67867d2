"""Backbones (feature extractors) and the MLP heads the methods build on them."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from imbssl.models.heads import mlp
from imbssl.models.resnet import RESNETS, CifarResNet32, ResNet, build_resnet, torchvision_state_dict
from imbssl.models.small import SmallCNN
from imbssl.models.vit import VIT_SIZES, VisionTransformer

if TYPE_CHECKING:  # config.py builds its method sections from the methods, which import this module
    from imbssl.config import ModelConfig

__all__ = ["CifarResNet32", "ResNet", "SmallCNN", "VisionTransformer", "build_backbone", "mlp",
           "build_resnet", "torchvision_state_dict"]


def build_backbone(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """A backbone mapping [B, C, H, W] -> [B, feature_dim]; ``feature_dim`` is an attribute."""
    if cfg.backbone in RESNETS:
        return build_resnet(cfg.backbone, in_channels, cfg.width, cfg.stem)
    if cfg.backbone == "resnet32":
        return CifarResNet32(in_channels, cfg.width)
    if cfg.backbone.startswith("vit"):
        own_size = (cfg.vit_patch, cfg.vit_dim, cfg.vit_depth, cfg.vit_heads)
        patch, dim, depth, heads = VIT_SIZES.get(cfg.backbone, own_size)
        dim = max(1, round(dim * cfg.width / heads)) * heads
        return VisionTransformer(in_channels, patch, dim, depth, heads, ln_eps=cfg.vit_ln_eps)
    return SmallCNN(in_channels, cfg.width)
