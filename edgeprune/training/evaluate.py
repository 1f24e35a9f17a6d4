"""Accuracy and BatchNorm recalibration, shared by training, pruning and the pipeline."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from edgeprune.data import Dataset


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: Dataset,
    split: str,
    *,
    batch_size: int = 500,
    limit: int | None = None,
    images: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] on `split` (at most `limit` batches, or its first `images` images),
    on `device` if given."""
    model.eval()
    if images is not None:
        limit = -(-images // batch_size)
    correct = total = 0
    for x, y in data.batches(split, batch_size, limit=limit):
        if images is not None:
            x, y = x[: images - total], y[: images - total]
        x = x.to(device) if device is not None else x
        correct += (model(x).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Dataset, *, batches: int = 20, batch_size: int = 128, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics on training batches (no augmentation).

    A pruned network's activations no longer match the statistics its BN layers recorded;
    recomputing them is what makes accuracy right after pruning meaningful.
    """
    inputs = (
        x
        for x, _ in data.split("train").batches(
            batch_size, mean=data.mean, std=data.std, shuffle=True, seed=seed, limit=batches
        )
    )
    recalibrate_bn_on(model, inputs)


@torch.no_grad()
def recalibrate_bn_on(model: nn.Module, inputs: Iterable[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics as the cumulative average over `inputs`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for x in inputs:
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
