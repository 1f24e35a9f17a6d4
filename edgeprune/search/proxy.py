"""The accuracy proxy a search maximises: prune a copy, recalibrate BatchNorm, score held-out data.

A pruned network's BN statistics no longer fit its activations; re-estimating them on a few
training batches (no training) makes accuracy right after pruning a usable ranking signal. The
score is top-1 on a fixed part of the held-out split, never the test split. The batches are
drawn once, so a plan's score is deterministic and is cached by the plan's hash.

Accuracy right after pruning says how much a plan destroys, not how much a finetune recovers:
at deep prune ratios two plans can swap order after training. With `train_steps`, each candidate
first trains that many SGD steps distilled from the dense model (the finetune's loss, on a short
cosine schedule), a short-training fitness in the spirit of ACP's 3-epoch one at a fraction of
its cost. The training batches and the teacher's targets are also drawn once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from edgeprune.data import Dataset
from edgeprune.pruning.space import PrunableSpace
from edgeprune.training.distill import DistillConfig, distilled, soft_targets
from edgeprune.training.evaluate import recalibrate_bn_on
from edgeprune.training.train import Recipe, sgd


def resolution(score: float, images: int, *, z: float = 2.0) -> float:
    """How far apart two proxy scores near `score` must be to be told apart on `images` held-out
    images: z binomial standard errors. Closer than this, the search cannot say which plan is the
    more accurate (and the best of many evaluations is the luckiest as much as the best)."""
    return z * math.sqrt(max(score * (1 - score), 0.0) / max(images, 1))


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
        train_steps: int = 0,
        train_lr: float = 0.05,
        distill: DistillConfig = DistillConfig(),
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
        self.train_lr = train_lr
        self.distill = distill
        self.train_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if train_steps:
            teacher = space.base.eval()
            augmented = data.batches("train", batch_size, train=True, seed=seed + 1, limit=train_steps)
            with torch.no_grad():
                self.train_batches = [(x, y, soft_targets(teacher(x), distill)) for x, y in augmented]
            self.train_batches *= -(-train_steps // len(self.train_batches))  # a train split shorter than the steps
            del self.train_batches[train_steps:]
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
            if self.train_batches:
                with torch.enable_grad():
                    self._train(model)
            recalibrate_bn_on(model, self.calibration)
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(self.x.split(500), self.y.split(500)))
            self.cache[key] = correct / len(self.y)
            self.seconds.append(time.perf_counter() - t0)
        return self.cache[key]

    def _train(self, model: nn.Module) -> None:
        """One distilled SGD step per training batch: the finetune's loss and optimizer, cosine from `train_lr`."""
        recipe = Recipe(epochs=1, lr=self.train_lr)
        opt = sgd(model, recipe)
        model.train()
        for step, (x, y, target) in enumerate(self.train_batches):
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(step, len(self.train_batches), len(self.train_batches))
            loss = distilled(model(x), target, y, self.distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
