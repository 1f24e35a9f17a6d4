"""Prune to a budget: search per-group widths under predicted latency (or FLOPs), then hold the
best candidates against the device.

1. the dense model is measured on the device (the budget may be a share of it);
2. a searcher proposes plans, each repaired to the budget, scored by the accuracy proxy and
   recorded in the run's SQLite store as it happens;
3. hardware in the loop: the top candidates are measured on the device; the chosen plan is the
   best whose *measured* latency meets the budget. If none does, the search budget is tightened
   by the observed prediction error and the search continues (`max_rounds` at most; a resume may grant more).
   If the chosen plan measures well under the target instead (a pessimistic table), the search
   budget is loosened once, by the same measured points, and the search continues: the budget is
   the user's to spend on accuracy, and a plan from the looser round is kept only if it measures in.
   A budget that is a share of dense is held as a ratio: the dense model is measured again beside
   each round's candidates, so a device that drifted since step 1 does not move the goal. Every
   measurement is in turn with the others, in short windows, each model keeping its quietest
   (edgeprune/latency/interleave.py), so a shared machine's slow phases do not decide it;
4. the chosen plan, its pruned checkpoint (BN recalibrated), plots and results.json are written.

A run killed at any point resumes with `resume=True` and loses no evaluation or measurement.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from edgeprune.errors import EdgepruneError, choices_error
from edgeprune.runs import RunStore, write_json

CONFIG = "config.json"


@dataclass
class PruneConfig:
    """Everything that decides a pruning run (stored as config.json in the run directory)."""

    weights: str
    device: str
    budget: str  # milliseconds ("2.5") or a share of the dense model's measured latency ("50%")
    data: str | None = None  # default: the data set the checkpoint was trained on
    table: str | None = None  # default: latency_tables/DEVICE/MODEL.json, or this setup's own (table.py)
    search: str = "bocr"
    evals: int = 60
    seed: int = 0
    cost: str = "latency"  # or "flops": the FLOPs-constrained baseline
    flops_target: float | None = None  # MACs share for cost=flops (default: budget / dense ms)
    criterion: str = "l2"  # which channels a group keeps
    clusters: int = 4  # bocr: groups clustered into this many shared ratios
    particles: int = 10  # pso: swarm size
    min_keep: float = 0.1
    depth: bool = False  # also remove whole residual blocks (below what width pruning alone reaches)
    max_keep: float = 1.0
    fix: list[str] = field(default_factory=list)  # group roots (glob) held at full width
    calibration_batches: int = 10
    heldout_images: int = 2000
    proxy_steps: int = 0  # distilled SGD steps per candidate before scoring (0: BN recalibration only)
    measure_top: int = 5  # candidates measured on the device per round
    max_rounds: int = 4  # search rounds after the first (budget tightenings, or the one loosening)
    anchor: bool = True  # scale predictions by the dense model's measured / predicted latency
    margin: float = 0.02  # the chosen plan must measure this share under the budget (run-to-run noise)
    loosen: float = 0.05  # a chosen plan this share under the target buys one round at a looser budget (0: never)
    data_root: str | None = None

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def parse_budget(text: str | float, dense_ms: float) -> float:
    """'2.5' -> 2.5 ms; '50%' -> half the dense model's measured latency."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 * dense_ms if s.endswith("%") else float(s.removesuffix("ms"))
    except ValueError:
        raise EdgepruneError(f"budget {text!r} is neither milliseconds (2.5) nor a share of dense (50%)") from None
    if value <= 0:
        raise EdgepruneError(f"budget must be positive, got {text!r}")
    return value


def _cost_at(target_ms: float, lower: tuple[float, float], upper: tuple[float, float]) -> float:
    """The cost at which the line through two measured (cost, ms) points reaches `target_ms` (the
    lower point's cost where the two do not rise)."""
    (x0, y0), (x1, y1) = lower, upper
    return x0 + (target_ms - y0) * (x1 - x0) / (y1 - y0) if y1 > y0 else x0


def _tightened(current: float, target_ms: float, points: list[tuple[float, float]], rounds: list) -> float:
    """The search budget (in cost units) at which plans should measure just under `target_ms`.

    `points` are (cost, measured ms) of the dense model, the smallest plan and every measured
    candidate; `rounds` the most favourable candidate (lowest measured/cost) of each round so far.
    Latency is monotone in cost but far from proportional (half the MACs can keep 75 % of the
    time), so two estimates bound the step: the latest round's candidate scaled by its own
    measured/cost ratio (gentle, right for a near miss) and the budget interpolated between the
    measured points that bracket it (bold, never extrapolating). From the second round on, a
    least-squares line through the rounds' candidates (with two rounds, their secant) picks a
    point between them; where noise tilts that line the wrong way, the midpoint is taken, since
    the gentle step has already fallen short once. Before that the gentle one wins. Always at
    least 1 % tighter than `current`."""
    pts = sorted(points)
    below = [p for p in pts if p[1] <= target_ms]
    above = [p for p in pts if p[1] > target_ms and (not below or p[0] > below[-1][0])]
    if not below:  # nothing measured fits yet: fall back on the ratio of the cheapest point
        x, y = pts[0]
        interpolated = x * target_ms / y
    else:
        interpolated = _cost_at(target_ms, below[-1], above[0] if above else below[-1])
    cost, measured = rounds[-1]
    scaled = cost * target_ms / measured
    lo, hi = sorted((interpolated, scaled))
    estimate = hi
    if len(rounds) >= 2:
        c, m = np.array(rounds, dtype=float).T
        slope = np.polyfit(c, m, 1)[0] if np.ptp(c) > 1e-12 else 0.0
        if slope > 0:
            estimate = float(np.clip(c.mean() + (target_ms - m.mean()) / slope, lo, hi))
        else:
            estimate = (lo + hi) / 2
    return min(estimate * 0.995, current * 0.99)


def _after_loosening(chosen, ok: list, stage: int, images: int, target_ms: float, log) -> tuple:
    """The plan to keep where an earlier round's plan outscores the looser round's (`ok`: the
    (evaluation, measurement) pairs within the target; `chosen`: the best scoring, from before).

    The looser round exists to spend the budget left over on accuracy. Where its best plan scores
    within the proxy's resolution of the earlier one, the proxy cannot tell them apart, and the
    earlier one is the best of many more evaluations (the luckiest as much as the best); the looser
    plan keeps more channels within the same budget, and is kept."""
    from edgeprune.search.proxy import resolution

    looser = [rm for rm in ok if rm[1]["round"] == stage]
    if not looser:
        log(
            f"the looser round's candidates measured over {target_ms:.4g} ms on the device; keeping the "
            f"round-{chosen[1]['round']} plan ({chosen[1]['measured_ms']:.4g} ms)"
        )
        return chosen
    best = max(looser, key=lambda rm: (rm[0]["score"], -rm[1]["measured_ms"]))
    gap, within = chosen[0]["score"] - best[0]["score"], resolution(chosen[0]["score"], images)
    if gap <= within:
        log(
            f"the looser round's best plan scores {best[0]['score']:.2%}, within the proxy's resolution "
            f"({within:.1%} on {images} held-out images) of the round-{chosen[1]['round']} plan's "
            f"{chosen[0]['score']:.2%}: keeping the looser plan ({best[1]['measured_ms']:.4g} ms against "
            f"{chosen[1]['measured_ms']:.4g}), which spends more of the budget"
        )
        return best
    log(
        f"the looser round's candidates scored lower (best {best[0]['score']:.2%}, {gap:.1%} under, more than "
        f"the proxy's resolution); keeping the round-{chosen[1]['round']} plan ({chosen[1]['measured_ms']:.4g} ms)"
    )
    return chosen


def _loosened(current: float, target_ms: float, points: list[tuple[float, float]]) -> float | None:
    """A search budget (in cost units) at which plans should measure just under `target_ms`, where
    the measured plans came out well under it; None where that is not at least 1 % looser.

    `points` are (cost, measured ms) of the dense model and the measured candidates. The estimate
    interpolates between the costliest plan that measured in and the cheapest costlier point that
    measured over (the dense model at worst), never extrapolating, 0.5 % short of the target as a
    tightening aims."""
    pts = sorted(points)
    below = [p for p in pts if p[1] <= target_ms]
    if not below:
        return None
    above = [p for p in pts if p[1] > target_ms and p[0] > below[-1][0]]
    if not above:
        return None
    estimate = 0.995 * _cost_at(target_ms, below[-1], above[0])
    return estimate if estimate > current * 1.01 else None


def _settings(out: Path, resume: bool, given: dict) -> PruneConfig:
    unknown = set(given) - PruneConfig.names()
    if unknown:
        raise EdgepruneError(f"unknown prune setting(s) {sorted(unknown)}")
    path = out / CONFIG
    if resume:
        if not path.is_file():
            raise EdgepruneError(f"{out} holds no pruning run to resume ({CONFIG} missing); start one without --resume")
        stored = json.loads(path.read_text())
        growable = ("evals", "max_rounds")
        for k, v in given.items():
            if v is not None and k not in growable and stored.get(k) != v:
                raise EdgepruneError(
                    f"{out} was started with {k}={stored.get(k)!r}, not {v!r}; resume with the same settings "
                    "(only --evals and --max-rounds may grow) or start a new run"
                )
        for k in growable:
            if given.get(k) is not None:
                stored[k] = given[k]
        return PruneConfig(**stored)
    if path.exists():
        raise EdgepruneError(
            f"{out} already holds a pruning run; pass --resume to continue it, or choose another --out"
        )
    missing = [k for k in ("weights", "device", "budget") if given.get(k) is None]
    if missing:
        raise EdgepruneError(f"prune needs {', '.join('--' + m for m in missing)}")
    return PruneConfig(**{k: v for k, v in given.items() if v is not None})


def prune(out: str | os.PathLike, *, resume: bool = False, progress: bool = True, log=print, **settings) -> dict:
    """Search the best plan under the budget on the device; returns (and writes) results.json.

    `settings` are PruneConfig fields (weights, device, budget, search, evals, ...)."""
    from edgeprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from edgeprune.data import load_dataset
    from edgeprune.devices import Device
    from edgeprune.latency.layers import ModelLayers
    from edgeprune.latency.predictor import Predictor, anchor_scale
    from edgeprune.latency.profiler import CALIBRATION_SCATTER
    from edgeprune.latency.table import LatencyTable, default_table, fingerprint_diff
    from edgeprune.pruning import acp_widths, space
    from edgeprune.report import convergence_plot, scatter_plot
    from edgeprune.search import (
        COSTS,
        SEARCHERS,
        BudgetProblem,
        FlopsCost,
        LatencyCost,
        ProxyEvaluator,
        SearchLoop,
        make_searcher,
    )
    from edgeprune.training import recalibrate_bn
    from edgeprune.zoo import resolve_weights

    out = Path(out)
    cfg = _settings(out, resume, settings)
    if cfg.search not in SEARCHERS:
        raise choices_error("search", cfg.search, list(SEARCHERS))
    if cfg.cost not in COSTS:
        raise choices_error("cost", cfg.cost, COSTS)
    if cfg.proxy_steps < 0:
        raise EdgepruneError(f"--proxy-steps must be 0 or more, got {cfg.proxy_steps}")
    if cfg.evals < 1:
        raise EdgepruneError(f"--evals must be at least 1, got {cfg.evals}")
    if not 0 <= cfg.margin < 0.5:
        raise EdgepruneError(f"--margin must be in [0, 0.5), got {cfg.margin}")
    if not 0 <= cfg.loosen < 1:
        raise EdgepruneError(f"--loosen must be in [0, 1) (0: never loosen), got {cfg.loosen}")
    started = time.monotonic()

    ckpt = load_checkpoint(resolve_weights(cfg.weights))
    if ckpt.plan is not None:
        raise EdgepruneError(f"{cfg.weights} is already pruned; prune its dense base model instead")
    data = load_dataset(cfg.data or ckpt.dataset, root=cfg.data_root)
    model = ckpt.build()
    shape = (1, *ckpt.input_shape)
    device = Device.load(cfg.device)
    fingerprint = device.fingerprint()  # asked once: a device behind an agent answers over the network
    table_path = Path(cfg.table or default_table(device.name, ckpt.model, fingerprint))
    table = None
    if cfg.cost == "latency" or table_path.is_file():
        table = LatencyTable.load(table_path)
        if other := fingerprint_diff(table.fingerprint, fingerprint):
            # the measured check holds the search to this device either way; the table only guides it
            log(
                f"warning: {table_path} was profiled on another device setup ({other}): its predictions may be "
                f"off, and the measured check has more to correct; a table of this device predicts better: "
                f"edgeprune profile --weights {cfg.weights} --device {cfg.device} --step {table.step}"
                " (written beside it, where a new prune or run finds it)"
            )
        if table.model not in (None, ckpt.model) or (table.input_shape and list(table.input_shape) != list(shape)):
            raise EdgepruneError(
                f"{table_path} was profiled for {table.model} at {table.input_shape}, "
                f"not {ckpt.model} at {list(shape)}; "
                f"profile it: edgeprune profile --weights {cfg.weights} --device {device.name}"
            )
    step = table.step if table else (device.spec.channel_step or 8)
    s = space(model, torch.randn(*shape), step=step, min_keep_ratio=cfg.min_keep, depth=cfg.depth)

    if not resume:  # a start that failed before its search began leaves no run behind (see below)
        (out / "evals.sqlite").unlink(missing_ok=True)
    store = RunStore(out)
    dense_ms = store.get("dense_ms")
    with tempfile.TemporaryDirectory(prefix="edgeprune-prune-") as tmp:
        from edgeprune.export import export_onnx
        from edgeprune.latency.interleave import (
            PRUNED_OVER,
            ROUNDS,
            measure_interleaved,
            noise_warning,
            rounds_progress,
        )

        def measure(plans: list, settle: float | None = None) -> list[dict]:
            """PLANS exported and measured in turn, each keeping its quietest window (interleave.py);
            `settle`: the first plan's quiet time (the dense model's: measure on while it is slower,
            or while a plan pruned from it measures slower than it, a slow phase either way)."""
            items = []
            for i, counts in enumerate(plans):
                pruned = s.plan([int(c) for c in counts], criterion=cfg.criterion).apply(model)
                items.append((export_onnx(pruned, shape, Path(tmp) / f"m{i}.onnx"), shape))
            beside = {"settle": (0, settle), "pruned": (0, range(1, len(items)))} if settle else {}
            with rounds_progress(
                f"measuring {len(items)} model{'s' * (len(items) > 1)} on {device.name}", len(items), enabled=progress
            ) as shown:
                return [m.to_dict() for m in measure_interleaved(device, items, on_result=shown, **beside)]

        def referred(plans: list) -> tuple[list[dict], list[float], float]:
            """Measure PLANS; for a budget that is a share of dense, beside the dense model.

            Such a budget is a ratio: the dense model is measured again, in turn with the plans,
            and they are referred to it (scaled by the first dense measurement / this one), so a
            device that drifted since the start (a shared machine, a board warming up) moves both
            sides of the ratio alike. Returns the raw measurements, the dense one beside them (as
            a list: empty when not measured) and the scale."""
            if not plans:
                return [], [], 1.0
            if not relative:
                return measure(plans), [], 1.0
            dense_now, *raw = measure([s.full_counts(), *plans], settle=dense_ms)
            beside = [dense_now["median_ms"]]
            return raw, beside, dense_ms / beside[0]

        def log_referral(beside: list[float], refer: float, what: str) -> None:
            if beside and abs(refer - 1) > 0.01:
                log(
                    f"the dense model measures {beside[0]:.4g} ms beside {what} "
                    f"({dense_ms:.4g} ms at the start): scaled by {refer:.3f} to match"
                )

        if dense_ms is None:
            log(f"measuring the dense {ckpt.model} on {device.name} ...")
            dense = measure([s.full_counts()])[0]  # the budget and the anchor hang on it
            if warning := noise_warning("dense", dense["extra"]["rounds_ms"]):
                log(warning)
            dense_ms = dense["median_ms"]
            store.set("dense_ms", dense_ms)
        budget_ms = parse_budget(cfg.budget, dense_ms)
        relative = str(cfg.budget).strip().endswith("%")
        target_ms = budget_ms * (1 - cfg.margin)  # what candidates must measure, leaving room for noise

        predictor = LatencyCost(Predictor(ModelLayers.from_model(s), table).compiled()) if table else None
        refit = (
            f"edgeprune profile --model {ckpt.model} --device {device.name} --input-shape "
            f"{','.join(map(str, table.input_shape))} --step {table.step} --out {table_path} --recalibrate"
            if table
            else ""
        )
        if table and cfg.cost == "latency" and (table.calibration.get("fit_median_abs_err") or 0) > CALIBRATION_SCATTER:
            log(
                f"warning: the table's calibration misses its own whole-model measurements by a median "
                f"{table.calibration['fit_median_abs_err']:.1%} (a quiet device: under {CALIBRATION_SCATTER:.0%}): its "
                f"predictions are rough and the measured check has more to correct; refit it when {device.name} "
                f"is quiet: {refit}"
            )
        if predictor is not None and cfg.anchor:
            # the table's calibration dates from its profile; the machine may have drifted since
            predicted = float(predictor(np.asarray([s.full_counts()]))[0])
            predictor.scale = anchor_scale(table, s.full_counts(), dense_ms, predicted)
            if abs(predictor.scale - 1) > 0.1:
                log(
                    f"the device measures the dense model {dense_ms:.4g} ms, {abs(predictor.scale - 1):.0%} "
                    f"{'slower' if predictor.scale > 1 else 'faster'} than when the table was profiled: predictions "
                    f"are scaled by {predictor.scale:.3f} (if this persists, refit the table: {refit})"
                )
        dense_macs = s.macs()
        if cfg.cost == "latency":
            if dense_ms <= target_ms:
                raise EdgepruneError(
                    f"the dense {ckpt.model} measures {dense_ms:.4g} ms on {device.name}, within the "
                    f"{budget_ms:.4g} ms budget less its {cfg.margin:.0%} margin: nothing to prune; lower the budget"
                )
            cost, unit = predictor, "ms (predicted)"
            dense_cost = float(cost(np.asarray([s.full_counts()]))[0])
            budget = min(target_ms, dense_cost * target_ms / dense_ms)
            if budget < 0.999 * target_ms and store.get("search_budget") is None:
                # the table's line misses the dense end low: held in ms, the budget would admit plans
                # the table itself says are as slow as the dense model, which the device then refuses
                log(
                    f"the table predicts the dense model {dense_cost:.4g} ms, under the {dense_ms:.4g} ms measured: "
                    f"the search budget starts at the same share of the prediction, {budget:.4g} ms (predicted); "
                    "the measured check corrects the rest"
                )
        else:
            cost, unit = FlopsCost(s.cost, dense_macs), "of dense MACs"
            budget = cfg.flops_target if cfg.flops_target else target_ms / dense_ms
            dense_cost = float(cost(np.asarray([s.full_counts()]))[0])
        problem = BudgetProblem.create(
            s, cost, store.get("search_budget", budget), max_keep=cfg.max_keep, fix=cfg.fix, unit=unit, check=False
        )
        smallest_counts, smallest_cost = problem.smallest()

        def smallest_plan_ms(why: str) -> float:
            """The smallest plan measured (referred like the candidates), once per run: it brackets
            a tightening from below, and holds a table's 'out of reach' against the device."""
            if store.get("smallest_plan_ms") is None:
                log(f"{why}measuring the smallest plan of the space on {device.name} ...")
                raw, beside, refer = referred([smallest_counts])
                log_referral(beside, refer, "the smallest plan")
                store.set("smallest_plan_ms", raw[0]["median_ms"] * refer)
            return store.get("smallest_plan_ms")

        if cfg.cost == "latency" and store.get("search_budget") is None and budget < smallest_cost:
            # the table rates every plan over the budget. A line fitted while the device was busy can
            # be wrong at this end (too flat, or low at the dense end), so the refusal rests on the
            # device: the smallest plan is measured, and where it meets the target after all, the
            # budget is mapped through it and the dense model, the two ends the device has measured
            smallest_ms = smallest_plan_ms(
                f"the table rates even the smallest plan of the space over the budget ({smallest_cost:.4g} > "
                f"{budget:.4g} {unit}): "
            )
            if smallest_ms > target_ms:
                raise EdgepruneError(
                    f"budget {budget_ms:.4g} ms is out of reach on {device.name}: the smallest plan this search space "
                    f"reaches measures {smallest_ms:.4g} ms there, over the budget less its {cfg.margin:.0%} margin "
                    f"({target_ms:.4g} ms); {problem.widen_hint()}"
                )
            if smallest_cost >= dense_cost:
                raise EdgepruneError(
                    f"the table rates the smallest plan of the space ({smallest_cost:.4g} {unit}) as slow as the "
                    f"dense model ({dense_cost:.4g}), but it measures {smallest_ms:.4g} ms against {dense_ms:.4g}: the "
                    f"table's calibration is unusable; refit it when {device.name} is quiet: {refit}"
                )
            mapped = _cost_at(target_ms, (smallest_cost, smallest_ms), (dense_cost, dense_ms))
            budget = max(smallest_cost, 0.995 * mapped)
            log(
                f"the smallest plan measures {smallest_ms:.4g} ms on {device.name}, within the {target_ms:.4g} ms "
                f"target: the table's line is off at this end. The search budget is set between the smallest plan "
                f"and the dense model as measured, {budget:.4g} {unit}; the measured check corrects the rest "
                f"(refit the table when {device.name} is quiet: {refit})"
            )
        problem.set_budget(store.get("search_budget", budget))
        if table is not None and cfg.table is None:  # a resume reads the table this run started on, even
            cfg.table = str(table_path)  # where this setup's own was profiled beside it since
        write_json(out / CONFIG, asdict(cfg))  # the budget is reachable: from here on, a run to resume
        evaluator = ProxyEvaluator(
            s,
            data,
            criterion=cfg.criterion,
            calibration_batches=cfg.calibration_batches,
            heldout_images=cfg.heldout_images,
            seed=cfg.seed,
            train_steps=cfg.proxy_steps,
        )
        dense_score = evaluator(s.full_counts())
        acp = acp_widths(s, evaluator.calibration) if cfg.search == "pso" else None
        searcher = make_searcher(
            cfg.search,
            problem,
            evals=cfg.evals,
            seed=cfg.seed,
            clusters=cfg.clusters,
            acp_counts=acp,
            particles=cfg.particles,
        )

        def describe(counts) -> dict:
            d = {"macs": float(s.cost.macs(counts))}
            if predictor is not None:
                d["predicted_ms"] = float(predictor(np.asarray([counts]))[0])
            return d

        log(
            f"{ckpt.model} on {device.name}: dense {dense_ms:.4g} ms measured, proxy accuracy {dense_score:.2%}; "
            f"budget {budget_ms:.4g} ms; {cfg.search} over {problem.dim} groups, {cfg.cost} constraint "
            f"{problem.budget:.4g} {unit}"
        )
        loop = SearchLoop(
            problem,
            searcher,
            evaluator,
            store,
            describe=describe,
            plan_hash=lambda c: evaluator.plan(c).hash(),
            progress=progress,
            log=log,
        )
        stage = store.get("round", 0)
        extra = max(10, cfg.evals // 4)
        chosen = None
        while True:
            loop.run(cfg.evals + stage * extra, stage=stage)
            measured = {tuple(m["counts"]): m for m in store.measurements()}
            fits = [r for r in loop.rows if r["cost"] <= problem.budget * (1 + 1e-9) and not r["duplicate"]]
            fits.sort(key=lambda r: (-r["score"], r["cost"]))
            todo = [r for r in fits if tuple(r["counts"]) not in measured][: cfg.measure_top]
            if todo:
                log(
                    f"measuring the {len(todo)} best new candidates on {device.name} "
                    f"(in turn, each its quietest of {ROUNDS}+ short windows) ..."
                )
            raw, beside, refer = referred([r["counts"] for r in todo])
            dense_beside = beside[0] if beside else None
            for r, m in zip(todo, raw):
                row = {
                    "counts": r["counts"],
                    "plan_hash": r["plan_hash"],
                    "round": stage,
                    "predicted_ms": r.get("predicted_ms"),
                    "measured_ms": m["median_ms"] * refer,
                    "raw_ms": m["median_ms"],
                    "dense_beside_ms": dense_beside,
                    "p90_ms": m["p90_ms"] * refer,
                    "cv": m["cv"],
                    "n": m["n"],
                }
                store.add_measurement(row)
                measured[tuple(r["counts"])] = row
            log_referral(beside, refer, "these candidates")
            slower = [m["median_ms"] for m in raw if beside and m["median_ms"] > beside[0] * (1 + PRUNED_OVER)]
            if slower:
                log(
                    f"{len(slower)} of these candidates measure slower than the dense model beside them "
                    f"({', '.join(f'{ms:.4g}' for ms in slower)} vs {beside[0]:.4g} ms) even after measuring on: "
                    f"{device.name} may run their channel counts on slower kernels than the dense model's"
                )
            by_counts = {tuple(r["counts"]): r for r in loop.rows}
            ok = [(by_counts[k], m) for k, m in measured.items() if m["measured_ms"] <= target_ms]
            if todo:
                log(
                    f"measured {len(todo)} candidates on {device.name}: "
                    + ", ".join(f"{m['measured_ms']:.4g}" for m in (measured[tuple(r["counts"])] for r in todo))
                    + f" ms (budget {budget_ms:.4g} ms, {target_ms:.4g} with the {cfg.margin:.0%} margin)"
                )
            if ok:
                chosen = max(ok, key=lambda rm: (rm[0]["score"], -rm[1]["measured_ms"]))
                if store.get("loosened_from") is not None:
                    if chosen[1]["round"] < stage:
                        chosen = _after_loosening(chosen, ok, stage, len(evaluator.y), target_ms, log)
                    break
                slack = 1 - chosen[1]["measured_ms"] / target_ms
                if cfg.cost != "latency" or cfg.loosen == 0 or slack < cfg.loosen or stage >= cfg.max_rounds:
                    break
                points = [(dense_cost, dense_ms)]
                points += [(by_counts[k]["cost"], m["measured_ms"]) for k, m in measured.items() if k in by_counts]
                looser = _loosened(problem.budget, target_ms, points)
                if looser is None:
                    break
                log(
                    f"the best candidate measures {chosen[1]['measured_ms']:.4g} ms, {slack:.0%} under the "
                    f"{target_ms:.4g} ms target: search budget {problem.budget:.4g} -> {looser:.4g} {unit} "
                    f"(from the measured plans), {extra} more evaluations to spend the rest on accuracy"
                )
                problem.set_budget(looser)
                stage += 1
                store.set("search_budget", looser)
                store.set("round", stage)
                store.set("loosened_from", chosen[1]["round"])  # once per run
                continue
            if stage >= cfg.max_rounds or not measured:
                break
            # bracket the budget from below once (the key changed when this measurement began to be
            # referred to the dense model: a run resumed from before measures it again)
            smallest_ms = smallest_plan_ms("")
            if smallest_ms > target_ms:
                log(
                    f"even the smallest plan of the space measures {smallest_ms:.4g} ms on "
                    f"{device.name}, over the {target_ms:.4g} ms target (budget less the margin)"
                )
                break
            points = [(dense_cost, dense_ms), (smallest_cost, smallest_ms)]
            points += [(by_counts[k]["cost"], m["measured_ms"]) for k, m in measured.items() if k in by_counts]
            per_round: dict[int, tuple[float, float]] = {}  # each round's most favourable candidate
            for k, m in measured.items():
                if k in by_counts:
                    c = (by_counts[k]["cost"], m["measured_ms"])
                    seen = per_round.get(m["round"])
                    if seen is None or c[1] / c[0] < seen[1] / seen[0]:
                        per_round[m["round"]] = c
            rounds = [per_round[r] for r in sorted(per_round)]
            new_budget = _tightened(problem.budget, target_ms, points, rounds)
            new_budget = max(new_budget, smallest_cost)
            if new_budget >= problem.budget:
                break  # already at the smallest plan the space allows
            log(
                f"no candidate met {target_ms:.4g} ms on the device; search budget {problem.budget:.4g} -> "
                f"{new_budget:.4g} {unit} (from the measured plans), {extra} more evaluations"
            )
            problem.set_budget(new_budget)
            stage += 1
            store.set("search_budget", new_budget)
            store.set("round", stage)

    met = chosen is not None
    if not met:
        all_measured = store.measurements()
        if not all_measured:
            raise EdgepruneError("no candidate was measured on the device; nothing to choose from")
        best_m = min(all_measured, key=lambda m: m["measured_ms"])
        chosen = ({r["plan_hash"]: r for r in loop.rows}[best_m["plan_hash"]], best_m)
        log(
            f"warning: no plan met the {budget_ms:.4g} ms budget on {device.name} after {stage + 1} rounds; "
            f"keeping the fastest measured ({best_m['measured_ms']:.4g} ms): lower --min-keep, add --depth "
            "or raise the budget (or, if the measurements were still closing in, --resume with a larger --max-rounds)"
        )
    row, m = chosen
    counts = [int(c) for c in row["counts"]]
    plan = evaluator.plan(counts)
    plan.save(out / "plan.json")
    pruned = plan.apply(model)
    recalibrate_bn(pruned, data)
    meta = {"base_checkpoint": str(cfg.weights), "proxy_accuracy": row["score"], "measured_ms": m["measured_ms"]}
    save_checkpoint(
        Checkpoint(
            ckpt.model, ckpt.num_classes, ckpt.input_shape, ckpt.dataset, pruned.state_dict(), meta, plan.to_dict()
        ),
        out / "pruned.pt",
    )
    distinct = [r for r in loop.rows if not r["duplicate"]]
    convergence_plot(
        {cfg.search: [r["score"] for r in distinct]},
        out / "convergence.png",
        title=f"{cfg.search} on {ckpt.model}, budget {budget_ms:.4g} ms ({cfg.cost})",
    )
    scatter_plot(
        loop.rows,
        out / "scatter.png",
        budget_ms=budget_ms,
        measured=store.measurements(),
        chosen={"measured_ms": m["measured_ms"], "score": row["score"]},
        title=f"{ckpt.model}: proxy accuracy vs latency on {device.name}",
    )
    scores = np.maximum.accumulate([r["score"] for r in distinct])
    result = {
        "run_dir": str(out),
        "model": ckpt.model,
        "dataset": ckpt.dataset,
        "device": device.name,
        "search": cfg.search,
        "cost": cfg.cost,
        "budget_ms": budget_ms,
        "margin": cfg.margin,
        "target_ms": target_ms,
        "search_budget": problem.budget,
        # measured where a round missed, or where the table rated every plan over the budget
        "smallest_plan_ms": store.get("smallest_plan_ms"),
        "loosened": store.get("loosened_from") is not None,
        "table": None
        if table is None
        else {
            "path": str(table_path),
            "device": table.device,
            "fingerprint": table.fingerprint,
            "step": table.step,
            "entries": len(table.entries),
            "calibration": table.calibration,
        },
        "anchor": predictor.scale if predictor is not None else None,
        "dense": {"measured_ms": dense_ms, "proxy_accuracy": dense_score, "macs": dense_macs, "params": s.params()},
        "chosen": {
            "counts": counts,
            "proxy_accuracy": row["score"],
            "predicted_ms": row.get("predicted_ms"),
            "measured_ms": m["measured_ms"],
            "macs": s.macs(counts),
            "params": s.params(counts),
            "removed_blocks": plan.drop,
            "plan_hash": row["plan_hash"],
        },
        "met_budget": met,
        "speedup": dense_ms / m["measured_ms"],
        "evals": len(distinct),
        "evals_to_99pct": int(np.argmax(scores >= 0.99 * scores[-1]) + 1),
        "rounds": stage + 1,
        "seconds_per_eval": float(np.median(evaluator.seconds)) if evaluator.seconds else None,
        "seconds": round(time.monotonic() - started, 1),
        "searcher": searcher.state(),
        "files": {
            k: str(out / k) for k in ("plan.json", "pruned.pt", "convergence.png", "scatter.png", "evals.sqlite")
        },
    }
    write_json(out / "results.json", result)
    store.close()
    return result
