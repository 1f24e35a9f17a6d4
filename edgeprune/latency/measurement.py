"""Measurement protocol and its result.

The statistic is the median of many timed runs after a warm-up by time and count. The CPU
time used by other processes during the run is recorded, and a noisy run (high coefficient of
variation or a busy machine) is measured again, keeping the quietest attempt.

`timing` says what one run is. "native" (the default) times what the runtime's own benchmark
tool times: the input set once, one inference call, the output left where the runtime wrote it
(OpenVINO's benchmark_app, an ONNX Runtime io-binding loop, TensorRT's CUDA events): what the
device spends on the model. "python-call" times the Python call a user's code makes, input dict
in and output array copied out: the model plus the binding's overhead, which on a small model is a
tenth of its time (OpenVINO, resnet20 at 28x28). Every table and result records which.

With `precision` set, timing stops as soon as the median is known well enough (the 95 %
confidence interval of the median, from order statistics, within +-precision of it) once
`min_runs` and `min_s` are reached, and at `max_s` at the latest: a profile of thousands of
single units spends its time where the latency is uncertain, not a fixed time on each.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil

TIMINGS = ("native", "python-call")


def _protocol_rules() -> dict:
    from edgeprune.checks import Rule

    count, seconds = Rule(int, lo=0), Rule(float, lo=0)
    share = Rule(float, lo=0, lo_open=True)
    return {
        "warmup_runs": count,
        "warmup_s": seconds,
        "min_runs": Rule(int, lo=1),
        "min_s": seconds,
        "max_runs": Rule(int, lo=1),
        "precision": Rule(float, lo=0, lo_open=True, optional=True),
        "max_s": Rule(float, lo=0, lo_open=True, optional=True),
        "max_cv": share,
        "max_foreign_load": share,
        "retries": count,
        "timing": Rule(str, choices=TIMINGS),
    }


@dataclass(frozen=True)
class Protocol:
    """How a latency is measured; stored with every result."""

    warmup_runs: int = 10
    warmup_s: float = 0.3
    min_runs: int = 50
    min_s: float = 1.0
    max_runs: int = 5000
    precision: float | None = None  # stop once the median's 95 % CI is within +-precision (relative)
    max_s: float | None = None  # stop timing after this long whatever the precision
    max_cv: float = 0.10  # a run noisier than this is repeated
    max_foreign_load: float = 0.5  # share of the other cores' time used by other processes
    retries: int = 2
    pin_cpus: tuple[int, ...] | None = None  # run pinned to these CPUs (os.sched_setaffinity)
    timing: str = "native"  # what one run is: the runtime's inference call, or the Python call (TIMINGS)

    @classmethod
    def from_dict(cls, d: dict | None) -> Protocol:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            from edgeprune.errors import EdgepruneError

            raise EdgepruneError(
                f"unknown protocol field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        from edgeprune.checks import check_values

        pins = d.pop("pin_cpus", None)
        d = check_values(d, _protocol_rules(), where="protocol", as_flag=False)  # one line, not a bad timing
        if pins is not None:  # the device's CPU numbers (an agent's are not the caller's): only their form here
            from edgeprune.errors import EdgepruneError

            if not isinstance(pins, (list, tuple)) or not all(type(c) is int and c >= 0 for c in pins):
                raise EdgepruneError(f"pin_cpus must be a list of CPU numbers, got {pins!r}")
            d["pin_cpus"] = tuple(pins)
        return cls(**d)

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


def median_ci_halfwidth(sorted_samples: list[float]) -> float:
    """Half-width of the distribution-free 95 % confidence interval of the median, relative to it
    (order statistics n/2 -+ 0.98 sqrt(n)); inf with too few samples to say."""
    n = len(sorted_samples)
    lo, hi = int(n / 2 - 0.98 * n**0.5), int(math.ceil(n / 2 + 0.98 * n**0.5))
    if lo < 0 or hi >= n:
        return math.inf
    med = statistics.median(sorted_samples)
    return (sorted_samples[hi] - sorted_samples[lo]) / 2 / med if med > 0 else math.inf


def _enough(samples: list[float], elapsed: float, protocol: Protocol) -> bool:
    if len(samples) >= protocol.max_runs or (protocol.max_s is not None and elapsed >= protocol.max_s):
        return True
    if len(samples) < protocol.min_runs or elapsed < protocol.min_s:
        return False
    if protocol.precision is None:
        return True
    # checking the interval sorts the samples: do it at geometric intervals, not after every run
    n = len(samples)
    if n == protocol.min_runs or n & (n - 1) == 0 or n % 64 == 0:
        return median_ci_halfwidth(sorted(samples)) <= protocol.precision
    return False


def time_runs(
    run: Callable[[], object], protocol: Protocol, *, timed: Callable[[], float] | None = None
) -> Measurement:
    """Time `run` once under `protocol` (no retry): warm-up, then timed runs, then statistics.

    `timed`, where given, runs once and returns its own duration in ms (the runtime's native timing).
    """
    start = time.monotonic()
    for i in range(protocol.max_runs):
        run()
        if i + 1 >= protocol.warmup_runs and time.monotonic() - start >= protocol.warmup_s:
            break
    ncpu = psutil.cpu_count() or 1
    busy0, own0, wall0 = _cpu_busy(), _own_cpu(), time.monotonic()
    samples: list[float] = []
    while len(samples) < protocol.max_runs:
        if timed is not None:
            samples.append(timed())
        else:
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1000.0)
        if _enough(samples, time.monotonic() - wall0, protocol):
            break
    wall = max(time.monotonic() - wall0, 1e-9)
    foreign = max(0.0, (_cpu_busy() - busy0) - (_own_cpu() - own0)) / (wall * ncpu)
    from edgeprune.latency.verdict import window_quantiles

    samples.sort()
    mean = statistics.fmean(samples)
    return Measurement(
        median_ms=statistics.median(samples),
        p90_ms=samples[min(len(samples) - 1, int(0.9 * len(samples)))],
        mean_ms=mean,
        cv=statistics.pstdev(samples) / mean if mean > 0 else 0.0,
        n=len(samples),
        foreign_load=round(min(1.0, foreign), 4),
        extra={"quantiles_ms": window_quantiles(samples)},  # to pool with other windows (latency/verdict.py)
    )


def is_noisy(m: Measurement, protocol: Protocol) -> bool:
    return m.cv > protocol.max_cv or m.foreign_load > protocol.max_foreign_load


def measure_callable(
    run: Callable[[], object], protocol: Protocol | None = None, *, timed: Callable[[], float] | None = None
) -> Measurement:
    """Measure `run`, repeating noisy attempts; returns the attempt with the lowest CV."""
    protocol = protocol or Protocol()
    previous = None
    if protocol.pin_cpus and hasattr(os, "sched_setaffinity"):
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, protocol.pin_cpus)
    try:
        attempts = [time_runs(run, protocol, timed=timed)]
        while is_noisy(attempts[-1], protocol) and len(attempts) <= protocol.retries:
            attempts.append(time_runs(run, protocol, timed=timed))
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
    best = min(attempts, key=lambda m: (is_noisy(m, protocol), m.cv))
    best.attempts = len(attempts)
    return best
