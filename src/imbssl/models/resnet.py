"""ResNets (He et al. 2016) with a CIFAR or an ImageNet stem.

- ResNet-18 / 34 (basic blocks) and ResNet-50 (bottlenecks, stride on the 3x3 conv as torchvision's v1.5): four
  stages of 64, 128, 256, 512 planes, 1x1-conv shortcuts where the shape changes.
  - The CIFAR stem (SimSiam's CIFAR experiments) is a 3x3 stride-1 conv and no max-pool; the ImageNet stem a 7x7
    stride-2 conv and a 3x3 stride-2 max-pool.
  - ``torchvision_state_dict`` renames the weights to torchvision's, so an ImageNet-stem export loads into
    ``torchvision.models.resnet50`` (or 18, 34) with ``strict=True``.
- ResNet-32 (He et al. 2016, Sec. 4.2; the backbone of LDAM, "Rethinking the value of labels" and most CIFAR-LT
  papers): three stages of five blocks with 16, 32, 64 channels and parameter-free shortcuts (option A).

``width`` scales every stage's channels; the feature size is the last stage's output width.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Stem = Literal["cifar", "imagenet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, zero_pad_shortcut: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_ch, planes, stride, zero_pad_shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 down to ``planes``, 3x3 (with the stride), 1x1 up to 4 x ``planes``."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, zero_pad_shortcut: bool = False) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, zero_pad_shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int, zero_pad: bool) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if zero_pad:
        return ZeroPadShortcut(in_ch, out_ch, stride)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2016: subsample by the stride and zero-pad the new channels, adding no parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class ResNet(nn.Module):
    """A stem, stages of blocks (each stage after the first halves the resolution), global average pooling."""

    def __init__(self, in_channels: int, widths: list[int], blocks: tuple[int, ...],
                 block: type[nn.Module] = BasicBlock, stem: Stem = "cifar", zero_pad_shortcut: bool = False) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, in_ch = [], widths[0]
        for stage, (planes, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                layers.append(block(in_ch, planes, 2 if stage > 0 and i == 0 else 1, zero_pad_shortcut))
                in_ch = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.blocks, self.feature_dim = blocks, in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


#: the block and the blocks per stage of each depth (He et al. 2016, Table 1)
RESNETS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def build_resnet(name: str, in_channels: int = 3, width: float = 1.0, stem: Stem = "cifar") -> ResNet:
    block, blocks = RESNETS[name]
    return ResNet(in_channels, [max(8, round(c * width)) for c in (64, 128, 256, 512)], blocks, block, stem)


class CifarResNet32(ResNet):
    """3 stages x 5 blocks x 2 convs + stem + classifier = 32 layers; 0.46M parameters at width 1."""

    def __init__(self, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__(in_channels, [max(4, round(c * width)) for c in (16, 32, 64)], (5, 5, 5),
                         zero_pad_shortcut=True)
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight)  # He et al.'s init, as the LDAM code's resnet32


def torchvision_state_dict(model: ResNet, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """``model``'s weights under torchvision's names (conv1, bn1, layerS.J..., downsample), with a zero ``fc`` of
    ``num_classes`` outputs, which torchvision's ResNet has and self-supervised pre-training does not train: an
    ImageNet-stem export then loads with ``strict=True``, and the classifier is the user's to train."""
    names = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    index = 0
    for stage, count in enumerate(model.blocks, start=1):
        for j in range(count):
            names[f"layers.{index}."] = f"layer{stage}.{j}."
            index += 1
    state = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in names if key.startswith(p))
        renamed = names[prefix] + key[len(prefix):]
        state[renamed.replace(".shortcut.", ".downsample.")] = value.detach().clone()
    state["fc.weight"] = torch.zeros(num_classes, model.feature_dim)
    state["fc.bias"] = torch.zeros(num_classes)
    return state
