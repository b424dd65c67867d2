"""Backbones (feature extractors) and the MLP heads the methods build on them."""
from __future__ import annotations

from torch import nn

from imbssl.config import ModelConfig
from imbssl.models.heads import mlp
from imbssl.models.resnet import CifarResNet18, CifarResNet32
from imbssl.models.small import SmallCNN
from imbssl.models.vit import VisionTransformer

__all__ = ["CifarResNet18", "CifarResNet32", "SmallCNN", "VisionTransformer", "build_backbone", "mlp"]


def build_backbone(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """A backbone mapping [B, C, H, W] -> [B, feature_dim]; ``feature_dim`` is an attribute."""
    if cfg.backbone == "resnet18":
        return CifarResNet18(in_channels, cfg.width)
    if cfg.backbone == "resnet32":
        return CifarResNet32(in_channels, cfg.width)
    if cfg.backbone == "vit":
        dim = max(1, round(cfg.vit_dim * cfg.width / cfg.vit_heads)) * cfg.vit_heads
        return VisionTransformer(in_channels, cfg.vit_patch, dim, cfg.vit_depth, cfg.vit_heads)
    return SmallCNN(in_channels, cfg.width)
