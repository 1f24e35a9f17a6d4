"""Measurement protocol and its result.

The statistic is the median of many timed runs after a warm-up by time and count. The CPU
time used by other processes during the run is recorded, and a noisy run (high coefficient of
variation or a busy machine) is measured again, keeping the quietest attempt.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil


@dataclass(frozen=True)
class Protocol:
    """How a latency is measured; stored with every result."""

    warmup_runs: int = 10
    warmup_s: float = 0.3
    min_runs: int = 50
    min_s: float = 1.0
    max_runs: int = 5000
    max_cv: float = 0.10  # a run noisier than this is repeated
    max_foreign_load: float = 0.5  # share of the other cores' time used by other processes
    retries: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measurement:
    """Latency of one model on one device, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    n: int
    foreign_load: float  # CPU share (0..1 of the machine) used by other processes during the run
    attempts: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _cpu_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _own_cpu() -> float:
    t = psutil.Process(os.getpid()).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def time_runs(
    run: Callable[[], object], protocol: Protocol, *, clock: Callable[[], float] = time.perf_counter
) -> Measurement:
    """Time `run` once under `protocol` (no retry): warm-up, then timed runs, then statistics."""
    start = time.monotonic()
    for i in range(protocol.max_runs):
        run()
        if i + 1 >= protocol.warmup_runs and time.monotonic() - start >= protocol.warmup_s:
            break
    ncpu = psutil.cpu_count() or 1
    busy0, own0, wall0 = _cpu_busy(), _own_cpu(), time.monotonic()
    samples: list[float] = []
    while len(samples) < protocol.max_runs:
        t0 = clock()
        run()
        samples.append((clock() - t0) * 1000.0)
        if len(samples) >= protocol.min_runs and time.monotonic() - wall0 >= protocol.min_s:
            break
    wall = max(time.monotonic() - wall0, 1e-9)
    foreign = max(0.0, (_cpu_busy() - busy0) - (_own_cpu() - own0)) / (wall * ncpu)
    samples.sort()
    mean = statistics.fmean(samples)
    return Measurement(
        median_ms=statistics.median(samples),
        p90_ms=samples[min(len(samples) - 1, int(0.9 * len(samples)))],
        mean_ms=mean,
        cv=statistics.pstdev(samples) / mean if mean > 0 else 0.0,
        n=len(samples),
        foreign_load=round(min(1.0, foreign), 4),
    )


def is_noisy(m: Measurement, protocol: Protocol) -> bool:
    return m.cv > protocol.max_cv or m.foreign_load > protocol.max_foreign_load


def measure_callable(run: Callable[[], object], protocol: Protocol | None = None) -> Measurement:
    """Measure `run`, repeating noisy attempts; returns the attempt with the lowest CV."""
    protocol = protocol or Protocol()
    attempts = [time_runs(run, protocol)]
    while is_noisy(attempts[-1], protocol) and len(attempts) <= protocol.retries:
        attempts.append(time_runs(run, protocol))
    best = min(attempts, key=lambda m: (is_noisy(m, protocol), m.cv))
    best.attempts = len(attempts)
    return best
