"""Plan -> predicted milliseconds: table look-ups, summed, then calibrated on whole models.

predicted = calibration(sum(table[unit] - overhead for unit in plan)), where `overhead` is the
cost of one call of an empty model on the device (every isolated single-unit measurement pays it
once; a whole model pays it once in all; zero for tables measured in context, see `unit_model`'s
copies) and the calibration (calibration.py: a robust line, with a weights term where a whole
model's weights outgrow the cache its units ran in) is fitted on whole-model measurements of
random plans (the part no table covers: input/output copies, layout reorders between units,
fusion across units, per-inference overhead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.latency.calibration import fit_calibration, value
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
        counts = self.layers.space.full_counts() if counts is None else counts
        return float(
            value(self.table.calibration, [self.unit_sum(counts)], [self.layers.space.params(counts) / 1e6])[0]
        )

    def compiled(self) -> CompiledPredictor:
        """The same prediction, vectorised over many plans at once (what a search's repair uses)."""
        return CompiledPredictor.build(self)

    def breakdown(self, counts: Sequence[int] | None = None) -> list[tuple[str, float]]:
        return [(c.key, self.table.entries[c.key]["median_ms"]) for c in self.layers.configs(counts)]

    def fit_calibration(self, sums: Sequence[float], measured: Sequence[float], plans=None) -> dict:
        """Fit the table's calibration on whole models (unit sums, measured ms; with `plans`, their
        keep-counts, which lets calibration.py try its weights term) and keep it in the table."""
        mparams = None if plans is None else [self.layers.space.params(c) / 1e6 for c in plans]
        self.table.calibration = fit_calibration(sums, measured, mparams)
        return self.table.calibration


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
class _CompiledUnit:
    """One unit's latency over the distinct channel counts of its forms (NaN where unreachable)."""

    cols: tuple[int, ...]  # its forms, as columns of the predictor's channel counts
    luts: list[tuple[int, np.ndarray]]  # per form: (smallest count, count - smallest -> position in ms)
    ms: np.ndarray  # latency over the product of the forms' distinct counts
    gate: int | None  # the group whose keep-count 0 removes the unit

    def __call__(self, channels: np.ndarray, counts: np.ndarray) -> np.ndarray:
        idx = tuple(lut[np.clip(channels[:, c] - lo, 0, len(lut) - 1)] for c, (lo, lut) in zip(self.cols, self.luts))
        ms = self.ms[idx]
        return ms if self.gate is None else np.where(counts[:, self.gate] > 0, ms, 0.0)


def _lut(values: np.ndarray) -> tuple[int, np.ndarray]:
    lo = int(values[0])
    lut = np.zeros(int(values[-1]) - lo + 1, dtype=np.intp)
    lut[values.astype(int) - lo] = np.arange(len(values))
    return lo, lut


@dataclass
class CompiledPredictor:
    """A Predictor as arrays: every tensor's channel count is one product of the removed channels
    with a (tensors x groups) matrix, and each unit's latency a lookup by those counts, so
    predicting N plans costs a matrix product and a gather per unit."""

    widths: np.ndarray  # per group, its full width
    c0: np.ndarray  # (T,) the dense channel count of every tensor a unit reads
    a: np.ndarray  # (T, G) how those counts fall with each group's removed channels
    units: list[_CompiledUnit]
    constant_ms: float  # units no group changes
    calibration: dict  # the table's (its weights term, where it has one, needs each plan's weights)
    params_many: Callable[[np.ndarray], np.ndarray]  # (N, G) keep-counts -> (N,) parameters

    @classmethod
    def build(cls, predictor: Predictor) -> CompiledPredictor:
        layers, entries = predictor.layers, predictor.table.entries
        overhead = predictor.table.overhead_ms
        constant, units, missing, tensors = 0.0, [], [], {}
        for u, unit in enumerate(layers.units):
            grid = layers.unit_grid(u)
            ms = np.full(tuple(len(v) for v in grid.values), np.nan)
            for index, cfg in grid.configs.items():
                if cfg.key in entries:
                    ms[index] = max(0.0, entries[cfg.key]["median_ms"] - overhead)
                else:
                    missing.append(cfg.key)
            if not any(np.abs(layers.form(t)[1]).sum() for t in grid.forms) and unit.gate is None:
                constant += float(np.nan_to_num(ms.flat[0]))
                continue
            cols = tuple(tensors.setdefault(t, len(tensors)) for t in grid.forms)
            gate = unit.gate if grid.removable else None
            units.append(_CompiledUnit(cols, [_lut(v) for v in grid.values], ms, gate))
        if missing:
            raise EdgepruneError(
                f"latency table lacks {len(missing)} reachable layer configurations of this model (e.g. {missing[0]}); "
                "profile this model on this device with `edgeprune profile` (it measures only what is missing)"
            )
        forms = [layers.form(t) for t in tensors]
        c0 = np.array([f[0] for f in forms], float)
        a = np.stack([f[1] for f in forms]) if forms else np.zeros((0, len(layers.space.groups)))
        widths = np.asarray(layers.space.widths, float)
        return cls(widths, c0, a, units, constant, dict(predictor.table.calibration), layers.space.cost.params_many)

    def unit_sum(self, counts) -> np.ndarray:
        counts = np.atleast_2d(np.asarray(counts))
        channels = np.rint(self.c0 - (self.widths - counts) @ self.a.T).astype(np.intp)  # (N, T)
        total = np.full(len(counts), self.constant_ms)
        for unit in self.units:
            total += unit(channels, counts)
        return total

    def predict(self, counts) -> np.ndarray:
        """Predicted ms of each row of `counts` (N x G keep-counts)."""
        mparams = self.params_many(counts) / 1e6 if self.calibration.get("c") else None  # only where it counts
        return value(self.calibration, self.unit_sum(counts), mparams)


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
