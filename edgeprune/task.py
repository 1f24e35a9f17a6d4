"""What the model is for: how the pipeline scores it, feeds it and distils it.

Pruning scores candidates (the accuracy proxy), finetunes the winner distilled from the dense
model, and reports a figure; for a classifier on one of edgeprune's data sets those are top-1 on
the held-out split, knowledge distillation plus cross-entropy, and top-1 on the test split
(`Task.classification_on`). For anything else (a detector, a segmenter, a regressor) they are the
user's: `Task.custom(score_fn=..., train_data=..., loss_fn=...)`. Without a `loss_fn`, a custom
task distils by matching the dense model's outputs (every tensor of a tuple or dict), which needs
no labels at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.training.batches import Batch, TrainData, default_input
from edgeprune.training.losses import DistillConfig, Loss, classification_distillation, output_matching


class HeldoutTop1:
    """Top-1 on the first `images` of the held-out split, the images decoded once (a search scores
    hundreds of plans on them)."""

    def __init__(self, data, images: int) -> None:
        self.data, self.images = data, images
        self._x: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        if self._x is None:
            batches = list(self.data.batches("heldout", 500, limit=-(-self.images // 500)))
            self._x = torch.cat([x for x, _ in batches])[: self.images]
            self._y = torch.cat([y for _, y in batches])[: self.images]
        model.eval()
        device = next(model.parameters()).device  # a finetune on a GPU scores there
        pairs = zip(self._x.split(500), self._y.split(500))
        correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in pairs)
        return correct / len(self._y)


@dataclass
class Task:
    """How the pipeline treats a model: `score` (higher is better) ranks pruning candidates and
    picks the finetune's best epoch; `test_score` is the figure reported; `train` and `loss`
    distil a pruned model from its dense parent."""

    score: Callable[[nn.Module], float]
    train: TrainData
    loss: Loss
    input_of: Callable[[Batch], torch.Tensor] = default_input
    test_score: Callable[[nn.Module], float] | None = None
    metric: str = "score"
    images: int | None = None  # classification: the held-out images `score` counts (its resolution)
    dataset: Any = None  # classification: the edgeprune Dataset behind it

    @property
    def classification(self) -> bool:
        return self.dataset is not None

    def report_score(self, model: nn.Module) -> float:
        return (self.test_score or self.score)(model)

    def resolution(self, score: float, *, z: float = 2.0) -> float:
        """How far apart two scores near `score` must be to be told apart: z binomial standard errors
        on the held-out images for top-1; 0 for a custom score (its noise is unknown here)."""
        if not self.images:
            return 0.0
        return z * math.sqrt(max(score * (1 - score), 0.0) / self.images)

    @classmethod
    def classification_on(
        cls,
        data,
        *,
        heldout_images: int | None = 2000,
        batch_size: int = 128,
        distill: DistillConfig = DistillConfig(),
    ) -> Task:
        """Top-1 on the first `heldout_images` of the held-out split (never the test split)."""
        from edgeprune.training.evaluate import accuracy

        if heldout_images is None:
            heldout_images = len(data.split("heldout"))
        return cls(
            score=HeldoutTop1(data, heldout_images),
            train=TrainData(data, batch_size=batch_size),
            loss=classification_distillation(distill),
            test_score=lambda m: accuracy(m, data, "test"),
            metric="top-1",
            images=min(heldout_images, len(data.split("heldout"))),
            dataset=data,
        )

    @classmethod
    def custom(
        cls,
        *,
        score_fn: Callable[[nn.Module], float],
        train_data: Iterable,
        loss_fn: Loss | None = None,
        input_fn: Callable[[Batch], torch.Tensor] | None = None,
        test_score_fn: Callable[[nn.Module], float] | None = None,
    ) -> Task:
        if not callable(score_fn):
            raise EdgepruneError("score_fn must be a function model -> float (higher is better)")
        return cls(
            score=score_fn,
            train=TrainData(train_data),
            loss=loss_fn or output_matching,
            input_of=input_fn or default_input,
            test_score=test_score_fn,
        )


def make_task(
    *,
    data=None,
    score_fn=None,
    train_data=None,
    loss_fn=None,
    input_fn=None,
    test_score_fn=None,
    heldout_images: int | None = 2000,
    batch_size: int = 128,
    distill: DistillConfig = DistillConfig(),
) -> Task:
    """The task of a pipeline call: a classification data set (`data`: a Dataset or its name), or
    the user's `score_fn` with `train_data` (and optionally `loss_fn`)."""
    if score_fn is not None:
        if train_data is None:
            raise EdgepruneError("with score_fn, give train_data: batches for BatchNorm recalibration and distillation")
        return Task.custom(
            score_fn=score_fn, train_data=train_data, loss_fn=loss_fn, input_fn=input_fn, test_score_fn=test_score_fn
        )
    if data is None:
        raise EdgepruneError("give data= (a classification data set) or score_fn= with train_data= (any task)")
    if isinstance(data, str):
        from edgeprune.data import load_dataset

        data = load_dataset(data)
    task = Task.classification_on(data, heldout_images=heldout_images, batch_size=batch_size, distill=distill)
    if loss_fn is not None:
        task.loss = loss_fn
    return task
