"""Plots a user would rather look at than read: search convergence, accuracy against latency."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: str | os.PathLike, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid, legend, write the PNG, free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _figure().close(fig)
    return path


def convergence_plot(
    series: Mapping[str, Sequence[Sequence[float]] | Sequence[float]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Best score so far against the evaluation count, one line per searcher; a searcher with
    several runs (seeds) is drawn as their mean with the min-max band."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, runs in series.items():
        runs = [runs] if runs and np.isscalar(runs[0]) else list(runs)
        runs = [np.maximum.accumulate(np.asarray(r, float)) for r in runs if len(r)]
        if not runs:
            continue
        n = max(len(r) for r in runs)
        padded = np.array([np.concatenate([r, np.full(n - len(r), r[-1])]) for r in runs]) * 100
        x = np.arange(1, n + 1)
        line = ax.plot(x, padded.mean(0), label=f"{name}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
        if len(runs) > 1:
            ax.fill_between(x, padded.min(0), padded.max(0), color=line[0].get_color(), alpha=0.15)
    return _save(fig, ax, path, "evaluations", "best proxy accuracy so far (%)", title or "search convergence")


def scatter_plot(
    evals: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    budget_ms: float | None = None,
    measured: Sequence[Mapping] = (),
    chosen: Mapping | None = None,
    title: str = "",
) -> Path:
    """Proxy accuracy against predicted latency of every evaluation; measured candidates at
    their measured latency, joined to their prediction; the budget as a vertical line."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = [r for r in evals if r.get("predicted_ms") is not None]
    if rows:
        ax.scatter(
            [r["predicted_ms"] for r in rows],
            [r["score"] * 100 for r in rows],
            s=14,
            c=[r["i"] for r in rows],
            cmap="viridis",
            alpha=0.8,
            label="evaluations (predicted ms; colour = order)",
        )
    score_of = {r["plan_hash"]: r["score"] for r in evals}
    for j, m in enumerate(measured):
        s = score_of.get(m["plan_hash"])
        if s is None:
            continue
        ax.plot([m["predicted_ms"], m["measured_ms"]], [s * 100] * 2, color="tab:red", lw=0.8, alpha=0.6)
        ax.scatter(
            [m["measured_ms"]], [s * 100], marker="x", color="tab:red", label="measured on device" if j == 0 else None
        )
    if chosen is not None:
        ax.scatter(
            [chosen["measured_ms"]],
            [chosen["score"] * 100],
            marker="*",
            s=160,
            color="gold",
            edgecolor="black",
            zorder=5,
            label="chosen",
        )
    if budget_ms is not None:
        ax.axvline(budget_ms, color="black", ls="--", lw=1, label=f"budget {budget_ms:.4g} ms")
    return _save(
        fig, ax, path, "latency (ms)", "proxy accuracy (%)", title or "accuracy vs latency of every evaluation"
    )


def prediction_plot(points: Sequence[Mapping], path: str | os.PathLike, *, title: str = "") -> Path:
    """Predicted against measured latency of every plan measured on the device (y = x dashed)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    pts = [p for p in points if p.get("predicted_ms") and p.get("measured_ms")]
    if pts:
        x = np.array([p["predicted_ms"] for p in pts])
        y = np.array([p["measured_ms"] for p in pts])
        for label in dict.fromkeys(p.get("label", "candidates") for p in pts):
            sel = [i for i, p in enumerate(pts) if p.get("label", "candidates") == label]
            ax.scatter(x[sel], y[sel], s=22, label=label)
        lo, hi = min(x.min(), y.min()) * 0.95, max(x.max(), y.max()) * 1.05
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="exact")
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="gray", alpha=0.15, label="±10 %")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    return _save(fig, ax, path, "predicted ms", "measured ms", title or "prediction vs measurement")
