"""INT8 under a budget: quantized alone, pruned fp32, pruned + int8, side by side (bench/int8.py's rows).

    python bench/int8_budgets.py [--budgets 50% 25%] [--models resnet20 mobilenet_v2_cifar]
                                 [--evals 30] [--epochs 2] [--batches 150] [--runs runs/bench-int8]

For each Fashion-MNIST zoo model, runtime (ONNX Runtime, OpenVINO; the fp32 device profiles) and
budget (a share of the dense fp32 model), three ways to meet it:

- (a) int8 only: the dense model quantized (the export's int8 file, calibrated on 256 training images);
- (b) pruned fp32: `prune` (`--search`, default knapsack) on the fp32 device, finetuned, exported;
- (c) pruned + int8: `prune --precision int8` on the same device (the int8 table; candidates timed
  and scored as int8 files), finetuned, exported with its int8 file. Where quantizing alone meets
  the budget, its plan is the dense model and no finetune runs.

(b) and (c) get the same search (evaluations, seed, and depth pruning too under --depth-below)
and the same finetune recipe (distilled, `--epochs` x `--batches`). Every file of a (model,
runtime) is then measured in one interleaved run beside the dense fp32 model (1 thread). A row
meets its budget as `validate` decides it: the device's verdict statistic (the median of its
steady runs) within the share of the dense model's, measured there; rows the files' quietest
rounds would decide otherwise are listed under the table. Accuracy is the test split's, computed
by the runtime on the file (export's parity pass). The runs are kept under --runs: a second
invocation resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RUNTIMES = {"onnxruntime": ("cpu-onnxruntime", "onnx"), "openvino": ("cpu-openvino", "openvino")}


def run_row(args, model: str, runtime: str, budget: str, variant: str) -> dict:
    """One pruned row, (b) variant 'fp32' or (c) 'int8': pruned, finetuned and exported (resumed
    where done); {'file', 'accuracy', 'proxy', 'alone'} or {'error'}."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import export_run, finetune_run, prune_run

    device, fmt = RUNTIMES[runtime]
    tag = "" if args.search == "bocr" else f"-{args.search}"  # bocr's rows keep their first folders
    out = Path(args.runs) / f"{model}-{runtime}-{budget.rstrip('%')}-{variant}{tag}"
    if (out / "infeasible.txt").is_file():
        return {"error": (out / "infeasible.txt").read_text().strip()}
    t0 = time.monotonic()
    if not (out / "results.json").is_file():
        try:
            prune_run(out, resume=(out / "config.json").is_file(), progress=False, log=lambda s: None,
                      weights=f"zoo:{model}-fashion-mnist", device=device, budget=budget, search=args.search,
                      evals=args.evals, seed=0, precision="int8" if variant == "int8" else "device",
                      depth=float(budget.rstrip("%")) < args.depth_below)  # fmt: skip
        except EdgepruneError as e:  # a budget the device cannot reach at this precision
            out.mkdir(parents=True, exist_ok=True)
            (out / "infeasible.txt").write_text(str(e) + "\n")
            return {"error": str(e)}
    results = json.loads((out / "results.json").read_text())
    alone = results["precision"].get("quantized_alone", False)
    if not alone and not (out / "finetune.json").is_file():
        finetune_run(out, epochs=args.epochs, max_batches=args.batches, progress=False, log=lambda s: None)
    export = out / "export"
    if not (export / "manifest.json").is_file():
        export_run(out, formats=fmt, out=export, accuracy_images=args.images, log=lambda s: None)
    manifest = json.loads((export / "manifest.json").read_text())
    shipped = f"{fmt}-int8" if variant == "int8" else fmt
    print(f"{out.name}: ready ({time.monotonic() - t0:.0f} s)", flush=True)
    return {
        "file": manifest["formats"][shipped]["path"],
        "accuracy": manifest["formats"][shipped]["parity"].get("test_accuracy"),
        "proxy": results["chosen"]["proxy_accuracy"],
        "alone": alone,
        "search_ms": results["chosen"]["measured_ms"],
    }


def dense_files(model: str, out: Path, images: int) -> dict:
    """The dense model's fp32 and int8 files (ONNX and OpenVINO IR) with their runtime accuracy."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.data import load_dataset
    from edgeprune.formats import export_model
    from edgeprune.task import Task
    from edgeprune.zoo import resolve_weights

    if (out / "artifacts.json").is_file():
        return json.loads((out / "artifacts.json").read_text())
    net = load_checkpoint(resolve_weights(f"zoo:{model}-fashion-mnist")).build().eval()
    task = Task.classification_on(load_dataset("fashion-mnist"))
    art = export_model(net, input_shape=(1, 1, 28, 28), out_dir=out, task=task, accuracy_images=images,
                       formats=["onnx", "onnx-int8", "openvino", "openvino-int8"], log=lambda s: None)  # fmt: skip
    art = {f: {"path": str(a["path"]), "accuracy": a.get("parity", {}).get("test_accuracy")} for f, a in art.items()}
    (out / "artifacts.json").write_text(json.dumps(art))
    return art


def table_for(args, model: str, runtime: str) -> list[str]:
    """Every row of (model, runtime): the files measured in one interleaved run, then printed."""
    from edgeprune.devices import Device
    from edgeprune.latency.interleave import measure_interleaved
    from edgeprune.search.measured import held_figure

    device, fmt = RUNTIMES[runtime]
    dense = dense_files(model, Path(args.runs) / f"{model}-dense", args.images)
    rows = {(b, v): run_row(args, model, runtime, b, v) for b in args.budgets for v in ("fp32", "int8")}
    files = [dense[fmt]["path"], dense[f"{fmt}-int8"]["path"]] + [r["file"] for r in rows.values() if "file" in r]
    dev = Device.load(device)
    measured = measure_interleaved(dev, [(f, (1, 1, 28, 28)) for f in files])
    # met as `validate` decides it: the device's verdict statistic, a share of the dense model's
    held = {f: held_figure(m.to_dict(), dev.spec.verdict_statistic) for f, m in zip(files, measured)}
    quiet = {f: m.median_ms for f, m in zip(files, measured)}  # each file's quietest round, the ratios' figure
    lines, notes = [], []
    for b in args.budgets:
        share = float(b.rstrip("%")) / 100
        budget, quiet_budget = share * held[dense[fmt]["path"]], share * quiet[dense[fmt]["path"]]
        a = {"file": dense[f"{fmt}-int8"]["path"], "accuracy": dense[f"{fmt}-int8"]["accuracy"]}
        cells = [{**r, "ms": held[r["file"]]} if "file" in r else r for r in (a, rows[b, "fp32"], rows[b, "int8"])]
        lines.append(f"{model:19} {runtime:11} {b:>4} {held[dense[fmt]['path']]:8.4f} {budget:8.4f} | "
                     f"{' | '.join(_cell(c, budget) for c in cells)} | {_gap(cells[1], cells[2])}")  # fmt: skip
        print(lines[-1], flush=True)
        for name, c in zip(("(a)", "(b)", "(c)"), cells):
            q = quiet.get(c.get("file"))
            if q is not None and _met(c["ms"], budget) != (met := _met(q, quiet_budget)):
                notes.append(f"  {b} {name}: quietest rounds {q:.4f} against {quiet_budget:.4f} ms: {met}")
    return lines + ([f"{model} {runtime}, where the quietest rounds decide otherwise:", *notes] if notes else [])


def _met(ms: float, budget: float) -> str:
    return "yes" if ms <= budget else "NO"


def _cell(row: dict, budget: float) -> str:
    if "error" in row:
        why = "out of reach" if "out of reach" in row["error"] else row["error"][:24]
        return f"{why:^28}"
    acc = f"{row['accuracy']:.2%}" if row.get("accuracy") is not None else "-"
    mark = _met(row["ms"], budget)
    alone = "*" if row.get("alone") else " "
    return f"{row['ms']:8.4f} {acc:>8} {mark:>4}{alone}    "


def _gap(b: dict, c: dict) -> str:
    if "accuracy" not in b or "accuracy" not in c or None in (b["accuracy"], c["accuracy"]):
        return "   -"
    return f"{(c['accuracy'] - b['accuracy']) * 100:+.2f}"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--budgets", nargs="*", default=["50%", "25%"], help="shares of dense fp32 (none: skip these rows)")
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenet_v2_cifar"])
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    ap.add_argument("--evals", type=int, default=30, help="plans each search scores")
    ap.add_argument("--search", default="knapsack", help="searcher of (b) and (c) alike (prune's default)")
    ap.add_argument("--epochs", type=int, default=2, help="finetune epochs (distilled), every pruned row alike")
    ap.add_argument("--batches", type=int, default=150, help="finetune batches per epoch")
    ap.add_argument("--runs", default="runs/bench-int8", help="where the runs are kept (a second invocation resumes)")
    ap.add_argument(
        "--depth-below",
        type=float,
        default=30,
        help="budgets under this share (%%) also remove whole residual blocks, (b) and (c) alike: at step 16 "
        "resnet20's 16-channel stage cannot narrow, and width alone stops near 30 %% of dense",
    )


def budget_table(args) -> str:
    """Every (model, runtime, budget) row, with its header."""
    head = (f"{'model':19} {'runtime':11} {'bud':>4} {'fp32 ms':>8} {'budget':>8} | {'(a) int8 only':^28} | "
            f"{'(b) pruned fp32':^28} | {'(c) pruned + int8':^28} | c - b")  # fmt: skip
    cell = f"{'ms':>8} {'acc':>8} {'met':>4}     "
    sub = f"{'':{head.index('|')}}| {cell} | {cell} | {cell} | points"
    lines = [line for m in args.models for r in args.runtimes for line in table_for(args, m, r)]
    foot = "* quantized alone meets the budget: the dense model's plan, nothing pruned or finetuned"
    return f"{head}\n{sub}\n{'-' * len(head)}\n" + "\n".join(lines) + f"\n{foot}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--images", type=int, default=2000, help="test images each runtime scores")
    print("\n" + budget_table(ap.parse_args()))


if __name__ == "__main__":
    main()
