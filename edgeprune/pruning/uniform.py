"""Uniform channel pruning: one keep ratio for every prunable group (the baseline)."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.pruning.space import space


def prune_uniform(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    keep_ratio: float,
    step: int = 8,
    criterion: str = "l1",
) -> nn.Module:
    """A copy of `model` keeping `keep_ratio` of every group's channels (snapped to the step)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise EdgepruneError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    s = space(model, example_input, step=step)
    return s.uniform(keep_ratio, criterion=criterion).apply(model)
