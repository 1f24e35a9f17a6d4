"""The calibration: a plan's unit sum -> whole-model milliseconds, fitted on measured whole models.

A line, `a * sum + b`, covers what no unit shows: input/output copies, layout reorders between
units, fusion across units, the per-inference overhead. Fitted robustly (Theil-Sen), since a
shared device disturbs some measurements.

Where that line is not enough, a weights term: `a * sum + c * max(0, W - knee) + b`, W the plan's
parameters in millions. Why: a unit is measured on its own weights, which stay in the CPU's cache
from one run to the next; a whole model whose weights outgrow the cache reads them all from the
next level on every inference. ORT mobilenet_v2_cifar at 28x28 on this VM: measured / unit sum is
0.58 for plans under 0.6 MiB of weights and 1.15 for the dense model's 8.5 MiB (L2: 2 MiB per
core). The knee is the device's, not known here, so it is searched over the calibration plans'
own weights. The term is kept only where it predicts each calibration point, fitted without that
point, at most WEIGHTS_GAIN times as far off as the line does (median), on at least
WEIGHTS_MIN_POINTS points: a second feature fitted to few points picks up noise, and a model
chosen on 9 points did not hold on measured plans (latency_tables/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WEIGHTS_MIN_POINTS = 15
WEIGHTS_GAIN = 0.5
KNEE_QUANTILES = np.linspace(0.2, 0.8, 7)  # knees tried: these quantiles of the calibration plans' weights
SLOPE_RANGE = (0.25, 4.0)  # a slope outside this says the plans' spread is lost in the noise


def value(cal: dict, sums, mparams=None) -> np.ndarray:
    """The calibrated prediction for unit sums (and the plans' weights in millions)."""
    out = cal["a"] * np.asarray(sums, float) + cal["b"]
    if cal.get("c"):
        out = out + cal["c"] * np.maximum(0.0, np.asarray(mparams, float) - cal["knee_mparams"])
    return out


def fit_line(x: np.ndarray, y: np.ndarray) -> dict:
    """(a, b): Theil-Sen slope (median of pairwise slopes), intercept the median residual; the
    offset alone (a = 1) when the slope is implausible, a ratio when the points do not spread."""
    from scipy.stats import theilslopes

    if len(x) == 0:
        return {"a": 1.0, "b": 0.0, "n": 0}
    if len(x) < 3 or np.ptp(x) < 1e-9:
        return {"a": float(np.median(y / x)), "b": 0.0, "n": len(x)}
    a = float(theilslopes(y, x)[0])
    if not SLOPE_RANGE[0] <= a <= SLOPE_RANGE[1]:
        return {"a": 1.0, "b": float(np.median(y - x)), "n": len(x)}
    return {"a": a, "b": float(np.median(y - a * x)), "n": len(x)}


def fit_weights(x: np.ndarray, w: np.ndarray, y: np.ndarray, knee: float) -> dict | None:
    """(a, c, b) at a given knee, robust to a disturbed point (soft-L1 loss on relative
    residuals); None where the fit is not physical (slope out of range, weights that speed up)."""
    from scipy.optimize import least_squares

    design = np.column_stack([x, np.maximum(0.0, w - knee), np.ones(len(x))])
    start = np.linalg.lstsq(design, y, rcond=None)[0]
    a, c, b = least_squares(lambda p: (design @ p - y) / y, start, loss="soft_l1", f_scale=0.02).x
    if not SLOPE_RANGE[0] <= a <= SLOPE_RANGE[1] or c <= 0:
        return None
    return {"a": float(a), "b": float(b), "c": float(c), "knee_mparams": float(knee), "n": len(x)}


def _left_out_error(fit, x: np.ndarray, w: np.ndarray, y: np.ndarray) -> float | None:
    """Median relative error of each point predicted by `fit` on the others (None: a fold failed)."""
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        cal = fit(x[keep], w[keep], y[keep])
        if cal is None:
            return None
        errors.append(abs(value(cal, x[i : i + 1], w[i : i + 1])[0] - y[i]) / y[i])
    return float(np.median(errors))


def fit_calibration(sums: Sequence[float], measured: Sequence[float], mparams: Sequence[float] | None = None) -> dict:
    """The line, or the line with a weights term where it clearly predicts better (see above).

    The result records its own median miss on the points (`fit_median_abs_err`) and, where the
    weights term was tried, both left-out errors (`left_out_err`: line, weights)."""
    x, y = np.asarray(sums, float), np.asarray(measured, float)
    cal = fit_line(x, y)
    w = None if mparams is None else np.asarray(mparams, float)
    if w is not None and len(x) >= WEIGHTS_MIN_POINTS and np.ptp(x) > 1e-9 and np.ptp(w) > 0:
        line_err = _left_out_error(lambda xs, ws, ys: fit_line(xs, ys), x, w, y)
        best = None
        for knee in np.unique(np.quantile(w, KNEE_QUANTILES)):
            whole = fit_weights(x, w, y, knee)
            if whole is None:
                continue
            err = _left_out_error(lambda xs, ws, ys, k=knee: fit_weights(xs, ws, ys, k), x, w, y)
            if err is not None and (best is None or err < best[0]):
                best = (err, whole)
        if line_err is not None:
            cal["left_out_err"] = {"line": line_err, "weights": best[0] if best else None}
        if best is not None and line_err is not None and best[0] <= WEIGHTS_GAIN * line_err:
            cal = {**best[1], "left_out_err": cal["left_out_err"]}
    residual = (value(cal, x, w) - y) / y if len(x) else np.array([])
    cal["fit_median_abs_err"] = float(np.median(np.abs(residual))) if len(x) else None
    return cal


def describe(cal: dict) -> str:
    """One line: the fitted calibration, for a summary."""
    text = f"calibration a={cal['a']:.3f} b={cal['b']:.4f} ms"
    if cal.get("c"):
        text += f" + {cal['c']:.4f} ms per million weights over {cal['knee_mparams']:.3g} M"
    return text
