"""Plan -> predicted milliseconds: table look-ups, summed, then calibrated on whole models.

predicted = a * sum(table[unit] - overhead for unit in plan) + b, where `overhead` is the cost of
one call of an empty model on the device (every single-unit measurement pays it once; a whole
model pays it once in all) and (a, b) are fitted (robustly) on
a few whole-model measurements of random plans (the part no table covers: input/output copies,
layout reorders between units, fusion across units, per-inference overhead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.table import LatencyTable


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
        overhead = self.table.meta.get("unit_overhead_ms", 0.0)
        return float(sum(max(0.0, self.table.entries[c.key]["median_ms"] - overhead) for c in configs))

    def predict(self, counts: Sequence[int] | None = None) -> float:
        cal = self.table.calibration
        return cal["a"] * self.unit_sum(counts) + cal["b"]

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
