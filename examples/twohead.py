"""A small dense-prediction network with two outputs, as detectors and segmenters are built: a
per-pixel mask from features of two scales fused (the coarse one upsampled and added, as a
feature pyramid does), and a box regressed from the pooled coarse features. It returns a dict,
so edgeprune has to prune, export, check and distil every output; none of them is a class score.
Used by the README's "any task" example and by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TwoHeadNet(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 16, mask_classes: int = 2) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.fine = conv_bn(width, 2 * width, stride=2)  # 1/2 scale
        self.coarse = nn.Sequential(conv_bn(2 * width, 4 * width, stride=2), conv_bn(4 * width, 4 * width))  # 1/4
        self.lateral = nn.Conv2d(4 * width, 2 * width, 1)  # coarse features onto the fine ones' channels
        self.mask_head = nn.Conv2d(2 * width, mask_classes, 1)
        self.box_head = nn.Linear(4 * width, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fine = self.fine(self.stem(x))
        coarse = self.coarse(fine)
        fused = fine + F.interpolate(self.lateral(coarse), scale_factor=2, mode="nearest")
        mask = F.interpolate(self.mask_head(fused), scale_factor=2, mode="bilinear", align_corners=False)
        box = torch.sigmoid(self.box_head(torch.flatten(F.adaptive_avg_pool2d(coarse, 1), 1)))
        return {"mask": mask, "box": box}


def twohead(in_channels: int = 1, width: int = 16, mask_classes: int = 2) -> TwoHeadNet:
    return TwoHeadNet(in_channels=in_channels, width=width, mask_classes=mask_classes)
