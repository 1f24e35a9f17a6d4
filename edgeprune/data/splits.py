"""Splits that yield normalised, optionally augmented batches in a reproducible order.

Batch order and augmentation depend only on (seed, epoch, batch index), so an interrupted
training run resumes mid-epoch on exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Augment:
    """Standard small-image augmentation: random crop after zero padding, optional h-flip."""

    pad: int = 2
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad:
            xp = torch.nn.functional.pad(x, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
            iy = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]  # n,h,1
            ix = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]  # n,1,w
            x = xp.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], iy, ix].permute(0, 3, 1, 2)
        if self.flip:
            mask = torch.rand(n, generator=gen) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        # plain NCHW strides: with one channel, the crop's NHWC strides also count as contiguous, torch
        # then runs the whole network channels-last, and oneDNN's strided 1x1 conv backward with fewer
        # input channels than its block (a pruned shortcut) corrupts memory (oneDNN issue 6035)
        return x.clone(memory_format=torch.contiguous_format)


class Split:
    """A set of labelled images; subclasses say how to fetch a batch of indices."""

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float in [0, 1] (N, C, H, W), labels as int64, for the given indices."""
        raise NotImplementedError

    def batches(
        self,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=_generator(seed, epoch)) if shuffle else torch.arange(n)
        mean_t = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
        std_t = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
        count = self.num_batches(batch_size) if limit is None else min(limit, self.num_batches(batch_size))
        for b in range(start, count):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x, y = self.fetch(idx)
            if augment is not None:
                x = augment(x, _generator(seed, epoch, b, 7))
            yield (x - mean_t) / std_t, y

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


class ArraySplit(Split):
    """An in-memory split: uint8 images (N, C, H, W) and int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx].float().div_(255.0), self.labels[idx]

    def subset(self, idx: torch.Tensor) -> ArraySplit:
        return ArraySplit(self.images[idx], self.labels[idx])


class FolderSplit(Split):
    """Images decoded on demand from a torchvision ImageFolder-style dataset."""

    def __init__(self, dataset, indices: torch.Tensor | None = None) -> None:
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(self.indices[i])] for i in idx]
        return torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items])

    def subset(self, idx: torch.Tensor) -> FolderSplit:
        return FolderSplit(self.dataset, self.indices[idx])
