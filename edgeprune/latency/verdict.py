"""The verdict statistic: what "meets the budget" is decided on.

A model compared with another is measured in many short windows (latency/interleave.py), and the
comparison keeps each model's quietest window: noise on a shared host only adds time, so the
quietest windows are the fair ratio. A budget is not a ratio. A user shipping under a hard budget
reads "meets" as "it typically runs this fast", so the verdict is decided on a statistic of the
model's steady runs, all of its windows' timed runs pooled (each window's warm-up left out):
`median` by default, `p90` for hard real time, named by the device profile's `verdict_statistic`.

Noise can still make a verdict impossible: when the typical window is slower than the quietest by
more than the protocol's tolerance (`max_cv`), and the statistic misses the budget where the
quietest window meets it, the host, not the model, decided. The verdict then says "undecided"
with both figures rather than passing on the best window; a statistic that meets the budget on a
noisy host meets it on a quiet one too (noise only adds time).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import numpy as np

STATISTICS = ("median", "p90")
OUTCOMES = ("meets", "misses", "undecided")
QUANTILE_STEP = 5  # each window keeps its 0th, 5th, ..., 100th percentile (21 figures)
LEVELS = {"median": 0.5, "p90": 0.9}


def window_quantiles(sorted_samples: Sequence[float]) -> list[float]:
    """A window's percentiles 0, 5, ..., 100 of its timed runs (`sorted_samples`, ascending): what
    its runs are, in 21 figures, to pool with other windows."""
    qs = np.percentile(np.asarray(sorted_samples, dtype=float), np.arange(0, 101, QUANTILE_STEP))
    return [round(float(q), 6) for q in qs]


def pooled_quantile(windows: Sequence, level: float) -> float:
    """The `level` quantile of every timed run of `windows` (Measurements) together: the mixture of
    each window's distribution (its percentiles, interpolated) weighted by its number of runs."""
    probs = np.arange(0, 101, QUANTILE_STEP) / 100
    curves = [(m.n, np.asarray(m.extra["quantiles_ms"], dtype=float)) for m in windows]
    grid = np.unique(np.concatenate([q for _, q in curves]))
    total = sum(n for n, _ in curves)
    cdf = sum(n * np.interp(grid, q, probs) for n, q in curves) / total
    return float(np.interp(level, cdf, grid))


def steady(windows: Sequence) -> dict:
    """The steady-run figures of one model's windows: pooled median and p90, the quietest window's
    median, and how far the typical window sits above the quietest (`spread`). Windows measured
    without percentiles (an older agent) give their medians' median and their p90s' median."""
    medians = sorted(m.median_ms for m in windows)
    if all("quantiles_ms" in m.extra for m in windows):
        median, p90 = pooled_quantile(windows, 0.5), pooled_quantile(windows, 0.9)
    else:
        median, p90 = statistics.median(medians), statistics.median(m.p90_ms for m in windows)
    return {
        "median_ms": median,
        "p90_ms": p90,
        "quietest_ms": medians[0],
        "windows": len(windows),
        "runs": sum(m.n for m in windows),
        "spread": statistics.median(medians) / medians[0] - 1 if medians[0] > 0 else 0.0,
    }


def least_noisy(
    measure: Callable[[], Sequence],
    *,
    tolerance: float,
    tries: int = 3,
    on_noisy: Callable[[float], None] | None = None,
) -> list:
    """MEASURE (a call returning interleaved Measurements) again while any model's typical window
    sits over its quietest by more than `tolerance` (its `spread`), `tries` calls at most; the call
    whose noisiest model is the least noisy. For a figure taken once that later decisions hang on
    (a run's reference ratio): a noisy stretch of the host moves the models' statistics unequally,
    and the error would be carried into every verdict after it. `on_noisy(spread)` before a retry."""
    best, best_spread = None, float("inf")
    for attempt in range(tries):
        measured = list(measure())
        spread = max((m.extra.get("steady") or steady([m]))["spread"] for m in measured)
        if spread < best_spread:
            best, best_spread = measured, spread
        if spread <= tolerance:
            break
        if on_noisy is not None and attempt + 1 < tries:
            on_noisy(spread)
    return best


def decide(held_ms: float, held_quietest_ms: float, budget_ms: float, *, spread: float, tolerance: float) -> str:
    """ "meets" when the statistic (`held_ms`) is within the budget; "undecided" when it is not but
    the quietest window is and the windows disagree by more than `tolerance`; else "misses"."""
    if held_ms <= budget_ms:
        return "meets"
    if held_quietest_ms <= budget_ms and spread > tolerance:
        return "undecided"
    return "misses"


def verdict_line(v: dict) -> str:
    """One line: the outcome, on which statistic, against the budget, with the noise filter's figure
    (`v`: a validation's "verdict")."""
    stat, held, budget = v["statistic"], v["held_ms"], v["budget_ms"]
    head = {
        "meets": f"meets the {budget:.4g} ms budget: {stat} {held:.4g} ms",
        "misses": f"misses the {budget:.4g} ms budget: {stat} {held:.4g} ms",
        "undecided": (
            f"undecided against the {budget:.4g} ms budget: the host was too noisy to decide ({stat} "
            f"{held:.4g} ms over it, quietest window {v['quietest_held_ms']:.4g} ms within it; windows "
            f"{v['steady']['spread']:.0%} apart, tolerance {v['tolerance']:.0%}): measure on a quiet device, or "
            "with more --repeats"
        ),
    }[v["outcome"]]
    s = v["steady"]
    figures = f"median {s['median_ms']:.4g} ms, p90 {s['p90_ms']:.4g} ms, quietest window {s['quietest_ms']:.4g} ms"
    return f"{head} ({figures})"
