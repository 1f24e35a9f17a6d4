"""Models compared with each other are measured in turn, in many short windows, and each is
given its quietest window.

A verdict like "the pruned model meets 50 % of dense" or "unstructured sparsity is 0.67x" divides
two measurements. On a shared machine both sides drift: a neighbour on the host slows everything
for seconds at a time. Seen on the development VM: dense resnet20 measured 0.49 ms in its fast
phase and 0.83-0.92 ms in its slow one, the phases alternating every few seconds, and the slow
phase does not slow all models alike (a pruned resnet20 measured 0.49 of dense in the fast phase,
0.57 in the slow one), so no reference model measured beside the others can cancel it.

What does cancel it: noise on a CPU only ever adds time. Each model is measured in short windows
(`window`: a short warm-up, then ~0.15 s and at least 5 runs), the models in turn, A B C, A B C, ... for many
rounds, and each keeps the window with the lowest median: the time it takes when nothing else on
the host is in its way, which is what a dedicated device gives (the minimum as the estimator of a
benchmark under positive noise, as in Julia's BenchmarkTools; the median *within* a window keeps
one lucky run from deciding it). Spread over seconds, the rounds reach the fast phase whenever
the host has one; every round is kept on record, and disagreeing rounds are shown beside the
figure. `statistic="median"` keeps the median round instead (the cautious side of a budget on a
device that is always this loaded; and the baseline bench/measure_noise.py compares against).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from edgeprune.errors import EdgepruneError
from edgeprune.latency.measurement import Measurement, Protocol
from edgeprune.latency.verdict import steady
from edgeprune.progress import progress_bar

STATISTICS = ("quietest", "median")
ROUNDS = 15  # windows per whole model: ~0.2 s each, so a comparison of 3 models spans ~10 s
SETTLE = 0.1  # a known model measuring more than this over its quiet time: the device is in a slow phase
PRUNED_OVER = 0.03  # a model pruned from another measuring more than this over it: a slow phase hit it alone


WINDOW_S = 0.15  # a window's timed share: at least this long ...
WINDOW_RUNS = 5  # ... and this many runs: a 70 ms model (resnet50 at 224, 1 thread) times 5 runs, not 20
WARMUP_RUNS = 2  # its warm-up only refills caches: 2 runs for a slow model, 0.03 s of runs for a fast one
WARMUP_S = 0.03


def window(protocol: Protocol) -> Protocol:
    """One round's share of PROTOCOL: a short warm-up (the model's session stays open in the
    measuring process; the warm-up only refills caches the other models used) and a short timed
    window, never repeated (a noisy window is just one of many rounds). Counted in time for fast
    models (hundreds of runs) and in runs for slow ones: 15 rounds of 25 whole models at 224
    would otherwise take minutes a model."""
    return replace(
        protocol,
        warmup_runs=min(protocol.warmup_runs, WARMUP_RUNS),
        warmup_s=min(protocol.warmup_s, WARMUP_S),
        min_runs=min(protocol.min_runs, WINDOW_RUNS),
        min_s=min(protocol.min_s, WINDOW_S),
        precision=None,
        max_s=None,
        retries=0,
    )


def window_seconds(protocol: Protocol, ms: float) -> float:
    """About how long one window of a model taking MS takes under PROTOCOL (its warm-up and timed
    share; the session's load and the export not counted)."""
    w = window(protocol)
    return max(w.warmup_runs * ms / 1000, w.warmup_s) + max(w.min_runs * ms / 1000, w.min_s)


def measure_interleaved(
    device,
    items: Sequence[tuple[str | os.PathLike, Sequence[int]]],
    *,
    repeats: int | None = None,
    protocol: Protocol | None = None,
    statistic: str = "quietest",
    settle: tuple[int, float] | None = None,
    pruned: tuple[int, Sequence[int]] | None = None,
    on_result=None,
) -> list[Measurement]:
    """Measure ITEMS (path, input shape) in turn, `repeats` rounds of one `window` each; per item,
    its quietest round (`statistic="median"`: its median round; of an even number, the slower of
    the middle two).

    `repeats=None`: ROUNDS rounds, then more until the rounds span ROUNDS x the protocol's
    `min_s` (15 s with a 1 s protocol: a slow phase of the host lasts seconds, and a comparison
    of two small models would otherwise be over in 5 s), at most 4 x ROUNDS more.

    `settle=(i, ms)`: item i is known to take `ms` on this device when it is quiet (the dense
    model measured at a run's start). While its quietest window is over that by more than
    SETTLE, the device is still in a slow phase (this VM had some of minutes, in which a small
    model's time is mostly the slowdown and every ratio drifts toward 1): measure on, ROUNDS
    rounds at a time, for up to 4 x the span more. A device that really drifted (a board
    warming up) ends there, and the caller refers to the item as measured.

    Each returned measurement is one real round (its p90 and cv belong together), with every
    round's median time in `extra["rounds_ms"]`. `protocol` (default: the device's) is cut to a
    window here. One request per stretch for a remote device, which measures every round afresh
    (an agent would otherwise answer rounds 2.. from its cache)."""
    if repeats is not None and repeats < 1:
        raise EdgepruneError(f"--repeats must be at least 1, got {repeats}")
    if statistic not in STATISTICS:
        raise EdgepruneError(f"unknown statistic {statistic!r}; choose one of {list(STATISTICS)}")
    n = len(items)
    protocol = protocol or device.spec.protocol
    short = window(protocol)
    started = time.monotonic()
    results: list[Measurement] = []

    def stretch(rounds: int) -> None:  # `rounds` more rounds, reported after those already taken
        offset = len(results)

        def report(j, m):
            if on_result is not None:
                on_result(offset + j, m)

        results.extend(device.measure_many(list(items) * rounds, short, on_result=report, fresh=True))

    stretch(repeats or ROUNDS)
    if repeats is None:
        span, most = ROUNDS * protocol.min_s, 5 * ROUNDS
        # rounds are estimated from those taken so far and then checked: later rounds can run
        # faster than the first (a slow phase ending), which left a fresh-clone run 0.3 s short
        while 0 < (took := time.monotonic() - started) < span and (taken := len(results) // n) < most:
            stretch(min(most - taken, max(1, math.ceil(taken * (span - took) / took))))
        deadline = started + 5 * span

        def quietest(i: int) -> float:
            return min(m.median_ms for m in results[i::n])

        def unsettled() -> bool:
            if settle is not None and quietest(settle[0]) > settle[1] * (1 + SETTLE):
                return True
            if pruned is not None:
                parent = quietest(pruned[0])
                return any(quietest(j) > parent * (1 + PRUNED_OVER) for j in pruned[1])
            return False

        while unsettled() and time.monotonic() < deadline:
            stretch(ROUNDS)
    repeats = len(results) // n
    return [_kept([results[r * n + i] for r in range(repeats)], statistic) for i in range(n)]


def _kept(rounds: list[Measurement], statistic: str) -> Measurement:
    """One model's round that counts (its quietest, or its median round), with every round's
    median and every window's runs pooled (latency/verdict.py: what a verdict decides on)."""
    ranked = sorted(rounds, key=lambda m: m.median_ms)
    pick = ranked[0] if statistic == "quietest" else ranked[len(ranked) // 2]
    extra = {"rounds_ms": [m.median_ms for m in rounds], "statistic": statistic, "steady": steady(rounds)}
    return replace(pick, attempts=len(rounds), extra={**pick.extra, **extra})


@contextmanager
def rounds_progress(description: str, n: int, *, rounds: int = ROUNDS, enabled: bool = True) -> Iterator:
    """A progress display (a bar, or periodic lines in a log) of the rounds a comparison of N models
    takes; yields the `on_result` to give measure_interleaved. `rounds`: those it takes at least
    (a comparison may measure on past them: the count then grows with it)."""
    with progress_bar(enabled=enabled) as bar:
        # a round measures every model once: "5/15 rounds of 11 models", not to be read as 15 models
        task = bar.add_task(description, total=rounds, status="rounds" + f" of {n} models" * (n > 1))

        def on_result(j: int, m: Measurement) -> None:
            done = (j + 1) // n
            bar.update(task, completed=done, total=max(done, rounds))

        yield on_result


NOISY = 0.05  # rounds that disagree by more than this are shown beside the figure


def spread(times_ms: Sequence[float]) -> float:
    """How far repeated measurements of one model disagree: largest / smallest, minus 1 (0 for one)."""
    return max(times_ms) / min(times_ms) - 1


def noisy_rounds(rounds_ms: Sequence[float]) -> str:
    """Where the rounds disagree by over NOISY (a noisy device), how: "0.49-0.91 ms over 15 rounds
    (median 0.83)" (or "a / b / c" for up to three rounds); else ""."""
    if not rounds_ms or spread(rounds_ms) <= NOISY:
        return ""
    if len(rounds_ms) <= 3:
        return " / ".join(f"{t:.4g}" for t in rounds_ms) + " ms"
    ranked = sorted(rounds_ms)
    return f"{ranked[0]:.4g}-{ranked[-1]:.4g} ms over {len(ranked)} rounds (median {ranked[len(ranked) // 2]:.4g})"


def noise_warning(label: str, rounds_ms: Sequence[float]) -> str:
    """The line to log when a model's rounds disagree (see `noisy_rounds`), with the figure (how far
    they disagree), else ""."""
    rounds = noisy_rounds(rounds_ms)
    if not rounds:
        return ""
    return (
        f"the device is noisy: the {label} model's rounds disagree by {spread(rounds_ms):.0%}, {rounds}; "
        "ratios count each model's quietest round, budgets its steady runs (said once per run)"
    )


class NoiseNote:
    """Whether a run has said its device is noisy. Said once per run, with the first figure that
    showed it: on a shared machine nearly every measurement disagrees with itself by more than
    NOISY, and a line per measurement buries the lines that matter. Every later figure is kept
    (`spreads`), not said. One per run (a prune, a validation, a whole `edgeprune run`), passed to
    what measures in it; never module state, so two runs in one process each say it."""

    def __init__(self) -> None:
        self.said = ""  # the line, once said
        self.spreads: list[float] = []  # every noisy model's spread seen in the run

    def note(self, label: str, rounds_ms: Sequence[float], log) -> None:
        """Record a model's rounds; on the run's first noisy one, log the warning."""
        if not (warning := noise_warning(label, rounds_ms)):
            return
        self.spreads.append(spread(rounds_ms))
        if not self.said:
            self.said = warning
            log(warning)
