"""Plan -> predicted milliseconds: table look-ups, summed, then calibrated on whole models.

predicted = a * sum(table[unit] - overhead for unit in plan) + b, where `overhead` is the cost of
one call of an empty model on the device (every isolated single-unit measurement pays it once; a
whole model pays it once in all; zero for tables measured in context, see `unit_model`'s copies)
and (a, b) are fitted (robustly) on
a few whole-model measurements of random plans (the part no table covers: input/output copies,
layout reorders between units, fusion across units, per-inference overhead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.table import LatencyTable, calibration_key


@dataclass
class Predictor:
    layers: ModelLayers
    table: LatencyTable

    def unit_sum(self, counts: Sequence[int] | None = None) -> float:
        configs = self.layers.configs(counts)
        missing = [c.key for c in configs if c.key not in self.table.entries]
        if missing:
            raise EdgepruneError(
                f"latency table lacks {len(missing)} of {len(configs)} layer configurations of this plan "
                f"(e.g. {missing[0]}); profile this model on this device with `edgeprune profile`"
            )
        overhead = self.table.overhead_ms
        return float(sum(max(0.0, self.table.entries[c.key]["median_ms"] - overhead) for c in configs))

    def predict(self, counts: Sequence[int] | None = None) -> float:
        cal = self.table.calibration
        return cal["a"] * self.unit_sum(counts) + cal["b"]

    def compiled(self) -> CompiledPredictor:
        """The same prediction, vectorised over many plans at once (what a search's repair uses)."""
        return CompiledPredictor.build(self)

    def breakdown(self, counts: Sequence[int] | None = None) -> list[tuple[str, float]]:
        return [(c.key, self.table.entries[c.key]["median_ms"]) for c in self.layers.configs(counts)]

    def fit_calibration(self, sums: Sequence[float], measured: Sequence[float]) -> dict:
        """(a, b) from unit sums and measured whole-model ms, robust to a disturbed measurement:
        Theil-Sen slope (median of pairwise slopes), intercept the median residual; the offset
        alone (a = 1) when the slope is implausible, a ratio when the points do not spread."""
        from scipy.stats import theilslopes

        x, y = np.asarray(sums, float), np.asarray(measured, float)
        if len(x) == 0:
            cal = {"a": 1.0, "b": 0.0, "n": 0}
        elif len(x) < 3 or np.ptp(x) < 1e-9:
            cal = {"a": float(np.median(y / x)), "b": 0.0, "n": len(x)}
        else:
            a = float(theilslopes(y, x)[0])
            if not 0.25 <= a <= 4.0:  # the plans' spread is lost in the noise: fit the offset alone
                cal = {"a": 1.0, "b": float(np.median(y - x)), "n": len(x)}
            else:
                cal = {"a": a, "b": float(np.median(y - a * x)), "n": len(x)}
        residual = (cal["a"] * x + cal["b"] - y) / y if len(x) else np.array([])
        cal["fit_median_abs_err"] = float(np.median(np.abs(residual))) if len(x) else None
        self.table.calibration = cal
        return cal


def anchor_scale(table: LatencyTable, dense_counts: Sequence[int], dense_ms: float, dense_predicted_ms: float) -> float:
    """The factor that carries the table's predictions to the device as it measures now.

    Where the table holds its own measurement of the dense model (its first calibration point),
    the factor is dense now / dense then: the drift since the profile and nothing else. Dividing by
    the prediction instead would also fold the calibration line's own miss at the dense end into
    every plan (mobilenet_v2_cifar on OpenVINO: the line over-predicts dense by 10 %, which turned
    74 % of plans within ±10 % into 4 %). Tables without that point: measured / predicted."""
    point = table.meta.get("calibration_points", {}).get(calibration_key(dense_counts))
    if point and point.get("measured_ms"):
        return dense_ms / point["measured_ms"]
    return dense_ms / dense_predicted_ms


@dataclass
class CompiledPredictor:
    """A Predictor as arrays: each unit's latency over the allowed keep-counts of the groups it
    depends on (one or two groups for a conv), so predicting N plans is a few gathers and sums."""

    allowed: list[np.ndarray]  # per group, its allowed keep-counts (ascending)
    units: list[tuple[tuple[int, ...], np.ndarray]]  # (groups the unit depends on, ms over their counts)
    constant_ms: float  # units no group changes
    a: float
    b: float

    @classmethod
    def build(cls, predictor: Predictor) -> CompiledPredictor:
        layers, entries = predictor.layers, predictor.table.entries
        overhead = predictor.table.overhead_ms
        constant, units, missing = 0.0, [], []
        for u in range(len(layers.units)):
            involved, configs = layers.unit_grid(u)
            ms = np.array(
                [
                    0.0
                    if c is None
                    else max(0.0, entries[c.key]["median_ms"] - overhead)
                    if c.key in entries
                    else np.nan
                    for c in configs
                ]
            )  # a unit of a removed block (None) costs nothing
            missing += [c.key for c, v in zip(configs, ms) if np.isnan(v)]
            if not involved:
                constant += float(ms[0])
            else:
                shape = tuple(len(layers.space.groups[g].allowed) for g in involved)
                units.append((tuple(involved), ms.reshape(shape)))
        if missing:
            raise EdgepruneError(
                f"latency table lacks {len(missing)} reachable layer configurations of this model (e.g. {missing[0]}); "
                "profile this model on this device with `edgeprune profile`"
            )
        cal = predictor.table.calibration
        allowed = [np.asarray(g.allowed) for g in layers.space.groups]
        return cls(allowed, units, constant, float(cal["a"]), float(cal["b"]))

    def indices(self, counts) -> np.ndarray:
        """(N, G) keep-counts -> (N, G) positions in each group's allowed counts."""
        counts = np.atleast_2d(np.asarray(counts))
        idx = np.empty(counts.shape, dtype=np.intp)
        for g, allowed in enumerate(self.allowed):
            idx[:, g] = np.searchsorted(allowed, counts[:, g])
        return idx

    def unit_sum(self, counts) -> np.ndarray:
        idx = self.indices(counts)
        total = np.full(len(idx), self.constant_ms)
        for groups, ms in self.units:
            total += ms[tuple(idx[:, g] for g in groups)]
        return total

    def predict(self, counts) -> np.ndarray:
        """Predicted ms of each row of `counts` (N x G keep-counts)."""
        return self.a * self.unit_sum(counts) + self.b


def error_stats(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """Share of predictions within +-5 % and +-10 % of the measurement, and the median |error| %."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    err = np.abs(p - m) / m
    return {
        "n": len(m),
        "within_5": float(np.mean(err <= 0.05)),
        "within_10": float(np.mean(err <= 0.10)),
        "median_abs_pct": float(np.median(err) * 100),
        "max_abs_pct": float(np.max(err) * 100),
    }
