"""Uniform channel pruning: one keep ratio for every prunable group (the baseline)."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from edgeprune.errors import EdgepruneError


def classifier_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """Layers whose output is the network's output: never pruned."""
    with torch.no_grad():
        out_features = model.eval()(example_input).shape[-1]
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    heads = [m for m in last if getattr(m, "out_features", getattr(m, "out_channels", None)) == out_features]
    return heads[-1:] if heads else last[-1:]


def prune_uniform(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    keep_ratio: float,
    round_to: int = 8,
    importance: str = "l1",
) -> nn.Module:
    """Remove the same share of channels from every coupled group of `model`, in place."""
    if not 0.0 < keep_ratio <= 1.0:
        raise EdgepruneError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    imp = {
        "l1": tp.importance.MagnitudeImportance(p=1),
        "l2": tp.importance.MagnitudeImportance(p=2),
        "bn": tp.importance.BNScaleImportance(),
    }.get(importance)
    if imp is None:
        raise EdgepruneError(f"unknown importance {importance!r}; choose one of l1, l2, bn")
    pruner = tp.pruner.BasePruner(
        model,
        example_input,
        importance=imp,
        pruning_ratio=1.0 - keep_ratio,
        ignored_layers=classifier_layers(model, example_input),
        round_to=round_to,
    )
    pruner.step()
    return model
