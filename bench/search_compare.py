"""The search judge: every searcher and proxy under the same measured budgets, finetuned alike, against uniform.

    python bench/search_compare.py                                  # resnet20, 50/33/25 %, the default methods
    python bench/search_compare.py --weights zoo:mobilenet_v2_cifar-fashion-mnist --budgets 50% 33%
    python bench/search_compare.py --methods uniform bo bocr --finetune-epochs 0   # search proxy only
    python bench/search_compare.py --finetune-epochs 30 --train-device cuda          # a GPU host

Each (method, budget, seed) is a real `edgeprune.prune` run on the device profile with the shipped
latency table (every method the same evaluations unless it sets its own, the same space: `--depth`
lets every method remove whole residual blocks, which the tighter budgets need), then, with
`--finetune-epochs`, the same distilled finetune of the chosen plan (`finetune_run`, seeded by the
search seed, so the gap to uniform is paired by seed). A method is a searcher with its settings:

  uniform, random, bo, bocr, pso, knapsack   the searcher, BN-recalibrated proxy
  knapsack-r4                                 knapsack pruned in 4 rounds while training (HALP)
  knapsack-e1                                 the knapsack's own plan only (1 evaluation, no neighbours)
  knapsack-steps30                            knapsack, each neighbour trained 30 distilled steps before scoring
  darts                                       differentiable widths (the table's expected latency as a loss)
  bocr-steps30                                bocr, each candidate trained 30 distilled steps before scoring
  bocr-supernet                               bocr scored by the SP width supernet (trained once)
  bocr-flops                                  bocr constrained by MACs (the FLOPs baseline), same measured check
  bo-warm, bocr-warm, pso-warm                the searcher started from the knapsack's plans (--warm-start)

Printed per budget and method: the chosen plan's proxy score (mean, min-max over seeds), the
evaluations to 99 % of the run's best, the measured ms and whether every seed met the budget,
the search's wall time, and after the finetune the held-out and test accuracy with the gap to
uniform (mean +- one standard error over seeds, paired). Rules are decided on the held-out split;
the test split is reported, never used to choose. The last table is markdown for bench/README.md.
Runs are kept under runs/bench-search/ and reused when the script runs again (delete to redo).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from edgeprune.pipeline import finetune_run
from edgeprune.pipeline import prune_run as prune

METHODS = {
    "uniform": {"search": "uniform"},
    "random": {"search": "random"},
    "bo": {"search": "bo"},
    "bocr": {"search": "bocr"},
    "pso": {"search": "pso"},
    "knapsack": {"search": "knapsack"},
    "knapsack-r4": {"search": "knapsack", "knapsack_rounds": 4},
    "knapsack-e1": {"search": "knapsack", "evals": 1},
    "knapsack-steps30": {"search": "knapsack", "proxy_steps": 30},
    "darts": {"search": "darts"},
    "bocr-steps30": {"search": "bocr", "proxy_steps": 30},
    "bocr-supernet": {"search": "bocr", "proxy": "supernet"},
    "bocr-flops": {"search": "bocr", "cost": "flops"},
    "bo-warm": {"search": "bo", "warm_start": "knapsack"},
    "bocr-warm": {"search": "bocr", "warm_start": "knapsack"},
    "pso-warm": {"search": "pso", "warm_start": "knapsack"},
}
DEFAULT = ["uniform", "bocr", "knapsack", "knapsack-r4", "darts", "bocr-flops"]


def run_one(args, method: str, budget: str, seed: int) -> dict:
    tag = Path(args.weights.removeprefix("zoo:")).stem
    out = Path(args.runs) / f"{tag}-{budget.rstrip('%')}-{method}-s{seed}{'-depth' * args.depth}"
    results = out / "results.json"
    if not results.is_file():
        settings = {
            "weights": args.weights,
            "device": args.device,
            "budget": budget,
            "evals": args.evals,
            "seed": seed,
            "margin": args.margin,
            "depth": args.depth,
            **({"table": args.table} if args.table else {}),
            **METHODS[method],  # a method's own settings (its evaluations too) win
        }
        t0 = time.monotonic()
        res = prune(out, resume=(out / "config.json").is_file(), progress=False, log=lambda s: None, **settings)
        res["wall_s"] = time.monotonic() - t0
        (out / "results.json").write_text(json.dumps(res, indent=2))
    res = json.loads(results.read_text())
    if args.finetune_epochs:
        res["finetune"] = finetune_run(
            out,
            epochs=args.finetune_epochs,
            lr=args.lr,
            seed=seed,
            max_batches=args.finetune_batches,
            device=args.train_device,
            progress=False,
            log=lambda s: None,
        )
    return res


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def scores_of(run_dir: str) -> list[float]:
    with sqlite3.connect(Path(run_dir) / "evals.sqlite") as db:
        return [r[0] for r in db.execute("SELECT score FROM evals WHERE duplicate = 0 ORDER BY i")]


def search_row(method: str, rs: list[dict]) -> str:
    acc = np.array([r["chosen"]["proxy_accuracy"] for r in rs]) * 100
    return (
        f"{method:<15}{acc.mean():>9.2f} ({acc.min():.2f}-{acc.max():.2f})"
        f"{np.mean([r['evals_to_99pct'] for r in rs]):>8.1f}"
        f"{np.mean([r['chosen']['measured_ms'] for r in rs]):>10.4f}"
        f"{np.mean([r['budget_ms'] for r in rs]):>10.4f}"
        f"{sum(r['met_budget'] for r in rs):>4}/{len(rs)}"
        f"{np.mean([r.get('wall_s', r['seconds']) for r in rs]):>8.0f}"
    )


def finetune_rows(budget: str, by_method: dict[str, list[dict]]) -> list[str]:
    """Held-out and test accuracy after the finetune, and the paired gap to uniform (mean +- se)."""
    base = by_method.get("uniform")
    lines = []
    for method, rs in by_method.items():
        held = [r["finetune"]["heldout_accuracy"] * 100 for r in rs]
        test = [r["finetune"]["test_accuracy"] * 100 for r in rs]
        gap = ""
        if base and method != "uniform":
            g = [t - b["finetune"]["test_accuracy"] * 100 for t, b in zip(test, base)]
            h = [t - b["finetune"]["heldout_accuracy"] * 100 for t, b in zip(held, base)]
            (gm, gs), (hm, hs) = mean_se(g), mean_se(h)
            gap = f" | {hm:+.2f} +- {hs:.2f} | {gm:+.2f} +- {gs:.2f} | {abs(gm) / gs if gs > 0 else float('inf'):.1f}"
        else:
            gap = " | | | "
        lines.append(
            f"| {budget} | {method} | {np.mean([r['chosen']['measured_ms'] for r in rs]):.4f} / "
            f"{np.mean([r['budget_ms'] for r in rs]):.4f} | {sum(r['met_budget'] for r in rs)}/{len(rs)} | "
            f"{np.mean(held):.2f} | {np.mean(test):.2f}{gap} |"
        )
    return lines


def reach_report(curves: dict[str, list[list[float]]], walls: dict[str, list[float]]) -> None:
    """Evaluations and wall time to reach 99 % of the best any method found (iterative searchers)."""
    best = max(max(c) for runs in curves.values() for c in runs if c)
    bar = 0.99 * best
    print(f"  evaluations (and wall s) to reach {bar:.2%} proxy, 99 % of the best found, per seed:")
    for name, runs in curves.items():
        cells = []
        for c, wall in zip(runs, walls[name]):
            i = next((i + 1 for i, v in enumerate(np.maximum.accumulate(c)) if v >= bar), None)
            cells.append("never" if i is None else f"{i} ({wall * i / max(len(c), 1):.0f} s)")
        print(f"    {name:<15}" + "  ".join(f"{x:>12}" for x in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="zoo:resnet20-fashion-mnist")
    ap.add_argument("--device", default="cpu-onnxruntime")
    ap.add_argument("--table", default=None, help="default latency_tables/DEVICE/MODEL.json")
    ap.add_argument("--budgets", nargs="+", default=["50%", "33%", "25%"])
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(METHODS))
    ap.add_argument(
        "--depth", action=argparse.BooleanOptionalAction, default=True, help="every method may remove blocks"
    )
    ap.add_argument("--runs", default="runs/bench-search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margin", type=float, default=0.02, help="safety margin of the measured check")
    ap.add_argument("--finetune-epochs", type=int, default=2, help="0: compare on the search proxy only")
    ap.add_argument("--finetune-batches", type=int, default=None, help="batches per finetune epoch (default: all)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--train-device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.weights} on {args.device}, budgets {' '.join(args.budgets)} of dense, {args.evals} evaluations, "
        f"seeds {args.seeds}, depth {'on' if args.depth else 'off'}, finetune {args.finetune_epochs} epochs"
        + (f" of {args.finetune_batches} batches" if args.finetune_batches else ""),
        flush=True,
    )
    table = []
    for budget in args.budgets:
        print(f"\n== budget {budget} of dense ==")
        print(
            f"{'method':<15}{'proxy % (min-max)':>24}{'to 99%':>8}{'meas. ms':>10}{'budget':>10}{'met':>6}{'wall s':>8}"
        )
        by_method, curves, walls = {}, {}, {}
        for method in args.methods:
            rs = [run_one(args, method, budget, seed) for seed in args.seeds]
            by_method[method] = rs
            curves[method] = [scores_of(r["run_dir"]) for r in rs]
            walls[method] = [r.get("wall_s", r["seconds"]) for r in rs]
            print(search_row(method, rs), flush=True)
        reach_report(curves, walls)
        if args.finetune_epochs:
            table += finetune_rows(budget, by_method)
    if table:
        print(
            f"\nafter {args.finetune_epochs} distilled finetune epochs"
            + (f" of {args.finetune_batches} batches" if args.finetune_batches else "")
            + f" (lr {args.lr}, the search seed's), accuracy in %; gap = method - uniform, paired by seed, "
            "mean +- standard error; z = |test gap| / se:\n"
        )
        print("| budget | method | measured / budget ms | met | held-out | test | held-out gap | test gap | z |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(table))


if __name__ == "__main__":
    main()
