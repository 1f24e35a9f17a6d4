"""Accuracy proxies against finetuned accuracy: which one ranks plans as a finetune does.

    python bench/proxy_rank.py [--weights zoo:resnet20-fashion-mnist] [--device cpu-onnxruntime]
                               [--budgets 50% 40% 33%] [--plans 4] [--epochs 2] [--seed 0]
                               [--proxy-steps 30] [--supernet-steps 300] [--out runs/bench-proxy]

Plans: `--plans` random plans per budget (a share of the dense model's latency predicted by this
machine's table of the device profile, as prune picks it): uniform points of the search cube,
each repaired to the budget (`BudgetProblem.repair`, what every searcher's candidate goes
through). A budget under the smallest plan the table predicts is skipped with a line.

Proxies, each on the same 2,000 held-out images the search scores (never the test split): BN
recalibration (`ProxyEvaluator`), `--proxy-steps` distilled steps then BN recalibration
(`ProxyEvaluator(train_steps=...)`), and the supernet (`SupernetEvaluator`: trained once, then
each plan sliced from it and BN recalibrated). Then every plan is pruned from the dense model
(the same channels: criterion l2 on the dense weights), BN recalibrated, and finetuned with one
fixed recipe (`edgeprune.pipeline.finetune.finetune`: distilled from the dense model, `--epochs`,
lr `--lr`, seed 0), keeping the best epoch by accuracy on the whole held-out split (5,000
images); its test accuracy is reported, never used.

Per proxy: Spearman's rank correlation with the finetuned held-out accuracy over all plans, and
its mean within a budget (where plans are close and a search must tell them apart), the same
against test accuracy, the proxy's seconds per plan and its one-off cost (the supernet's
training). Every result is kept in OUT/results.json (and the supernet in OUT/supernet.pt) as it
is computed: a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

PROXIES = ("bn", "steps", "supernet")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="zoo:resnet20-fashion-mnist")
    ap.add_argument("--device", default="cpu-onnxruntime")
    ap.add_argument("--table", default=None, help="default: this machine's table of the device profile")
    ap.add_argument("--budgets", nargs="+", default=["50%", "40%", "33%"], help="shares of dense predicted latency")
    ap.add_argument("--plans", type=int, default=4, help="random plans per budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--criterion", default="l2")
    ap.add_argument("--proxy-steps", type=int, default=30)
    ap.add_argument("--supernet-steps", type=int, default=300)
    ap.add_argument("--supernet-lr", type=float, default=0.05)
    ap.add_argument("--widths-per-step", type=int, default=2)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="finetune epochs, the same for every plan")
    ap.add_argument("--lr", type=float, default=0.05, help="finetune learning rate")
    ap.add_argument("--max-batches", type=int, default=None, help="finetune batches per epoch (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-proxy"))
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


class Results:
    """OUT/results.json: the setup, the plans, and every score as it is computed."""

    def __init__(self, path: Path, setup: dict) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"setup": setup}
        if self.data["setup"] != setup:
            raise SystemExit(f"{path} holds another setup ({self.data['setup']}); use another --out or delete it")

    def get(self, *keys: str):
        d = self.data
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def set(self, *keys: str, value) -> None:
        from edgeprune.runs import write_json

        d = self.data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        write_json(self.path, self.data)


def load_setup(args) -> dict:
    """The dense model, its data and task, its space at the table's step, the table's cost."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.data import load_dataset
    from edgeprune.devices import Device
    from edgeprune.latency.layers import ModelLayers
    from edgeprune.latency.predictor import Predictor
    from edgeprune.latency.table import LatencyTable, find_table
    from edgeprune.pruning import space
    from edgeprune.search import LatencyCost
    from edgeprune.task import Task
    from edgeprune.zoo import resolve_weights

    ckpt = load_checkpoint(resolve_weights(args.weights))
    model = ckpt.build().eval()
    data = load_dataset(ckpt.dataset)
    path = find_table(Device.load(args.device), ckpt.ref.id, args.table, log=print)
    table = LatencyTable.load(path)
    s = space(model, torch.randn(1, *ckpt.input_shape), step=table.step)
    cost = LatencyCost(Predictor(ModelLayers.from_model(s), table).compiled())
    dense_ms = float(cost(np.asarray([s.full_counts()]))[0])
    task = Task.classification_on(data)  # the search's proxy task: 2,000 held-out images
    return {"model": model, "data": data, "space": s, "cost": cost, "dense_ms": dense_ms, "task": task, "table": path}


def draw_plans(args, setup: dict) -> list[dict]:
    """`--plans` random plans per budget, each repaired to it (a budget out of reach: skipped)."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.search import BudgetProblem
    from edgeprune.search.budget import Budget

    s, cost, dense_ms = setup["space"], setup["cost"], setup["dense_ms"]
    rng = np.random.default_rng(args.seed)
    plans, seen = [], set()
    for text in args.budgets:
        budget_ms = Budget.parse(text).ms(dense_ms)
        try:
            problem = BudgetProblem.create(s, cost, budget_ms)
        except EdgepruneError as e:
            print(f"budget {text} ({budget_ms:.4f} ms): skipped: {e}", flush=True)
            continue
        drawn = 0
        for _ in range(50 * args.plans):  # repaired points may coincide near the smallest plan
            counts = [int(c) for c in problem.repair(rng.random((1, problem.dim))).counts[0]]
            if tuple(counts) not in seen:
                seen.add(tuple(counts))
                ms = float(cost(np.asarray([counts]))[0])
                plans.append({"budget": text, "counts": counts, "predicted_ms": ms, "share": ms / dense_ms})
                drawn += 1
            if drawn == args.plans:
                break
    return plans


def score_proxies(args, setup: dict, plans: list[dict], results: Results) -> None:
    """Every proxy's score of every plan (those not in the results yet), and its seconds."""
    from edgeprune.search import ProxyEvaluator

    s, task = setup["space"], setup["task"]
    common = {"criterion": args.criterion, "seed": args.seed}
    makers = {
        "bn": lambda: ProxyEvaluator(s, task, **common),
        "steps": lambda: ProxyEvaluator(s, task, train_steps=args.proxy_steps, **common),
        "supernet": lambda: make_supernet(args, s, task, common, results),
    }
    for name in PROXIES:
        todo = [p for p in plans if results.get("proxies", name, p["hash"]) is None]
        if not todo:
            continue
        evaluator = makers[name]()
        for p in todo:
            t0 = time.perf_counter()
            score = evaluator(p["counts"])
            seconds = time.perf_counter() - t0
            results.set("proxies", name, p["hash"], value={"score": score, "seconds": seconds})
            print(f"proxy {name:<9} {p['budget']:>4} {p['hash']}: {score:.4f} ({seconds:.1f} s)", flush=True)


def make_supernet(args, s, task, common: dict, results: Results):
    from edgeprune.search.supernet import SupernetEvaluator

    ev = SupernetEvaluator(
        s,
        task,
        supernet_steps=args.supernet_steps,
        supernet_lr=args.supernet_lr,
        widths_per_step=args.widths_per_step,
        stages=args.stages,
        state_path=args.out / "supernet.pt",
        progress=True,
        log=lambda line: print(line, flush=True),
        **common,
    )
    if ev.supernet_seconds > 0:  # trained now (a reload reports 0: the time of its training is kept here)
        results.set("supernet_seconds", value=ev.supernet_seconds)
    return ev


def finetune_plans(args, setup: dict, plans: list[dict], results: Results) -> None:
    """Each plan pruned from the dense model, BN recalibrated, finetuned with the one recipe."""
    from edgeprune.pipeline.finetune import finetune
    from edgeprune.training import recalibrate_bn_on

    s, task, model = setup["space"], setup["task"], setup["model"]
    recipe = f"e{args.epochs}-lr{args.lr}-b{args.max_batches or 'all'}"
    calibration = task.train.inputs(10, seed=args.seed, input_of=task.input_of)
    for i, p in enumerate(plans):
        if results.get("finetune", recipe, p["hash"]) is not None:
            continue
        t0 = time.perf_counter()
        student = s.plan(p["counts"], criterion=args.criterion).apply(model)
        recalibrate_bn_on(student, calibration)
        r = finetune(
            student,
            teacher=model,
            data=setup["data"],
            epochs=args.epochs,
            lr=args.lr,
            max_batches=args.max_batches,
            progress=False,
        )
        test = float(task.test_score(r.model))
        row = {"heldout": r.score, "test": test, "best_epoch": r.best_epoch, "history": r.history}
        results.set("finetune", recipe, p["hash"], value={**row, "seconds": time.perf_counter() - t0})
        print(
            f"finetuned {i + 1}/{len(plans)} {p['budget']:>4} {p['hash']}: held-out {r.score:.4f}, test {test:.4f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def report(args, setup: dict, plans: list[dict], results: Results) -> None:
    """The per-plan scores, then one row per proxy: rank correlations, seconds per plan, one-off cost."""
    recipe = f"e{args.epochs}-lr{args.lr}-b{args.max_batches or 'all'}"
    fine = results.get("finetune", recipe)
    prox = {name: results.get("proxies", name) for name in PROXIES}
    print(f"\n{args.weights} on {args.device} ({setup['table']}), dense {setup['dense_ms']:.4f} ms predicted")
    print(f"{'budget':>6}{'share':>7}{'plan':>18}{'bn':>8}{'steps':>8}{'supernet':>9}{'ft held-out':>12}{'ft test':>9}")
    for p in plans:
        h = p["hash"]
        print(
            f"{p['budget']:>6}{p['share']:>7.1%}{h:>18}"
            + "".join(f"{prox[n][h]['score']:>{8 if n != 'supernet' else 9}.4f}" for n in PROXIES)
            + f"{fine[h]['heldout']:>12.4f}{fine[h]['test']:>9.4f}"
        )
    held = [fine[p["hash"]]["heldout"] for p in plans]
    test = [fine[p["hash"]]["test"] for p in plans]
    budgets = sorted({p["budget"] for p in plans}, key=args.budgets.index)
    n = len(plans)
    print(
        f"\n{'proxy':<28}{f'rho held-out ({n})':>18}{'rho within budget':>19}{f'rho test ({n})':>14}"
        f"{'test within':>13}{'s / plan':>10}{'one-off s':>11}"
    )
    names = {
        "bn": "BN recalibration",
        "steps": f"{args.proxy_steps} distilled steps + BN",
        "supernet": f"supernet ({args.supernet_steps} steps) + BN",
    }
    for name in PROXIES:
        score = [prox[name][p["hash"]]["score"] for p in plans]
        within = _mean([_within(plans, score, held, b) for b in budgets])
        within_test = _mean([_within(plans, score, test, b) for b in budgets])
        once = results.get("supernet_seconds") if name == "supernet" else 0.0
        print(
            f"{names[name]:<28}{spearman(score, held):>18.3f}{within:>19.3f}{spearman(score, test):>14.3f}"
            f"{within_test:>13.3f}{np.mean([prox[name][p['hash']]['seconds'] for p in plans]):>10.1f}"
            f"{once or 0:>11.0f}"
        )
    print(
        f"finetune: {args.epochs} epoch(s) distilled, lr {args.lr}, best epoch by held-out (5,000 images); "
        f"{np.mean([fine[p['hash']]['seconds'] for p in plans]):.0f} s per plan; within budget: mean over "
        f"{', '.join(budgets)} of Spearman over each budget's {args.plans} plans"
    )


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _within(plans: list[dict], score: list[float], target: list[float], budget: str) -> float:
    idx = [i for i, p in enumerate(plans) if p["budget"] == budget]
    return spearman([score[i] for i in idx], [target[i] for i in idx])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    setup = load_setup(args)
    keys = ("weights", "device", "table", "budgets", "plans", "seed", "criterion", "proxy_steps")
    keys += ("supernet_steps", "supernet_lr", "widths_per_step", "stages")
    results = Results(args.out / "results.json", {k: getattr(args, k) for k in keys})
    plans = results.get("plans")
    if plans is None:
        plans = draw_plans(args, setup)
        for p in plans:
            p["hash"] = setup["space"].plan(p["counts"], criterion=args.criterion).hash()
        results.set("plans", value=plans)
    print(f"{len(plans)} plans over budgets {', '.join(args.budgets)}", flush=True)
    score_proxies(args, setup, plans, results)
    finetune_plans(args, setup, plans, results)
    report(args, setup, plans, results)
    print(f"wall {time.monotonic() - t0:.0f} s this run")


if __name__ == "__main__":
    main()
