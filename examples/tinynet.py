"""A small CNN of the kind users write: an Inception-style concat of branches followed by
squeeze-and-excitation, a grouped conv, hard-swish, a residual add and a classifier head.
Used by the README's first example and by the tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.Hardswish()
    )


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class Mixed(nn.Module):
    """Four branches concatenated (Inception-style), then squeeze-and-excitation."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, width, 1)
        self.b3 = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3))
        self.b5 = nn.Sequential(conv_bn(cin, width // 2, 1), conv_bn(width // 2, width, 5))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, width, 1))
        self.se = SqueezeExcite(4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1))


class Residual(nn.Module):
    """A grouped 3x3 conv between two 1x1 convs, added to its input."""

    def __init__(self, channels: int, hidden: int, groups: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, hidden, 1),
            conv_bn(hidden, hidden, 3, groups=groups),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 2 * width, 3, 2)
        self.mixed = Mixed(2 * width, width)
        self.down = conv_bn(4 * width, 4 * width, 3, 2)
        self.res = Residual(4 * width, 8 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res(self.down(self.mixed(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def tinynet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> TinyNet:
    return TinyNet(num_classes=num_classes, in_channels=in_channels, width=width)
