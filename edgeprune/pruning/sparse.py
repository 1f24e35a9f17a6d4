"""Unstructured (weight-level) sparsity: zeros in a dense layout, for holding sparsity speed claims
against what a runtime actually does with them."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def magnitude_sparsify(model: nn.Module, *, keep: int) -> nn.Module:
    """A copy of `model` whose conv and linear weights keep only the `keep` largest magnitudes
    (global ranking), every other weight set to zero; shapes, biases and norms unchanged."""
    model = copy.deepcopy(model).eval()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flat = torch.cat([w.abs().flatten() for w in weights])
    keep = max(1, min(int(keep), flat.numel()))
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    for w in weights:
        w.mul_((w.abs() >= threshold).to(w.dtype))
    return model


def weight_count(model: nn.Module, *, nonzero: bool = False) -> int:
    """Conv and linear weight entries (only the nonzero ones with `nonzero`)."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return int(sum((w != 0).sum().item() if nonzero else w.numel() for w in ws))
