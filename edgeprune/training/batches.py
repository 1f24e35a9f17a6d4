"""Training batches as the pipeline sees them: from an edgeprune data set (reproducible shuffling
and augmentation by seed and epoch, resumable mid-epoch) or from any iterable (a DataLoader)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from edgeprune.errors import EdgepruneError

Batch = Any
INPUT_KEYS = ("input", "inputs", "image", "images", "x", "pixel_values")


def default_input(batch: Batch) -> torch.Tensor:
    """The model input in a batch: the batch itself, its first element, or a usual dict key."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k]
    raise EdgepruneError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; pass input_fn=lambda batch: ..."
    )


class TrainData:
    """Training batches in a reproducible order: an edgeprune data set's train split (shuffled and
    augmented by seed and epoch), or any iterable of batches (a DataLoader), taken as it comes."""

    def __init__(self, source, *, batch_size: int = 128) -> None:
        from edgeprune.data import Dataset

        self.source, self.batch_size = source, batch_size
        self.dataset = source if isinstance(source, Dataset) else None
        if self.dataset is None and not isinstance(source, Iterable):
            raise EdgepruneError(
                f"train data must be an edgeprune Dataset or an iterable of batches, not {type(source).__name__}"
            )

    def __len__(self) -> int:
        if self.dataset is not None:
            return self.dataset.split("train").num_batches(self.batch_size)
        try:
            return len(self.source)
        except TypeError:
            raise EdgepruneError("train data must have a length (a DataLoader or a list of batches)") from None

    def batches(self, *, seed: int = 0, epoch: int = 0, start: int = 0, limit: int | None = None) -> Iterator[Batch]:
        if self.dataset is not None:
            yield from self.dataset.batches(
                "train", self.batch_size, train=True, seed=seed, epoch=epoch, start=start, limit=limit
            )
            return
        for i, batch in enumerate(self.source):
            if limit is not None and i >= limit:
                return
            if i >= start:
                yield batch

    def inputs(self, n: int, *, seed: int = 0, input_of=default_input) -> list[torch.Tensor]:
        """The inputs of `n` batches without augmentation (BatchNorm recalibration, calibration of
        an export), drawn once."""
        if self.dataset is not None:
            d = self.dataset
            return [
                x
                for x, _ in d.split("train").batches(
                    self.batch_size, mean=d.mean, std=d.std, shuffle=True, seed=seed, limit=n
                )
            ]
        return [input_of(b) for b in self.batches(limit=n)]
