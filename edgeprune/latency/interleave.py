"""Models compared with each other are measured in turn, several rounds, not one after the other.

A verdict like "the pruned model meets 50 % of dense" or "unstructured sparsity is 0.67x" divides
two measurements. Taken once each, one slow window on a shared machine (seen here: a dense
resnet20 measured 0.683 ms for a whole protocol run where the runs around it gave 0.49) lands on
one side of the ratio and decides it. Measured A B C, A B C, A B C and the median round kept for
each, a slow window spoils at most one round of each model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from edgeprune.errors import EdgepruneError
from edgeprune.latency.measurement import Measurement


def measure_interleaved(
    device,
    items: Sequence[tuple[str | os.PathLike, Sequence[int]]],
    *,
    repeats: int = 3,
    protocol=None,
    on_result=None,
) -> list[Measurement]:
    """Measure ITEMS (path, input shape) in turn, `repeats` rounds; per item, its median round
    (of an even number of rounds, the slower of the middle two: the cautious side of a budget).

    Each returned measurement is one real round (its p90 and cv belong together), with every
    round's median time in `extra["rounds_ms"]`. One request for a remote device, which measures
    every round afresh (an agent would otherwise answer rounds 2.. from its cache)."""
    if repeats < 1:
        raise EdgepruneError(f"--repeats must be at least 1, got {repeats}")
    n = len(items)
    results = device.measure_many(list(items) * repeats, protocol, on_result=on_result, fresh=True)
    chosen = []
    for i in range(n):
        rounds = sorted((results[r * n + i] for r in range(repeats)), key=lambda m: m.median_ms)
        mid = rounds[len(rounds) // 2]  # the median round (of an even number, the slower middle one)
        chosen.append(
            replace(mid, extra={**mid.extra, "rounds_ms": [results[r * n + i].median_ms for r in range(repeats)]})
        )
    return chosen


NOISY = 0.05  # rounds that disagree by more than this are shown beside the figure


def spread(times_ms: Sequence[float]) -> float:
    """How far repeated measurements of one model disagree: largest / smallest, minus 1 (0 for one)."""
    return max(times_ms) / min(times_ms) - 1


def noisy_rounds(rounds_ms: Sequence[float]) -> str:
    """The rounds as "a / b / c" where they disagree by over NOISY (a noisy device), else ""."""
    return " / ".join(f"{t:.4g}" for t in rounds_ms) if rounds_ms and spread(rounds_ms) > NOISY else ""
