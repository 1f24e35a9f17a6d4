"""The accuracy proxy a search maximises: prune a copy, recalibrate BatchNorm, score held-out data.

A pruned network's BN statistics no longer fit its activations; re-estimating them on a few
training batches (no training) makes accuracy right after pruning a usable ranking signal. The
score is top-1 on a fixed part of the held-out split, never the test split. The batches are
drawn once, so a plan's score is deterministic and is cached by the plan's hash.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from edgeprune.data import Dataset
from edgeprune.pruning.space import PrunableSpace
from edgeprune.training.evaluate import recalibrate_bn_on


class ProxyEvaluator:
    def __init__(
        self,
        space: PrunableSpace,
        data: Dataset,
        *,
        criterion: str = "l2",
        calibration_batches: int = 10,
        batch_size: int = 128,
        heldout_images: int = 2000,
        seed: int = 0,
    ) -> None:
        self.space = space
        self.criterion = criterion
        self.calibration = [
            x
            for x, _ in data.split("train").batches(
                batch_size, mean=data.mean, std=data.std, shuffle=True, seed=seed, limit=calibration_batches
            )
        ]
        batches = list(data.batches("heldout", 500, limit=-(-heldout_images // 500)))
        self.x = torch.cat([x for x, _ in batches])[:heldout_images]
        self.y = torch.cat([y for _, y in batches])[:heldout_images]
        self.cache: dict[str, float] = {}
        self.seconds: list[float] = []  # wall time of each evaluation actually computed

    def plan(self, counts: Sequence[int]):
        return self.space.plan([int(c) for c in counts], criterion=self.criterion)

    @torch.no_grad()
    def __call__(self, counts: Sequence[int]) -> float:
        """Held-out top-1 (0..1) of the base model pruned to `counts`, BN recalibrated."""
        plan = self.plan(counts)
        key = plan.hash()
        if key not in self.cache:
            t0 = time.perf_counter()
            model = plan.apply(self.space.base)
            recalibrate_bn_on(model, self.calibration)
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(self.x.split(500), self.y.split(500)))
            self.cache[key] = correct / len(self.y)
            self.seconds.append(time.perf_counter() - t0)
        return self.cache[key]
