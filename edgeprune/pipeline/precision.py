"""`precision="auto"`: prune at the device's own precision and in int8, keep the better plan.

INT8 is a lever beside pruning: where quantizing makes the model faster, an int8 plan keeps more
channels within the same budget, and may be the more accurate one despite what quantizing costs;
where it does not (a small model on a runtime whose int8 kernels pay more in Quantize and
Dequantize than they save), the fp32 plan wins. The device decides: each precision is a prune of
its own (its own table, its candidates measured as they will run, scored as they will run), in a
sub-folder `precision-device/` and `precision-int8/` of the run, and the run keeps the plan that
meets the budget with the higher proxy score, the held-out split's (the test split is never
used to choose). results.json's `precision_choice` reports both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.runs import RunDir, write_json

CHOICES = ("device", "int8")
# what a precision's prune may say instead of a plan: the budget is not reachable at it, or not needed
UNREACHED = ("out of reach", "nothing to prune")


def prune_each_precision(prune, call: dict, settings: dict):
    """`prune(**call, **settings)` at each precision of CHOICES (each into its own sub-folder of
    the run), then the better plan: (pruned model, PruneResult) with `precision_choice`."""
    run_dir, log = call.get("run_dir"), call.get("log", print)
    if call.get("table") is not None:
        raise EdgepruneError(
            "--precision auto finds each precision's latency table itself; name a table with --precision device or "
            "--precision int8"
        )
    outcomes: dict[str, object] = {}
    for precision in CHOICES:
        sub = None if run_dir is None else Path(run_dir) / f"precision-{precision}"
        resume = bool(call.get("resume")) and sub is not None and (sub / "config.json").is_file()
        log(f"precision auto: pruning at {'the device precision' if precision == 'device' else precision} ...")
        try:
            outcomes[precision] = prune(**{**call, "run_dir": sub, "resume": resume}, **settings, precision=precision)
        except EdgepruneError as e:
            if not any(why in str(e) for why in UNREACHED):
                raise
            log(f"precision auto: at {precision}, {e}")
            outcomes[precision] = e
    return _keep_better(outcomes, run_dir, log)


def _keep_better(outcomes: dict, run_dir, log):
    """The plan that meets the budget with the higher proxy score (where none does, the one that
    measured closest to it), copied to the run folder's top."""
    done = {p: o for p, o in outcomes.items() if not isinstance(o, Exception)}
    if not done:
        raise EdgepruneError(
            "neither precision reaches the budget: " + "; ".join(f"{p}: {e}" for p, e in outcomes.items())
        )
    met = {p: o for p, o in done.items() if o[1].met_budget}
    if met:
        winner = max(met, key=lambda p: (met[p][1].score, -met[p][1].measured_ms))
    else:
        winner = min(done, key=lambda p: done[p][1].measured_ms / done[p][1].budget_ms)
    choice = {"kept": winner, **{p: summary(o) for p, o in outcomes.items()}}
    pruned, result = done[winner]
    log(describe(choice))
    result.record["precision_choice"] = choice
    if run_dir is not None:
        result.record["run_dir"] = str(run_dir)
        result.run_dir = Path(run_dir)
        _keep_files(Path(run_dir), Path(run_dir) / f"precision-{winner}", result.record)
    return pruned, result


def summary(outcome) -> dict:
    """One precision's figures for `precision_choice` (or why it has none)."""
    if isinstance(outcome, Exception):
        return {"error": str(outcome)}
    r = outcome[1].record
    return {
        "precision": r["precision"]["searched"],
        "device": r["device"],
        "met_budget": r["met_budget"],
        "measured_ms": r["chosen"]["measured_ms"],
        "budget_ms": r["budget_ms"],
        "proxy_accuracy": r["chosen"]["proxy_accuracy"],
        "quantized_alone": r["precision"].get("quantized_alone", False),
        "run_dir": r.get("run_dir"),
    }


def describe(choice: dict) -> str:
    """One line per precision, and the one kept."""
    lines = []
    for p in CHOICES:
        s = choice.get(p, {})
        if "error" in s:
            lines.append(f"  {p}: no plan ({s['error'].split(';')[0]})")
            continue
        alone = " (quantized alone, nothing pruned)" if s["quantized_alone"] else ""
        lines.append(
            f"  {p} ({s['precision']}): {s['measured_ms']:.4g} ms against {s['budget_ms']:.4g} "
            f"({'meets' if s['met_budget'] else 'misses'} it), proxy {s['proxy_accuracy']:.4g}{alone}"
        )
    return "precision auto:\n" + "\n".join(lines) + f"\n  kept: {choice['kept']}"


def _keep_files(run_dir: Path, sub: Path, record: dict) -> None:
    """The kept precision's run files at the top of the run folder, where the next stages read them."""
    with RunDir(run_dir).writing():
        for f in sub.iterdir():
            if f.is_file() and f.name != "results.json" and not f.name.startswith("."):
                shutil.copy2(f, run_dir / f.name)
        record["files"] = {k: str(run_dir / Path(v).name) for k, v in record.get("files", {}).items()}
        write_json(run_dir / "results.json", record)
