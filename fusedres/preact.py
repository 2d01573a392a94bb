"""Stock (plain PyTorch) pre-activation ResNets of "Identity Mappings in Deep Residual Networks" (He, Zhang, Ren,
Sun, ECCV 2016): the unfused counterparts of `fusedres.models.preact_*`, playing the role torchvision plays for
the post-activation ResNets. Nothing here is fused; `fusedres.convert` turns these into the fused modules of
`fusedres.nn.preact_blocks` and `fusedres.unconvert` turns them back.

Residual unit ("full pre-activation"): `BN -> ReLU -> conv` three times (bottleneck) or twice (basic), added to the
shortcut with no activation after the add. The shortcut is the identity, or, where the unit changes width or
stride, a 1x1 projection conv applied to the *pre-activated* input `relu(bn1(x))`, as in the authors' code
(github.com/KaimingHe/resnet-1k-layers, resnet-pre-act.lua). The network ends in BN -> ReLU -> global average
pool -> fc.

* CIFAR (`preact_resnet_cifar`, ResNet-164 / ResNet-1001): 3x3 stem conv with 16 channels, three stages of n
  bottleneck units each with bottleneck widths 16/32/64 (outputs 64/128/256), stride 2 at stages 2 and 3, depth
  9n + 2 (n = 18: ResNet-164, 1.7M parameters; n = 111: ResNet-1001, 10.3M). As in the authors' code the
  stride sits on the first 1x1 conv of a unit (`stride_in_1x1=True`).
* ImageNet (`preact_resnet18/34/50/101/152`): 7x7 stride-2 stem conv + 3x3 max-pool (no stem BN: the first unit
  pre-activates), four stages of torchvision's widths and depths, stride on the 3x3 conv.

Attribute names follow torchvision: `conv1`, `maxpool`, `layer1..`, `bn` + `relu` (the final pre-activation),
`avgpool`, `fc`; units have `bn1, conv1, bn2, conv2[, bn3, conv3], relu, downsample, stride`.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet", "preact_resnet_cifar"]


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic unit: x + conv2(relu(bn2(conv1(relu(bn1(x)))))) (projection shortcut on the
    pre-activated input when the width or stride changes)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, stride_in_1x1: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (_conv(inplanes, planes, 1, stride) if stride != 1 or inplanes != planes else None)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit: x + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x))))))))), 1x1 / 3x3 /
    1x1 convs, output width 4 x planes; the stride is on conv1 (`stride_in_1x1`, the paper's code) or conv2."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, stride_in_1x1: bool = False) -> None:
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv(inplanes, planes, 1, stride if stride_in_1x1 else 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1 if stride_in_1x1 else stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv(inplanes, out, 1, stride) if stride != 1 or inplanes != out else None
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


Block = Union[Type[PreActBasicBlock], Type[PreActBottleneck]]


class PreActResNet(nn.Module):
    """A pre-activation ResNet: stem -> stages of pre-activation units -> BN -> ReLU -> pool -> fc.

    `stem="cifar"`: 3x3 conv, no pooling; `stem="imagenet"`: 7x7 stride-2 conv + 3x3 stride-2 max-pool.
    `widths[i]` is the bottleneck (or basic) width of stage i; each stage after the first starts with stride 2.
    Init: convs kaiming-normal (fan_out, as the authors' code), BN weight 1 and bias 0, fc bias 0."""

    def __init__(self, block: Block, layers: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 stem: str = "cifar", stem_width: int = 16, stride_in_1x1: bool = False) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"PreActResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        if len(layers) != len(widths):
            raise ValueError("PreActResNet: layers and widths must have the same length")
        if stem == "cifar":
            self.conv1 = _conv(3, stem_width, 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_width
        self.num_stages = len(layers)
        for i, (n, width) in enumerate(zip(layers, widths)):
            units = []
            for j in range(n):
                units.append(block(inplanes, width, 2 if (i > 0 and j == 0) else 1, stride_in_1x1))
                inplanes = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preact_resnet_cifar(depth: int, num_classes: int = 10) -> PreActResNet:
    """The CIFAR pre-activation bottleneck ResNet of depth 9n + 2 (164, 1001, or any other 9n + 2)."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"preact_resnet_cifar: depth must be 9n + 2 with n >= 1 (164, 1001, ...), got {depth}")
    n = (depth - 2) // 9
    return PreActResNet(PreActBottleneck, [n, n, n], [16, 32, 64], num_classes, stem="cifar", stem_width=16,
                        stride_in_1x1=True)
