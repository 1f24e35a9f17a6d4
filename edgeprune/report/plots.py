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


def round_budgets(evals: Sequence[Mapping]) -> dict[int, float]:
    """Each round's search budget: the one its evaluations were made under (a round of the measured
    search is tightened or loosened from the last; within a round it holds)."""
    return {int(r.get("round") or 0): r["budget"] for r in evals if r.get("budget") is not None}


def _round_label(k: int, budgets: Mapping[int, float]) -> str:
    before = budgets.get(k - 1)
    moved = "" if before is None or before == budgets[k] else ", loosened" if budgets[k] > before else ", tightened"
    return f"round {k + 1} search budget {budgets[k]:.4g} ms (predicted{moved})"


def draw_scatter(
    ax,
    evals: Sequence[Mapping],
    *,
    budget_ms: float | None = None,
    measured: Sequence[Mapping] = (),
    chosen: Mapping | None = None,
    search_budgets: bool = True,
) -> None:
    """`scatter_plot`'s drawing on `ax`. Each round of the measured search in its own colour: its
    evaluations at their predicted ms (dots), its measured candidates at their measured ms
    (crosses, joined to their prediction) and, with `search_budgets` (a latency search: the
    budgets are predicted ms), its search budget as a dotted line. A loosened round's plans sit
    past the budget's line in predicted ms and are held to it as measured: without its own line
    they would read as over the budget."""
    import matplotlib

    colour = matplotlib.colormaps["tab10"]
    budgets = round_budgets(evals)
    score_of = {r["plan_hash"]: r["score"] for r in evals}
    measured = [m for m in measured if m.get("plan_hash") in score_of]
    rounds = sorted({int(r.get("round") or 0) for r in evals} | {int(m.get("round") or 0) for m in measured})
    for k in rounds:
        c = colour(k % 10)
        rows = [r for r in evals if int(r.get("round") or 0) == k and r.get("predicted_ms") is not None]
        if rows:
            ax.scatter(
                [r["predicted_ms"] for r in rows],
                [r["score"] * 100 for r in rows],
                s=14,
                color=c,
                alpha=0.7,
                label=f"round {k + 1}: {len(rows)} evaluations (predicted ms)",
            )
        if search_budgets and k in budgets:
            ax.axvline(budgets[k], color=c, ls=":", lw=1.2, label=_round_label(k, budgets))
        shown = [(m, score_of[m["plan_hash"]]) for m in measured if int(m.get("round") or 0) == k]
        for j, (m, score) in enumerate(shown):
            if m.get("predicted_ms") is not None:
                ax.plot([m["predicted_ms"], m["measured_ms"]], [score * 100] * 2, color=c, lw=0.8, alpha=0.6)
            label = f"round {k + 1}: measured on the device" if j == 0 else None
            ax.scatter([m["measured_ms"]], [score * 100], marker="x", color=c, label=label)
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
        ax.axvline(budget_ms, color="black", ls="--", lw=1, label=f"budget {budget_ms:.4g} ms (as measured)")


def scatter_plot(
    evals: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    budget_ms: float | None = None,
    measured: Sequence[Mapping] = (),
    chosen: Mapping | None = None,
    search_budgets: bool = True,
    title: str = "",
) -> Path:
    """Proxy accuracy against latency of every evaluation, round by round (see `draw_scatter`), and
    the budget as a vertical line."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    draw_scatter(ax, evals, budget_ms=budget_ms, measured=measured, chosen=chosen, search_budgets=search_budgets)
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
