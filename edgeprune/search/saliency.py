"""How much each channel of a group is worth, on one scale across groups (what a knapsack maximises).

Weight norms rank channels inside a layer but do not compare across layers (fan-in, BatchNorm
scale). HALP (Shen et al., NeurIPS 2022) uses first-order Taylor importance, which estimates the
loss change of removing a channel and so does. Here it is taken on the channel masks
(pruning/masks.py), so one number covers every layer a coupled group's channel runs through:
saliency_c = sum over batches of (dL/dm_c)^2 at m = 1 (Molchanov et al. 2019, squared per batch so
that the gradient's sign does not average out), L the task's training loss against the dense
model's outputs. A residual block that a plan may remove (depth pruning) has a saliency of its own,
taken the same way on its gate (z * block(x) + (1 - z) * x at z = 1). `at` linearises around a
pruned plan instead of the dense model (masks and gates at that plan's values): what the progressive
knapsack needs after each round. For a classifier the loss has a label term whose gradient is not
zero at the dense model; a task whose loss only matches the dense model's outputs has none there,
and the criterion's weight norm, scaled to the group's mean, stands in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeprune.pruning.masks import ChannelMasks
from edgeprune.training.train import to_device


@dataclass
class Saliency:
    """Per variable group, each channel's saliency; per block-removing group, its block's."""

    channels: dict[int, np.ndarray]
    blocks: dict[int, float] = field(default_factory=dict)


def taylor_saliency(masks: ChannelMasks, task, *, batches: int = 8, seed: int = 0, model=None, at=None) -> Saliency:
    """Saliency (>= 0) from `batches` training batches on `model` (default: a copy of the space's
    base model) in eval mode, linearised at the plan `at` (default: every channel kept)."""
    space = masks.space
    teacher = space.base.eval()
    student = copy.deepcopy(model if model is not None else teacher).eval()
    device = next(student.parameters()).device
    for p in student.parameters():
        p.requires_grad_(False)
    counts = space.full_counts() if at is None else at
    point = {g: v.to(device).requires_grad_(True) for g, v in masks.hard(counts).items()}
    gates = {g: z.to(device).requires_grad_(True) for g, z in masks.hard_gates(counts).items()}
    leaves = [*point.values(), *gates.values()]
    total = [torch.zeros_like(v, dtype=torch.float64, device="cpu") for v in leaves]
    for batch in task.train.batches(seed=seed, limit=batches):
        batch = to_device(batch, device)
        x = task.input_of(batch)
        with torch.no_grad():
            target = teacher(x)
        with masks.applied(student, point, gates):
            loss = task.loss(student(x), target, batch)
        for t, grad in zip(total, torch.autograd.grad(loss, leaves, allow_unused=True)):
            if grad is not None:
                t += grad.detach().double().cpu() ** 2
    if all(float(t.sum()) == 0.0 for t in total):
        return magnitude_saliency(masks)
    values = [t.numpy() for t in total]
    return Saliency(dict(zip(point, values)), {g: float(v) for g, v in zip(gates, values[len(point) :])})


def magnitude_saliency(masks: ChannelMasks) -> Saliency:
    """The criterion's channel scores, each group scaled to mean 1 (every group weighs alike); a
    block as much as its channels."""
    crit = masks.space.criterion(masks.criterion if masks.criterion in ("l1", "l2", "bn") else "l2")
    out = {}
    for g in masks.groups:
        s = crit.scores(masks.space.groups[g]).double().numpy()
        out[g] = s / (s.mean() + 1e-12)
    return Saliency(out, {g: float(out[g].sum()) for g in masks.gated})


def count_values(masks: ChannelMasks, saliency: Saliency, choices: list[np.ndarray]) -> list[np.ndarray]:
    """Per variable group, the saliency kept at each of its `choices` (keep-counts): its kept
    channels', plus its block's wherever the block stays."""
    out = []
    for g, counts in zip(masks.groups, choices):
        allowed = masks.space.groups[g].allowed
        rows = masks.keep_matrix(g)[[allowed.index(int(c)) for c in counts]].double().numpy()
        block = saliency.blocks.get(g, 0.0) * (np.asarray(counts) > 0)
        out.append(rows @ saliency.channels[g] + block)
    return out
