"""Random plans for benchmarks and predictor checks."""

from __future__ import annotations

import numpy as np

from edgeprune.errors import choices_error
from edgeprune.pruning.space import PrunableSpace

MODES = ("uniform", "near-uniform")


def random_counts(
    space: PrunableSpace, rng: np.random.Generator, *, mode: str = "uniform", spread: float = 0.15
) -> list[int]:
    """Keep-counts drawn at random.

    ``uniform``: each group independently uniform over its allowed counts.
    ``near-uniform``: one global keep ratio drawn uniformly in [min keep ratio, 1], each group
    perturbed around it by a relative `spread` (what searches mostly visit).
    """
    if mode == "uniform":
        return [int(rng.choice(g.allowed)) for g in space.groups]
    if mode == "near-uniform":
        r = rng.uniform(space.min_keep_ratio, 1.0)
        ratios = np.clip(r * (1 + spread * rng.standard_normal(len(space.groups))), space.min_keep_ratio, 1.0)
        return space.counts_from_ratios(list(ratios))
    raise choices_error("sampling mode", mode, MODES)
