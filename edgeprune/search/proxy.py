"""The accuracy proxy a search maximises: prune a copy, recalibrate BatchNorm, score held-out data.

A pruned network's BN statistics no longer fit its activations; re-estimating them on a few
training batches (no training) makes accuracy right after pruning a usable ranking signal. The
score is the task's (edgeprune/task.py): for a classifier, top-1 on a fixed part of the held-out
split, never the test split; for any other model, the user's `score_fn`. The batches are drawn
once, so a plan's score is deterministic and is cached by the plan's hash.

Accuracy right after pruning says how much a plan destroys, not how much a finetune recovers:
at deep prune ratios two plans can swap order after training. With `train_steps`, each candidate
first trains that many SGD steps distilled from the dense model (the finetune's loss, on a short
cosine schedule), a short-training fitness in the spirit of ACP's 3-epoch one at a fraction of
its cost. The training batches and the teacher's targets are also drawn once.

With `as_run` (an int8 search: formats/quantized.py's Int8Runner) a candidate is scored as it
will run, its int8 file (that module says why the file and not fake-quantization): PTQ does not
cost every plan alike.

`many(plans)` scores a batch: on the evaluator's `pool` of Ray workers where it has one
(edgeprune/cluster/scoring.py, each worker holding an evaluator of its own), else here in turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from edgeprune.pruning.space import PrunableSpace
from edgeprune.training.evaluate import recalibrate_bn_on
from edgeprune.training.train import Recipe, sgd, to_device


class ProxyEvaluator:
    """Keep-counts -> the task's held-out score of the base model pruned to them (BN recalibrated,
    after `train_steps` distilled steps where asked), cached by the plan's hash."""

    def __init__(
        self,
        space: PrunableSpace,
        task,
        *,
        criterion: str = "l2",
        calibration_batches: int = 10,
        seed: int = 0,
        train_steps: int = 0,
        train_lr: float = 0.05,
        as_run=None,
        device: str = "cpu",
    ) -> None:
        self.space = space
        self.task = task
        self.criterion = criterion
        self.device = device  # where a candidate is scored (a worker given a GPU: cuda)
        self.calibration = task.train.inputs(calibration_batches, seed=seed, input_of=task.input_of)
        self.train_lr = train_lr
        self.train_batches: list[tuple[object, object]] = []  # (batch, the dense model's outputs on it)
        if train_steps:
            teacher = space.base.eval()
            with torch.no_grad():
                self.train_batches = [
                    (b, teacher(task.input_of(b))) for b in task.train.batches(seed=seed + 1, limit=train_steps)
                ]
            self.train_batches *= -(-train_steps // len(self.train_batches))  # a train split shorter than the steps
            del self.train_batches[train_steps:]
        # model -> the model as it will run (an int8 search: its quantized file, formats/quantized.py)
        self.as_run = as_run
        self.cache: dict[str, float] = {}
        self.seconds: list[float] = []  # wall time of each evaluation actually computed
        self.pool = None  # a ScoringPool: `many` scores on its workers

    def plan(self, counts: Sequence[int]):
        return self.space.plan([int(c) for c in counts], criterion=self.criterion)

    def __call__(self, counts: Sequence[int]) -> float:
        """The task's score (higher is better) of the base model pruned to `counts`, BN recalibrated."""
        plan = self.plan(counts)
        key = plan.hash()
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.compute(plan)
            self.seconds.append(time.perf_counter() - t0)
        return self.cache[key]

    def many(self, plans: Sequence[Sequence[int]]) -> list[tuple[float, float]]:
        """(score, seconds spent) of each plan: the new ones on the pool's workers where there is a
        pool, a plan already scored from the cache (0 s)."""
        if self.pool is None:
            return [self._timed(counts) for counts in plans]
        keys = [self.plan(c).hash() for c in plans]
        todo = {k: c for k, c in zip(keys, plans) if k not in self.cache}  # a plan twice in a batch: once
        spent = dict.fromkeys(keys, 0.0)
        for k, (score, seconds) in zip(list(todo), self.pool.score(list(todo.values()), list(todo))):
            self.cache[k], spent[k] = score, seconds
            self.seconds.append(seconds)
        return [(self.cache[k], spent.pop(k, 0.0)) for k in keys]

    def _timed(self, counts: Sequence[int]) -> tuple[float, float]:
        t0 = time.perf_counter()
        return self(counts), time.perf_counter() - t0

    @torch.no_grad()
    def compute(self, plan) -> float:
        """Score `plan` (no cache): prune a copy, train where asked, recalibrate BatchNorm, score."""
        model = plan.apply(self.space.base).to(self.device)
        if self.train_batches:
            with torch.enable_grad():
                self._train(model)
        recalibrate_bn_on(model, (to_device(x, self.device) for x in self.calibration))
        return self.score(model)

    def score(self, model: nn.Module) -> float:
        """The task's score of `model` (ready: pruned, BN recalibrated) at the search's precision."""
        if self.as_run is not None:
            model = self.as_run(model)
        return float(self.task.score(model.eval()))

    def _train(self, model: nn.Module) -> None:
        """One distilled SGD step per training batch: the finetune's loss and optimizer, cosine from `train_lr`."""
        recipe = Recipe(epochs=1, lr=self.train_lr)
        opt = sgd(model, recipe)
        model.train()
        for step, (batch, target) in enumerate(self.train_batches):
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(step, len(self.train_batches), len(self.train_batches))
            batch, target = to_device(batch, self.device), to_device(target, self.device)
            loss = self.task.loss(model(self.task.input_of(batch)), target, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
