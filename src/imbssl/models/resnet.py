"""CIFAR ResNets: 3x3 stride-1 stems and no max-pool.

- ResNet-18 (SimSiam's CIFAR experiments): four stages of 64, 128, 256, 512 channels, 1x1-conv shortcuts.
- ResNet-32 (He et al. 2016, Sec. 4.2; the backbone of LDAM, "Rethinking the value of labels" and most CIFAR-LT
  papers): three stages of five blocks with 16, 32, 64 channels and parameter-free shortcuts (option A).

``width`` scales every stage's channels; the feature size is the last stage's width.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, zero_pad_shortcut: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if (stride != 1 or in_ch != out_ch) and zero_pad_shortcut:
            self.shortcut = ZeroPadShortcut(in_ch, out_ch, stride)
        elif stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2016: subsample by the stride and zero-pad the new channels, adding no parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks (each stage after the first halves the resolution), global pooling."""

    def __init__(self, in_channels: int, widths: list[int], blocks: tuple[int, ...],
                 zero_pad_shortcut: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers, in_ch = [], widths[0]
        for stage, (out_ch, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                layers.append(BasicBlock(in_ch, out_ch, 2 if stage > 0 and i == 0 else 1, zero_pad_shortcut))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


class CifarResNet18(CifarResNet):
    def __init__(self, in_channels: int = 3, width: float = 1.0, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__(in_channels, [max(8, round(c * width)) for c in (64, 128, 256, 512)], blocks)


class CifarResNet32(CifarResNet):
    """3 stages x 5 blocks x 2 convs + stem + classifier = 32 layers; 0.46M parameters at width 1."""

    def __init__(self, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__(in_channels, [max(4, round(c * width)) for c in (16, 32, 64)], (5, 5, 5),
                         zero_pad_shortcut=True)
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight)  # He et al.'s init, as the LDAM code's resnet32
