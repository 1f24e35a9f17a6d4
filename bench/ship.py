"""The whole pipeline against uniform pruning, at the same measured latency budget, after the same finetune.

    python bench/ship.py                     # every stage here (search, finetune, export, validate)
    python bench/ship.py --stage search      # only the searches (they measure on the device)
    python bench/ship.py --stage finetune --train-device cuda   # finetune every run (e.g. on a GPU host)
    python bench/ship.py --stage report      # export + validate on the device, print the table
    python bench/ship.py --claim-only        # only the 3.87x claim check on mobilenet_v2 @ 224
    python bench/ship.py --rows resnet20:cpu-openvino:50%   # one row, every stage, no claim check

Rows (Fashion-MNIST, shipped checkpoints): resnet20 at 50 % and 33 % of its dense latency on
cpu-onnxruntime, at 50 % on cpu-openvino, resnet56 at 50 % on cpu-onnxruntime. For each row two
runs: ours (BOCR over per-group widths, latency table cost, measured check; each candidate scored
after 30 distilled training steps, `--proxy-steps`, which finetuned better than the BN-only proxy
in both rows it was tried on) and uniform (one keep ratio for every group, bisected to the
budget, the same measured check). The 33 % row is below
every width-only plan: there both runs may also remove whole residual blocks (`--depth`; uniform
removes the fewest that let a shared ratio fit, evenly across stages). Both are finetuned for
the same epochs (30 by default: at 15, the pruned resnet20s were still improving in their last
epochs) with the same distillation recipe, exported (ONNX, and OpenVINO IR for the OpenVINO
row), and validated on the device: measured latency (must meet the budget), test accuracy computed
by the runtime on the exported file.

Seeds: one finetune's seed moves a pruned resnet20 by a few tenths of a point. Where
bench/finetune_seeds.py has finetuned a row's runs over seeds (its --out, ship.py's --seeds-dir),
the row gets a second line: each seed's test accuracy, the means, and ours - uniform with one
standard error.

Claim check: PR-DARTS reports a pruned MobileNetV2 "3.87x faster". For mobilenet_v2 at 224x224
the structured plan whose *predicted* speedup is 3.87x (one keep ratio for every group) is
measured, beside a dense-layout model with the same number of nonzero weights (unstructured
magnitude sparsity), beside the claim.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROWS = [
    ("resnet20", "cpu-onnxruntime", "50%"),
    ("resnet20", "cpu-onnxruntime", "33%"),
    ("resnet20", "cpu-openvino", "50%"),
    ("resnet56", "cpu-onnxruntime", "50%"),
]
# rows whose budget lies below every width-only plan: ours and uniform may both remove residual
# blocks (resnet20 at 28x28 with every group at one 8-channel step still costs 41 % of dense)
DEPTH = {("resnet20", "cpu-onnxruntime", "33%")}


def rows(args) -> list[tuple[str, str, str]]:
    """ROWS, or those named by --rows (MODEL:DEVICE:BUDGET), in ROWS' order."""
    if not args.rows:
        return ROWS
    wanted = {tuple(r.split(":")) for r in args.rows}
    unknown = wanted - set(ROWS)
    if unknown:
        known = ", ".join(":".join(r) for r in ROWS)
        raise SystemExit(f"--rows: unknown row(s) {sorted(':'.join(r) for r in unknown)}; rows are {known}")
    return [r for r in ROWS if r in wanted]


def run_dir(args, model: str, device: str, budget: str, search: str) -> Path:
    return Path(args.runs) / f"{model}-{device}-{budget.rstrip('%')}-{search}"


def stage_search(args) -> None:
    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import prune_run as prune

    for model, device, budget in rows(args):
        for search in ("bocr", "uniform"):
            out = run_dir(args, model, device, budget, search)
            if (out / "results.json").is_file() or (out / "infeasible.txt").is_file():
                continue
            t0 = time.monotonic()
            try:
                r = prune(
                    out,
                    resume=(out / "config.json").is_file(),
                    progress=False,
                    log=lambda s: None,
                    weights=f"zoo:{model}-fashion-mnist",
                    device=device,
                    budget=budget,
                    search=search,
                    depth=(model, device, budget) in DEPTH,
                    evals=args.evals,
                    seed=args.seed,
                    proxy_steps=args.proxy_steps if search == "bocr" else 0,  # uniform scores nothing
                )
            except EdgepruneError as e:  # e.g. a budget below the smallest plan the device can run
                (out / "infeasible.txt").write_text(str(e) + "\n")
                print(f"{out.name}: infeasible: {e}", flush=True)
                continue
            print(
                f"searched {out.name}: proxy {r['chosen']['proxy_accuracy']:.2%}, measured "
                f"{r['chosen']['measured_ms']:.4f} / {r['budget_ms']:.4f} ms ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )


def stage_finetune(args) -> None:
    """Finetune every run; with --jobs N, N at a time in separate processes (a GPU host has room)."""
    import subprocess
    import sys

    from edgeprune.pipeline import finetune_run as finetune

    runs = [run_dir(args, *row, search) for row in rows(args) for search in ("bocr", "uniform")]
    runs = [r for r in runs if (not args.only or r.name in args.only) and (r / "pruned.pt").is_file()]
    if args.jobs > 1:
        common = ["--stage", "finetune", "--epochs", str(args.epochs), "--lr", str(args.lr)]
        common += ["--train-device", args.train_device, "--runs", args.runs, "--jobs", "1"]
        common += ["--rows", *args.rows] if args.rows else []
        procs = []
        for r in runs:
            while len([p for p in procs if p.poll() is None]) >= args.jobs:
                time.sleep(1)
            log = open(r / "finetune.log", "w")  # noqa: SIM115 - the child process owns it
            cmd = [sys.executable, __file__, *common, "--only", r.name]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        failed = [r.name for r, p in zip(runs, procs) if p.wait() != 0]
        if failed:
            raise SystemExit(f"finetune failed for {failed}; see their finetune.log")
        return
    for out in runs:
        r = finetune(out, epochs=args.epochs, lr=args.lr, device=args.train_device, progress=False, log=print)
        print(f"finetuned {out.name}: test {r['test_accuracy']:.2%} ({r['seconds']:.0f} s)", flush=True)


def stage_report(args) -> None:
    from edgeprune.pipeline import export_run
    from edgeprune.pipeline import validate_run as validate

    header = (
        f"{'model':<9}{'device':<16}{'budget':>7}{'budget ms':>10} | {'ours ms':>8}{'ours acc':>9} | "
        f"{'unif ms':>8}{'unif acc':>9} | {'dense acc':>9}{'ours drop':>10}{'ours - unif':>12}{'met':>5}"
        f"{'finetune':>17}"
    )
    print(header)
    print("-" * len(header))
    for model, device, budget in rows(args):
        cells = {}
        infeasible = run_dir(args, model, device, budget, "bocr") / "infeasible.txt"
        if infeasible.is_file():
            print(f"{model:<9}{device:<16}{budget:>7}  infeasible: {infeasible.read_text().strip()}")
            continue
        for search in ("bocr", "uniform"):
            out = run_dir(args, model, device, budget, search)
            if not (out / "validation.json").is_file():
                fmts = "onnx,openvino" if "openvino" in device else "onnx"
                export_run(out, formats=fmts, out=Path(args.runs) / "export" / out.name, log=lambda s: None)
                validate(out, repeats=args.repeats, log=lambda s: None)
            cells[search] = json.loads((out / "validation.json").read_text())
        ours, uni = cells["bocr"], cells["uniform"]
        dense = ours["dense_test_accuracy"]
        met = ours["meets_budget"] and uni["meets_budget"]
        fines = [_finetune(run_dir(args, model, device, budget, search)) for search in ("bocr", "uniform")]
        if len({_recipe(f) for f in fines}) > 1:
            raise SystemExit(
                f"{model} {device} {budget}: ours and uniform were finetuned differently: {[_recipe(f) for f in fines]}"
            )
        print(
            f"{model:<9}{device:<16}{budget:>7}{ours['budget_ms']:>10.4f} | "
            f"{ours['measured']['median_ms']:>8.4f}{ours['test_accuracy'] * 100:>8.2f}% | "
            f"{uni['measured']['median_ms']:>8.4f}{uni['test_accuracy'] * 100:>8.2f}% | "
            f"{dense * 100:>8.2f}%{(dense - ours['test_accuracy']) * 100:>9.2f}p"
            f"{(ours['test_accuracy'] - uni['test_accuracy']) * 100:>+11.2f}p{'yes' if met else 'NO':>5}"
            f"{_label(fines):>17}",
            flush=True,
        )
        line = _seeds_line(args, model, device, budget)
        if line:
            print(f"{'':<32}  {line}")
        if (model, device, budget) in DEPTH:
            removed = {
                search: json.loads((run_dir(args, model, device, budget, search) / "results.json").read_text())[
                    "chosen"
                ].get("removed_blocks", [])
                for search in ("bocr", "uniform")
            }
            print(
                f"{'':<32}  --depth: ours removed {len(removed['bocr'])} blocks ({', '.join(removed['bocr'])}), "
                f"uniform {len(removed['uniform'])} ({', '.join(removed['uniform'])})"
            )
    fine = json.loads((run_dir(args, *rows(args)[0], "bocr") / "finetune.json").read_text())
    print(
        f"finetune (epochs on the device named in the row, the same for ours and uniform): lr {fine['recipe']['lr']}, "
        f"distillation T={fine['distillation']['temperature']} alpha={fine['distillation']['alpha']}; "
        "accuracy = test split, computed by the runtime on the exported file"
    )


def _finetune(out: Path) -> dict:
    return json.loads((out / "finetune.json").read_text())


def _recipe(fine: dict) -> str:
    """What must match for ours and uniform to be compared: the schedule and the distillation, not
    the seed nor the device that ran it (a finetune resumed on another device is the same recipe)."""
    recipe = {k: v for k, v in fine["recipe"].items() if k != "seed"}
    return json.dumps({**recipe, "distillation": fine["distillation"]}, sort_keys=True)


def _label(fines: list[dict]) -> str:
    return f"{fines[0]['epochs']} ep {'/'.join(sorted({f['device'] for f in fines}))}"


def _seeds_line(args, model: str, device: str, budget: str) -> str | None:
    """The row's finetune repeated over seeds (bench/finetune_seeds.py's copies in --seeds-dir):
    the test accuracy of ours and uniform per seed, their means and the gap, where both have two or
    more seeds. One finetune's seed moves a pruned resnet20 by a few tenths of a point, as much as
    the gaps between plans: the means are what a row's verdict rests on."""
    accs, recipes = {}, set()
    for search in ("bocr", "uniform"):
        run = run_dir(args, model, device, budget, search)
        copies = sorted(Path(args.seeds_dir).glob(f"{run.name}-s[0-9]*"))
        fines = [_finetune(d) for d in copies if (d / "finetune.json").is_file()]
        accs[search] = [f["test_accuracy"] * 100 for f in fines]
        recipes |= {_recipe(f) for f in fines} | {_recipe(_finetune(run))}
    if min(len(a) for a in accs.values()) < 2:
        return None
    if len(recipes) > 1:
        return f"seeds in {args.seeds_dir}: not the row's finetune recipe ({sorted(recipes)}); left out"
    mean = {k: statistics.mean(a) for k, a in accs.items()}
    sd = {k: statistics.stdev(a) for k, a in accs.items()}
    cells = {k: " ".join(f"{a:.2f}" for a in accs[k]) for k in accs}
    se = (sum(sd[k] ** 2 / len(accs[k]) for k in accs)) ** 0.5  # of the gap between the two means
    return (
        f"seeds (PyTorch test accuracy): ours {cells['bocr']}, mean {mean['bocr']:.2f} sd {sd['bocr']:.2f}; "
        f"uniform {cells['uniform']}, mean {mean['uniform']:.2f} sd {sd['uniform']:.2f}; "
        f"ours - uniform {mean['bocr'] - mean['uniform']:+.2f}p ± {se:.2f} (one standard error)"
    )


def claim_check(args) -> None:
    from edgeprune.devices import Device
    from edgeprune.formats import export_onnx
    from edgeprune.latency.check import predictor_for
    from edgeprune.latency.interleave import measure_interleaved, noisy_rounds
    from edgeprune.latency.table import LatencyTable
    from edgeprune.pruning.sparse import magnitude_sparsify, weight_count
    from edgeprune.resolve import resolve

    claim = 3.87
    device = Device.load(args.claim_device)
    r = resolve("mobilenet_v2", load_data=False)
    net, model_id, shape = r.model, r.id, r.shape
    table = LatencyTable.load(f"latency_tables/{device.name}/{model_id}.json")
    s, predictor = predictor_for(net, shape, table)
    dense_pred = predictor.predict()
    lo, hi = 0.0, 1.0
    for _ in range(30):  # the uniform keep ratio whose predicted speedup is the claim
        mid = (lo + hi) / 2
        if dense_pred / predictor.predict(s.counts_from_ratios(mid)) >= claim:
            lo = mid
        else:
            hi = mid
    counts = s.counts_from_ratios(lo)
    structured = s.plan(counts).apply(net)
    sparse = magnitude_sparsify(net, keep=weight_count(structured))
    names = ("dense", "structured", "sparse")
    with tempfile.TemporaryDirectory() as d:  # in turn, short windows, each its quietest: see interleave.py
        paths = [export_onnx(m, shape, Path(d) / f"{n}.onnx") for n, m in zip(names, (net, structured, sparse))]
        measured = measure_interleaved(device, [(p, shape) for p in paths], repeats=args.repeats)
    ms = {n: m.median_ms for n, m in zip(names, measured)}
    rounds = {n: noisy_rounds(m.extra["rounds_ms"]) or "steady" for n, m in zip(names, measured)}
    print(f"\nmobilenet_v2 @ {shape[2]}x{shape[3]} on {device.name} (claim: PR-DARTS, {claim}x faster)")
    print(f"{'model':<34}{'weights':>12}{'measured ms':>13}{'speedup':>9}   rounds")
    print(f"{'dense':<34}{weight_count(net):>12,}{ms['dense']:>13.3f}{1:>8.2f}x   {rounds['dense']}")
    predicted = dense_pred / predictor.predict(counts)
    label = f"structured, predicted {predicted:.2f}x"
    print(
        f"{label:<34}{weight_count(structured):>12,}{ms['structured']:>13.3f}{ms['dense'] / ms['structured']:>8.2f}x"
        f"   {rounds['structured']}"
    )
    label = f"unstructured, {1 - weight_count(structured) / weight_count(net):.0%} zeros"
    print(
        f"{label:<34}{weight_count(sparse, nonzero=True):>12,}{ms['sparse']:>13.3f}{ms['dense'] / ms['sparse']:>8.2f}x"
        f"   {rounds['sparse']}"
    )
    print(f"{'claimed':<34}{'':>12}{ms['dense'] / claim:>13.3f}{claim:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["all", "search", "finetune", "report"], default="all")
    ap.add_argument("--claim-only", action="store_true")
    ap.add_argument("--claim-device", default="cpu-onnxruntime")
    ap.add_argument("--evals", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=30, help="finetune epochs, the same for ours and uniform")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--proxy-steps", type=int, default=30, help="ours: distilled steps per candidate before scoring (prune's)"
    )
    ap.add_argument("--train-device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="finetunes run at once (separate processes)")
    ap.add_argument("--only", nargs="*", help="run names to finetune (default: all)")
    ap.add_argument("--rows", nargs="*", help="rows to run as MODEL:DEVICE:BUDGET, e.g. resnet20:cpu-openvino:50%%")
    ap.add_argument("--runs", default="runs/bench-ship")
    ap.add_argument(
        "--seeds-dir", default="runs/bench-seeds", help="bench/finetune_seeds.py's copies of the runs, one per seed"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--repeats", type=int, default=None, help="rounds of measuring compared models in turn (default: validate's)"
    )
    args = ap.parse_args()
    rows(args)  # an unknown row fails here, before any stage runs
    torch.set_num_threads(args.threads)
    np.set_printoptions(precision=4)
    if not args.claim_only:
        if args.stage in ("all", "search"):
            stage_search(args)
        if args.stage in ("all", "finetune"):
            stage_finetune(args)
        if args.stage in ("all", "report"):
            stage_report(args)
    if args.claim_only or (args.stage in ("all", "report") and not args.rows):  # --rows: only those rows
        claim_check(args)


if __name__ == "__main__":
    main()
