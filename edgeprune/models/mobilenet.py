"""MobileNets for small inputs (28x28 to 32x32).

``mobilenet_v1``: Howard et al. 2017 with a stride-1 stem (the usual CIFAR adaptation).
``mobilenet_v2_cifar``: torchvision's MobileNetV2 blocks with ImageNet strides except the stem
(stride 1), so 28x28 inputs reach 2x2 in the last stage. The common CIFAR variant that also
keeps stride 1 in the 24-channel stage costs about 3x more per epoch here for the same layers.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(inp: int, oup: int, kernel: int, stride: int, groups: int = 1, act: type = nn.ReLU6):
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        act(inplace=True),
    )


class MobileNetV1(nn.Module):
    # (out channels, stride) of each depthwise-separable block
    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = int(32 * width)
        layers = [_conv_bn(in_channels, c, 3, 1, act=nn.ReLU)]
        for out, stride in self.CFG:
            out = int(out * width)
            layers.append(_conv_bn(c, c, 3, stride, groups=c, act=nn.ReLU))
            layers.append(_conv_bn(c, out, 1, 1, act=nn.ReLU))
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MobileNetV2Cifar(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride of the first block)
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.2) -> None:
        from torchvision.models.mobilenetv2 import InvertedResidual  # here: torchvision takes ~2 s to import

        super().__init__()
        c = 32
        layers: list[nn.Module] = [_conv_bn(in_channels, c, 3, 1)]
        for t, out, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers.append(_conv_bn(c, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v1(num_classes: int = 10, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels)


def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes, in_channels)
