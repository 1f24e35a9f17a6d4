"""Searchers side by side under one latency budget: uniform, random, bo, bocr, pso, bocr (FLOPs).

    python bench/search_compare.py [--weights zoo:resnet20-fashion-mnist] [--budget 50%] [--evals 50]
                                   [--seeds 0 1 2] [--searchers uniform random bo bocr pso bocr-flops]
    python bench/search_compare.py --weights zoo:resnet56-fashion-mnist --searchers bo bocr

Each (searcher, seed) is a real `edgeprune.prune` run on the device profile with the shipped
latency table: the same number of evaluations for every searcher, the same accuracy proxy
(held-out split, BN recalibrated), the same hardware-in-the-loop check at the end (the chosen plan
is the best whose *measured* latency meets the budget). `bocr-flops` is BOCR constrained by MACs
instead of predicted latency (its MACs target starts at budget / dense ms and is tightened the
same way until the measured latency fits): the FLOPs-targeted baseline at the same measured budget.

Per searcher: best proxy accuracy of the chosen plan (mean, min-max over seeds), evaluations to
reach 99 % of the run's best, the chosen plan's measured latency, search wall time. Runs are kept
under runs/bench-search/ and reused when the script is run again (delete them to start over).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgeprune.pipeline import prune_run as prune
from edgeprune.report import convergence_plot

SEARCHERS = ["uniform", "random", "bo", "bocr", "pso", "bocr-flops"]


def run_one(args, name: str, seed: int) -> dict:
    search, _, flops = name.partition("-")
    tag = Path(args.weights.removeprefix("zoo:")).stem
    out = Path(args.runs) / f"{tag}-{args.budget.rstrip('%')}-{name}-s{seed}"
    results = out / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    t0 = time.monotonic()
    res = prune(
        out,
        resume=(out / "config.json").is_file(),
        progress=False,
        log=lambda s: None,
        weights=args.weights,
        device=args.device,
        budget=args.budget,
        search=search,
        evals=args.evals,
        seed=seed,
        cost="flops" if flops else "latency",
        margin=args.margin,
        **({"table": args.table} if args.table else {}),
    )
    res["wall_s"] = time.monotonic() - t0
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="zoo:resnet20-fashion-mnist")
    ap.add_argument("--device", default="cpu-onnxruntime")
    ap.add_argument("--table", default=None, help="default latency_tables/DEVICE/MODEL.json")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--evals", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--searchers", nargs="+", default=SEARCHERS, choices=SEARCHERS)
    ap.add_argument("--runs", default="runs/bench-search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margin", type=float, default=0.0, help="safety margin of the measured check (prune: 0.02)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.weights} on {args.device}, budget {args.budget} of dense, {args.evals} evaluations, seeds {args.seeds}"
    )
    header = (
        f"{'searcher':<11}{'proxy acc % (mean, min-max)':>30}{'evals to 99%':>14}{'measured ms':>13}"
        f"{'budget ms':>11}{'MACs %':>8}{'met':>5}{'s / run':>9}"
    )
    print(header)
    print("-" * len(header))
    curves, table = {}, {}
    for name in args.searchers:
        rs = [run_one(args, name, seed) for seed in args.seeds]
        acc = np.array([r["chosen"]["proxy_accuracy"] for r in rs]) * 100
        table[name] = rs
        curves[name] = [_scores(r["run_dir"]) for r in rs]
        print(
            f"{name:<11}{acc.mean():>17.2f} ({acc.min():.2f}-{acc.max():.2f})"
            f"{np.mean([r['evals_to_99pct'] for r in rs]):>14.1f}"
            f"{np.mean([r['chosen']['measured_ms'] for r in rs]):>13.4f}"
            f"{rs[0]['budget_ms']:>11.4f}"
            f"{np.mean([r['chosen']['macs'] / r['dense']['macs'] for r in rs]) * 100:>8.1f}"
            f"{sum(r['met_budget'] for r in rs):>3}/{len(rs)}"
            f"{np.mean([r.get('wall_s', r['seconds']) for r in rs]):>9.0f}",
            flush=True,
        )
    # a common bar every searcher reaches: 90 % of the weakest searcher's mean final best (uniform aside)
    finals = {n: np.mean([max(c) for c in runs]) for n, runs in curves.items() if n != "uniform"}
    bar = 0.9 * min(finals.values())
    reach = {
        name: [next((i + 1 for i, v in enumerate(np.maximum.accumulate(c)) if v >= bar), None) for c in runs]
        for name, runs in curves.items()
    }
    print(f"evaluations to reach {bar:.2%} proxy accuracy (90 % of the weakest searcher's mean best), per seed:")
    for name, r in reach.items():
        print(f"  {name:<11}" + "  ".join("never" if v is None else f"{v:>5}" for v in r))
    d = table[args.searchers[0]][0]["dense"]
    print(f"dense: proxy accuracy {d['proxy_accuracy']:.2%}, measured {d['measured_ms']:.4f} ms")
    if "uniform" in table:
        base = np.mean([r["chosen"]["proxy_accuracy"] for r in table["uniform"]])
        for name in args.searchers:
            if name != "uniform":
                gain = np.mean([r["chosen"]["proxy_accuracy"] for r in table[name]]) - base
                print(f"{name} vs uniform: {gain * 100:+.2f} points of proxy accuracy")
    plot = Path(args.runs) / f"convergence-{Path(args.weights.removeprefix('zoo:')).stem}-{args.budget.rstrip('%')}.png"
    convergence_plot(curves, plot, title=f"{args.weights} at {args.budget} of dense latency")
    print(f"convergence plot: {plot}")


def _scores(run_dir: str) -> list[float]:
    import sqlite3

    with sqlite3.connect(Path(run_dir) / "evals.sqlite") as db:
        return [r[0] for r in db.execute("SELECT score FROM evals WHERE duplicate = 0 ORDER BY i")]


if __name__ == "__main__":
    main()
