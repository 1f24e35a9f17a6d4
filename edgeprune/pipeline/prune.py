"""Prune a model to a latency budget on a device: model in, pruned model out.

`prune(model, example_input, device=..., budget=..., data=... | score_fn=...)` resolves its
inputs (the device, the budget, the latency table, the prunable space, the task's proxy), runs
the measured search (search/measured.py: search on the table, measure the best candidates on the
device, tighten or loosen, repeat) and returns the pruned model, BatchNorm recalibrated, with a
`PruneResult`. A run folder is optional: it logs every evaluation and measurement as it happens
(a killed run resumes with `resume=True` and loses nothing), and holds the plan, the checkpoints,
plots and results.json for the next stages and the report.

`prune_run(out, ...)` is what the CLI and `edgeprune run` call: it builds the model from a
checkpoint or a reference (a name, file.py:factory, ...) and its weights, then calls `prune`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.cluster.session import ClusterOptions, RaySession
from edgeprune.errors import EdgepruneError
from edgeprune.pipeline.settings import PruneSettings
from edgeprune.runs import RunDir, RunStore, write_json
from edgeprune.search.budget import Budget

CONFIG = "config.json"
WARM_PLANS = 2  # knapsack plans a warm start begins with: its plan and a neighbour (of BO's 10 starts)


@dataclass
class PruneResult:
    """What a prune found: the plan, and the figures of results.json (`record`)."""

    plan: object  # edgeprune.pruning.Plan
    record: dict = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def met_budget(self) -> bool:
        return self.record["met_budget"]

    @property
    def budget_ms(self) -> float:
        return self.record["budget_ms"]

    @property
    def measured_ms(self) -> float:
        return self.record["chosen"]["measured_ms"]

    @property
    def predicted_ms(self) -> float | None:
        return self.record["chosen"]["predicted_ms"]

    @property
    def score(self) -> float:
        return self.record["chosen"]["proxy_accuracy"]

    @property
    def dense_ms(self) -> float:
        return self.record["dense"]["measured_ms"]

    @property
    def speedup(self) -> float:
        return self.record["speedup"]


def model_hash(model: nn.Module) -> str:
    """The weights' identity: a run resumes only on the model it started with."""
    from edgeprune.checkpoint import state_hash

    return state_hash(model.state_dict())


def _run_config(run: RunDir | None, resume: bool, inputs: dict, settings: dict) -> tuple[dict, PruneSettings]:
    """The run's config: a new one from `inputs` and `settings`, or a resumed run's, which must
    match them (only evals and max_rounds may grow)."""
    if run is None:
        if resume:
            raise EdgepruneError("resume=True needs the run folder to resume (run_dir=...)")
        return inputs, PruneSettings.create(settings)
    path = run / CONFIG
    if not resume:
        if path.exists():
            raise EdgepruneError(
                f"{run} already holds a pruning run; pass --resume to continue it, or choose another --out"
            )
        return inputs, PruneSettings.create(settings)
    if not path.is_file():
        raise EdgepruneError(f"{run} holds no pruning run to resume ({CONFIG} missing); start one without --resume")
    stored = run.config
    given = {
        **{k: v for k, v in inputs.items() if v is not None},
        **{k: v for k, v in settings.items() if v is not None},
    }
    for k, v in given.items():
        if k not in PruneSettings.GROWABLE and k in stored and stored[k] != v and k not in ("weights", "table"):
            raise EdgepruneError(
                f"{run} was started with {k}={stored[k]!r}, not {v!r}; resume with the same settings "
                "(only --evals and --max-rounds may grow) or start a new run"
            )
    names = PruneSettings.names()
    values = {k: v for k, v in stored.items() if k in names}
    values.update({k: settings[k] for k in PruneSettings.GROWABLE if settings.get(k) is not None})
    return stored, PruneSettings.create(values)


class Pruning:
    """One prune, from resolved inputs to the pruned model: the table and predictor, the first
    search budget, the proxy and searcher, the measured search, the outputs. Each step a method;
    what they share (the model, its space, the device, the run's store, the settings) held here."""

    def __init__(self, model, x, ref, device, budget: Budget, run: RunDir | None, config: dict, cfg, task, log):
        self.model, self.x, self.ref, self.device, self.budget = model, x, ref, device, budget
        self.run, self.config, self.cfg, self.task, self.log = run, config, cfg, task, log
        self.table = self.table_path = self.predictor = None
        self.refit = ""
        self.session = None  # a RaySession: candidates are scored on its workers
        self.scoring = {"where": "this process", "workers": 1, "nodes": 1, "requeued": 0}
        self.noise = None  # the run's NoiseNote (latency/interleave.py): a noisy device is said once a run
        # where the search runs at another precision than the device's own (int8): the device as it
        # is, on which the dense model is measured beside its quantized self (a share-of-dense
        # budget is of the dense model the user has)
        self.reference = None
        self.alone = False  # the dense model quantized meets the budget: no pruning needed

    def run_from(self, table, cluster, *, resume: bool, progress: bool, started: float):
        """The table loaded, the prunable space built, the run's store and the device's meter
        opened; `execute_on` with them, closing both after."""
        from edgeprune.pruning import space
        from edgeprune.search.measured import PlanMeter

        cfg, run = self.cfg, self.run
        self.load_table(self.config.get("table") or table, progress=progress)
        step = (self.table.step if self.table else None) or self.device.spec.channel_step or 8
        s = space(self.model, self.x, step=step, min_keep_ratio=cfg.min_keep, depth=cfg.depth)
        if not resume and run is not None:  # a start that failed before its search began leaves no run behind
            (run / "evals.sqlite").unlink(missing_ok=True)
        store = RunStore(None if run is None else run.path)
        relative = self.budget.relative
        # a run keeps the statistic it started with; one started before the check named one, its quietest window
        statistic = store.get("statistic", "quietest" if store.get("dense_ms") is not None else None)
        statistic = statistic or self.device.spec.verdict_statistic
        store.set("statistic", statistic)
        meter = PlanMeter(
            s, self.device, criterion=cfg.criterion, relative=relative, statistic=statistic, progress=progress,
            log=self.log,
        )  # fmt: skip
        meter.noise = self.noise or meter.noise
        try:
            return self.execute_on(cluster, s, store, meter, progress, started)
        finally:
            store.close()
            meter.close()

    def execute_on(self, cluster, s, store, meter, progress: bool, started: float):
        """`execute`, its candidates scored on `cluster` where one is given (a batch per its workers)."""
        if cluster.enabled and self.cfg.proxy == "supernet":
            raise EdgepruneError(
                "the supernet proxy scores in this process only: run without --workers/--ray, or use --proxy bn"
            )
        with RaySession(cluster, log=self.log) if cluster.enabled else contextlib.nullcontext() as session:
            self.session = session
            self.cfg = dataclasses.replace(self.cfg, batch=self.cfg.batch or default_batch(session, self.cfg.evals))
            return self.execute(s, store, meter, progress, started)

    def execute(self, s, store, meter, progress: bool, started: float):
        """Measure the dense model, set the budget and the search problem, search, finish."""
        from edgeprune.search.measured import MeasuredSearch

        cfg, run = self.cfg, self.run
        if store.get("dense_ms") is None:
            self.log(f"measuring the dense {self.ref.id} on {self.device.name} ...")
            held, quietest = meter.measure_dense()
            store.set("dense_quietest_ms", quietest)
            store.set("dense_ms", held)
        meter.dense_ms = dense_ms = store.get("dense_ms")
        meter.dense_quietest_ms = store.get("dense_quietest_ms")
        if self.reference is not None and store.get("reference_ms") is None:
            store.set("reference_ms", self.measure_reference(s, meter))
        # THE budget of the run, in ms: computed once, from the dense model measured at the start, and
        # kept in the store; every later figure (results.json, validation, the report, `run`) is this one
        if store.get("budget_ms") is None:
            store.set("budget_ms", self.budget.ms(store.get("reference_ms") or dense_ms))
        budget_ms = store.get("budget_ms")
        target_ms = budget_ms * (1 - cfg.margin)  # what candidates must measure, leaving room for noise
        self.alone = self.reference is not None and dense_ms <= target_ms
        if self.alone:
            self.log(
                f"the dense {self.ref.id} in {self.device.spec.precision} measures {dense_ms:.4g} ms, within the "
                f"{budget_ms:.4g} ms budget less its {cfg.margin:.0%} margin: quantizing alone meets it, and the "
                "dense model's plan is kept (no channel is pruned)"
            )
        if self.table is not None:
            self.predict_on(s, dense_ms)
        problem, first, dense_cost = self.problem(s, budget_ms, target_ms, dense_ms, store)
        search = MeasuredSearch(
            problem=problem,
            meter=meter,
            store=store,
            settings=cfg,
            budget_ms=budget_ms,
            target_ms=target_ms,
            dense_cost=dense_cost,
            log=self.log,
        )
        search.start(first, self.refit)
        if run is not None:  # the budget is reachable: from here on, a run to resume
            self.config["table"] = None if self.table_path is None else str(self.table_path)
            self.keep_dense()
            config = {k: v for k, v in self.config.items() if k != "dense_meta"}
            write_json(run / CONFIG, {**config, **cfg.to_dict()})
        choice, evaluator, loop = self.search(s, problem, search, store, budget_ms, dense_ms, progress)
        figures = {"dense_ms": dense_ms, "budget_ms": budget_ms, "target_ms": target_ms, "started": started}
        return self.finish(s, choice, evaluator, loop, problem, store, figures)

    def measure_reference(self, s, meter) -> float:
        """The dense model at the device's own precision, as a figure of this run's clock: measured in
        turn with its quantized self on the device as it is (a quantized file runs quantized there),
        their ratio times the quantized dense model's figure at the start (`meter.dense_ms`, what
        every round's plans are referred to). A ratio measured in turn holds under load that moves
        both alike; a figure measured once, at another moment than the start's, would not. Like every
        ratio here it is of the quietest windows: noise only adds time, more to the larger model, so a
        ratio of typical windows overstates what quantizing gains, and every budget after it with it;
        a noisy stretch (windows far over the quietest) is measured again."""
        from edgeprune.formats.quantize import as_int8
        from edgeprune.latency import interleave
        from edgeprune.latency.verdict import least_noisy
        from edgeprune.models.onnx import export_onnx

        own, to = self.reference.spec.precision, self.device.spec.precision
        shape, what = s.input_shape, f"the dense model in {own} and in {to} on {self.reference.name}"
        tolerance = self.reference.spec.protocol.max_cv

        def noisy(spread: float) -> None:
            self.log(f"{what}: windows {spread:.0%} over the quietest (over the {tolerance:.0%} tolerance), again")

        with tempfile.TemporaryDirectory(prefix="edgeprune-reference-") as tmp:
            path = export_onnx(self.model, shape, Path(tmp) / "dense.onnx")
            with as_int8(path, shape) as quantized:
                with interleave.rounds_progress(f"measuring {what}", 2, enabled=meter.progress) as shown:
                    items = [(path, shape), (quantized, shape)]
                    pair = least_noisy(lambda: interleave.measure_interleaved(self.reference, items, on_result=shown),
                                       tolerance=tolerance, on_noisy=noisy)  # fmt: skip
        ms = [m.median_ms for m in pair]  # each model's quietest window
        ratio = ms[0] / ms[1]
        self.log(
            f"{what}: {ms[0]:.4g} against {ms[1]:.4g} ms (quietest windows), {to} {ratio:.2f}x "
            f"{'faster' if ratio >= 1 else 'slower (this runtime gains nothing from it at this size)'}; "
            f"the dense {own} figure of the budget: {meter.dense_ms:.4g} ms (the {to} one at the start) x {ratio:.3f}"
        )
        return meter.dense_ms * ratio

    def load_table(self, table, *, progress: bool = True) -> None:
        """The latency table (none for a FLOPs search without one), checked against the model and
        device. Where none was named and the device has no table of its own for the model, it is
        profiled first when that takes a few minutes (`profile_first`)."""
        from edgeprune.latency.table import LatencyTable, find_table, fingerprint_diff

        if isinstance(table, LatencyTable):
            path, loaded = Path(table.meta.get("path", "(given)")), table
        else:
            path = find_table(self.device, self.ref.id, table, log=self.log)
            if self.cfg.cost != "latency" and not path.is_file():
                return
            loaded = LatencyTable.load(path)
            if table is None and self.cfg.cost == "latency":
                path, loaded = self.profile_first(path, loaded, progress)
        loaded.check_input(self.x.shape, path, profile_advice(self.config, self.ref))
        if other := fingerprint_diff(loaded.fingerprint, self.device.fingerprint()):
            # the measured check holds the search to this device either way; the table only guides it
            self.log(
                f"warning: {path} was profiled on another device setup ({other}): its predictions may be off, and "
                f"the measured check has more to correct; a table of this device predicts better: "
                f"{profile_advice(self.config, self.ref, step=loaded.step)} (written beside it, where a new prune or "
                "run finds it)"
            )
        self.table, self.table_path = loaded, path

    def profile_first(self, path: Path, other, progress: bool):
        """This device's own table of the model, profiled now, where `other` (the one found) is
        another setup's and a profile takes minutes (latency/profiler.py `profiles_first`); else `other`."""
        from edgeprune.latency.profiler import profile, profiles_first
        from edgeprune.latency.table import LatencyTable, find_table

        if not profiles_first(other, self.device, self.ref.id, self.log):
            return path, other
        own = find_table(self.device, self.ref.id, None, writing=True)
        profile(self.model, tuple(self.x.shape), device=self.device, out=own, model_id=self.ref.id, step=other.step,
                progress=progress, log=self.log)  # fmt: skip
        return own, LatencyTable.load(own)

    def predict_on(self, s, dense_ms: float) -> None:
        """The predictor, anchored on the dense model measured now, and the refit advice: where the
        table is this setup's, refit it in place; where it is another's, profile this one's beside it."""
        from edgeprune.latency.layers import ModelLayers
        from edgeprune.latency.predictor import Predictor, anchor_scale
        from edgeprune.latency.profiler import CALIBRATION_SCATTER
        from edgeprune.latency.table import fingerprint_diff
        from edgeprune.search import LatencyCost

        table, path, advice = self.table, self.table_path, lambda **kw: profile_advice(self.config, self.ref, **kw)
        layers = ModelLayers.from_model(s)
        foreign = fingerprint_diff(table.fingerprint, self.device.fingerprint())
        self.refit = advice(step=table.step) if foreign else advice(step=table.step, out=path, recalibrate=True)
        if why := table.other_model(self.ref.id, layers.signature()):
            self.log(
                f"warning: {path}: {why}; its predictions rest on that model's line and the measured check has more "
                f"to correct; profile this model into {'a table of this device' if foreign else 'it'} (it measures "
                f"only what is missing and refits): {advice(step=table.step, out=None if foreign else path)}"
            )
        self.predictor = LatencyCost(Predictor(layers, table).compiled())
        if self.cfg.cost == "latency" and (table.calibration.get("fit_median_abs_err") or 0) > CALIBRATION_SCATTER:
            self.log(
                f"warning: the table's calibration misses its own whole-model measurements by a median "
                f"{table.calibration['fit_median_abs_err']:.1%} (a quiet device: under {CALIBRATION_SCATTER:.0%}): "
                f"its predictions are rough and the measured check has more to correct; refit it when "
                f"{self.device.name} is quiet: {self.refit}"
            )
        if self.cfg.anchor:  # the table's calibration dates from its profile; the machine may have drifted since
            predicted = float(self.predictor(np.asarray([s.full_counts()]))[0])
            self.predictor.scale = anchor_scale(table, s.full_counts(), dense_ms, predicted)
            if abs(self.predictor.scale - 1) > 0.1:
                self.log(
                    f"the device measures the dense model {dense_ms:.4g} ms, {abs(self.predictor.scale - 1):.0%} "
                    f"{'slower' if self.predictor.scale > 1 else 'faster'} than when the table was profiled: "
                    f"predictions are scaled by {self.predictor.scale:.3f} (if this persists, refit the table: "
                    f"{self.refit})"
                )

    def problem(self, s, budget_ms: float, target_ms: float, dense_ms: float, store):
        """The search problem under its cost (predicted ms, or MACs), and its first budget."""
        from edgeprune.search import BudgetProblem, FlopsCost

        cfg = self.cfg
        if cfg.cost == "flops":
            first = cfg.flops_target if cfg.flops_target else target_ms / dense_ms
            cost, unit = FlopsCost(s.cost, s.macs()), "of dense MACs"
        else:
            if dense_ms <= target_ms and not self.alone:
                raise EdgepruneError(
                    f"the dense {self.ref.id} measures {dense_ms:.4g} ms on {self.device.name}, within the "
                    f"{budget_ms:.4g} ms budget less its {cfg.margin:.0%} margin: nothing to prune; lower the budget"
                )
            cost, unit = self.predictor, "ms (predicted)"
            dense_cost = float(cost(np.asarray([s.full_counts()]))[0])
            first = min(target_ms, dense_cost * target_ms / dense_ms)
            if first < 0.999 * target_ms and store.get("search_budget") is None and not self.alone:
                # the table's line misses the dense end low: held in ms, the budget would admit plans the
                # table itself says are as slow as the dense model, which the device then refuses
                self.log(
                    f"the table predicts the dense model {dense_cost:.4g} ms, under the {dense_ms:.4g} ms measured: "
                    f"the search budget starts at the same share of the prediction, {first:.4g} ms (predicted); the "
                    "measured check corrects the rest"
                )
        problem = BudgetProblem.create(
            s, cost, store.get("search_budget", first), max_keep=cfg.max_keep, fix=cfg.fix, unit=unit, check=False
        )
        problem.dense_fits = self.alone
        return problem, first, float(cost(np.asarray([s.full_counts()]))[0])

    def search(self, s, problem, search, store, budget_ms: float, dense_ms: float, progress: bool):
        """Score plans with the proxy and run the measured search; (choice, evaluator, loop)."""
        from edgeprune.pruning import acp_widths
        from edgeprune.search import SearchContext, SearchLoop, make_searcher

        cfg, task = self.cfg, self.task
        share = f" ({self.budget} of dense)" if self.budget.relative else ""
        self.log(
            f"{self.ref.id} on {self.device.name}: dense {dense_ms:.4g} ms measured; budget {budget_ms:.4g} ms{share}; "
            f"{cfg.search} over {problem.dim} groups, search budget {problem.budget:.4g} {problem.unit}"
        )
        evaluator = self.evaluator(s, progress)
        images = f" on {task.images} held-out images" if task.images else ""
        self.log(f"scoring the dense model with the proxy{images} (the first of the search's evaluations) ...")
        dense_score = evaluator(s.full_counts())
        store.set("dense_score", dense_score)
        pool = self.scoring_pool(s, evaluator)
        acp = acp_widths(s, evaluator.calibration) if cfg.search == "pso" else None
        context = SearchContext(task, criterion=cfg.criterion, seed=cfg.seed, log=self.log, progress=progress)
        searcher = make_searcher(
            "uniform" if self.alone else cfg.search,  # at full width: the dense plan
            problem,
            evals=cfg.evals,
            seed=cfg.seed,
            clusters=cfg.clusters,
            acp_counts=acp,
            particles=cfg.particles,
            context=context,
            rounds=cfg.knapsack_rounds,
            starts=self.warm_starts(problem, context, store),
        )
        predictor = self.predictor

        def describe(counts) -> dict:
            d = {"macs": float(s.cost.macs(counts))}
            if predictor is not None:
                d["predicted_ms"] = float(predictor(np.asarray([counts]))[0])
            return d

        score = f"proxy accuracy {dense_score:.2%}" if task.classification else f"proxy score {dense_score:.4g}"
        self.log(f"the dense model's {score}")
        loop = SearchLoop(
            problem,
            searcher,
            evaluator,
            store,
            batch=cfg.batch,
            describe=describe,
            plan_hash=lambda c: evaluator.plan(c).hash(),
            progress=progress,
            log=self.log,
        )
        try:
            return search.run(loop, task), evaluator, loop
        finally:
            if pool is not None:
                self.scoring = pool.summary()
                pool.close()

    def warm_starts(self, problem, context, store) -> list[np.ndarray]:
        """`--warm-start knapsack`: the knapsack's plans, found once and kept in the store (a resumed
        run proposes the same starts without solving again)."""
        from edgeprune.search import WARM_STARTED
        from edgeprune.search.knapsack import knapsack_starts

        if self.cfg.warm_start == "none" or self.alone or self.cfg.search not in WARM_STARTED:
            return []
        if store.get("warm_starts") is None:
            self.log(f"warm start: the knapsack's plans at the search budget ({problem.budget:.4g} {problem.unit}) ...")
            points = knapsack_starts(problem, context=context, n=WARM_PLANS, seed=self.cfg.seed)
            store.set("warm_starts", [u.tolist() for u in points])
        return [np.asarray(u, float) for u in store.get("warm_starts")]

    def evaluator(self, s, progress: bool):
        """The accuracy proxy: the plan on the dense weights, or on a width supernet trained once
        (kept in the run folder, so a resumed run does not train it again)."""
        from edgeprune.search import ProxyEvaluator

        cfg = self.cfg
        common = self.evaluator_args
        if cfg.proxy == "bn":
            return ProxyEvaluator(s, self.task, **common)
        from edgeprune.search.supernet import SupernetEvaluator

        path = None if self.run is None else self.run / "supernet.pt"
        self.log(f"the supernet proxy: {self.ref.id} as a width supernet ({cfg.supernet_steps} training steps) ...")
        return SupernetEvaluator(
            s, self.task, **common, supernet_steps=cfg.supernet_steps, state_path=path, progress=progress, log=self.log
        )

    def scoring_pool(self, s, evaluator):
        """Ray workers scoring candidates for `evaluator` (None without a cluster)."""
        if self.session is None:
            return None
        from edgeprune.cluster.scoring import ScoringPool

        cfg = self.cfg
        self.log(f"scoring candidates on {self.session.options.describe()}, {cfg.batch} at a time ...")
        evaluator.pool = ScoringPool(
            self.session,
            model=self.model,
            example_input=self.x,
            space_args={"step": s.step, "min_keep_ratio": cfg.min_keep, "depth": cfg.depth},
            task=self.task,
            evaluator_args=self.evaluator_args,
            log=self.log,
        )
        return evaluator.pool

    @functools.cached_property
    def evaluator_args(self) -> dict:
        """The proxy's settings (here and on Ray workers alike; built once: an int8 runner holds its
        calibration images); an int8 device's candidates are scored as their int8 files run."""
        cfg = self.cfg
        return {
            "criterion": cfg.criterion,
            "calibration_batches": cfg.calibration_batches,
            "seed": cfg.seed,
            "train_steps": cfg.proxy_steps,
            "as_run": self.int8_runner() if self.device.spec.precision == "int8" else None,
        }

    def int8_runner(self):
        """An int8 search's proxy runs each candidate as its int8 file, calibrated as the export will be."""
        from edgeprune.formats.package import calibration_inputs
        from edgeprune.formats.quantized import Int8Runner

        return Int8Runner(calibration_inputs(self.task, (1, *self.x.shape[1:]), log=lambda _: None))

    def finish(self, s, choice, evaluator, loop, problem, store, figures: dict):
        """The pruned model (BatchNorm recalibrated), its result, and the run's files."""
        from edgeprune.report import plan_summary
        from edgeprune.training import recalibrate_bn_on

        row, m = choice.row, choice.measurement
        counts = [int(c) for c in row["counts"]]
        written = "" if self.run is None else " and writing the run's files (checkpoints, plots)"
        plan = evaluator.plan(counts)
        pruned = plan.apply(self.model)
        if self.alone:  # the dense model as trained: its BatchNorm statistics are the full training set's
            self.log(f"keeping the dense model as it is{written} ...")
        else:
            self.log(f"recalibrating the chosen plan's BatchNorm{written} ...")
            recalibrate_bn_on(pruned, self.task.train.inputs(20, seed=0, input_of=self.task.input_of))
        distinct = [r for r in loop.rows if not r["duplicate"]]
        scores = np.maximum.accumulate([r["score"] for r in distinct])
        dense_ms = figures["dense_ms"]
        record = {
            "run_dir": None if self.run is None else str(self.run),
            "model": self.ref.id,
            "dataset": self.config.get("data"),
            "task": self.task.metric,
            "device": self.device.name,
            "search": "uniform" if self.alone else self.cfg.search,
            "cost": self.cfg.cost,
            "budget_ms": figures["budget_ms"],
            "margin": self.cfg.margin,
            "target_ms": figures["target_ms"],
            "search_budget": problem.budget,
            # measured where a round missed, or where the table rated every plan over the budget
            "smallest_plan_ms": store.get("smallest_plan_ms"),
            "loosened": store.get("loosened_from") is not None,
            "table": self._table_record(),
            "anchor": self.predictor.scale if self.predictor is not None else None,
            "dense": {
                "measured_ms": dense_ms,
                "proxy_accuracy": store.get("dense_score"),
                "macs": s.macs(),
                "params": s.params(),
            },
            "chosen": {
                "counts": counts,
                "proxy_accuracy": row["score"],
                "predicted_ms": row.get("predicted_ms"),
                "measured_ms": m["measured_ms"],
                "macs": s.macs(counts),
                "params": s.params(counts),
                "removed_blocks": plan.drop,
                "plan_hash": row["plan_hash"],
                "round": m.get("round"),  # the round of the measured search that measured it (from 0)
            },
            "held_on": store.get("statistic"),  # what the measured figures are (search/measured.py)
            "precision": self._precision_record(store, m["measured_ms"]),
            "met_budget": choice.met,
            "speedup": dense_ms / m["measured_ms"],
            "evals": len(distinct),
            "evals_to_99pct": int(np.argmax(scores >= 0.99 * scores[-1]) + 1),
            "rounds": choice.rounds,
            "seconds_per_eval": float(np.median(evaluator.seconds)) if evaluator.seconds else None,
            "seconds_scoring": round(loop.seconds, 1),
            "scoring": {**self.scoring, "batch": self.cfg.batch},
            "seconds": round(time.monotonic() - figures["started"], 1),
            "searcher": loop.searcher.state(),
        }
        if self.run is not None:
            record["files"] = self._write_run(plan, pruned, record, loop, store)
            write_json(self.run / "results.json", record)
        self.log(plan_summary(record, plan))
        return pruned, PruneResult(plan, record, None if self.run is None else self.run.path)

    def _precision_record(self, store, measured_ms: float) -> dict:
        """The precision searched and shipped; for one other than the device's own, the dense model
        at the device's own precision (what a share-of-dense budget is of) and the speedup over it."""
        record = {"searched": self.device.spec.precision, "device": self.device.name}
        reference = store.get("reference_ms")
        if self.reference is not None and reference is not None:
            record.update(
                reference_device=self.reference.name,
                reference_precision=self.reference.spec.precision,
                reference_ms=reference,
                speedup_vs_reference=reference / measured_ms,
                quantized_alone=self.alone,
            )
        return record

    def _table_record(self) -> dict | None:
        t = self.table
        if t is None:
            return None
        return {
            "path": str(self.table_path),
            "device": t.device,
            "fingerprint": t.fingerprint,
            "step": t.step,
            "entries": len(t.entries),
            "calibration": t.calibration,
            "refit": self.refit,
        }

    def keep_dense(self) -> None:
        """The dense model in the run (dense.pt): the later stages distil from it and compare with it."""
        from edgeprune.checkpoint import Checkpoint, save_checkpoint

        run, ref, config = self.run, self.ref, self.config
        if run is None or (run / "dense.pt").is_file():
            return
        meta = {
            **config.get("dense_meta", {}),
            "source": config.get("weights") or "python",
            "model_hash": config["model_hash"],
        }
        shape = tuple(self.x.shape[1:])
        ckpt = Checkpoint(ref.name, ref.num_classes, shape, config.get("data"), self.model.state_dict(), meta, ref=ref)
        save_checkpoint(ckpt, run / "dense.pt")

    def _write_run(self, plan, pruned, record, loop, store) -> dict:
        from edgeprune.checkpoint import Checkpoint, save_checkpoint
        from edgeprune.report import convergence_plot, scatter_plot

        run, ref, c, budget_ms = self.run, self.ref, record["chosen"], record["budget_ms"]
        plan.save(run / "plan.json")
        meta = {
            "base_checkpoint": str(run / "dense.pt"),
            "dense_hash": self.config["model_hash"],  # which weights it was pruned from (RunDir.check_lineage)
            "proxy_accuracy": c["proxy_accuracy"],
            "measured_ms": c["measured_ms"],
        }
        shape, data = tuple(self.x.shape[1:]), self.config.get("data")
        pruned_ckpt = Checkpoint(ref.name, ref.num_classes, shape, data, pruned.state_dict(), meta, plan.to_dict(), ref)
        save_checkpoint(pruned_ckpt, run / "pruned.pt")
        distinct = [r for r in loop.rows if not r["duplicate"]]
        convergence_plot(
            {record["search"]: [r["score"] for r in distinct]},
            run / "convergence.png",
            title=f"{record['search']} on {ref.id}, budget {budget_ms:.4g} ms ({record['cost']})",
        )
        scatter_plot(
            loop.rows,
            run / "scatter.png",
            budget_ms=budget_ms,
            measured=store.measurements(),
            chosen={"measured_ms": c["measured_ms"], "score": c["proxy_accuracy"]},
            search_budgets=record["cost"] == "latency",  # a FLOPs search's budgets are shares of MACs
            title=f"{ref.id}: proxy score vs latency on {self.device.name}",
        )
        names = ("plan.json", "pruned.pt", "dense.pt", "convergence.png", "scatter.png", "evals.sqlite")
        return {k: str(run / k) for k in names}


def prune(
    model: nn.Module,
    example_input: torch.Tensor | tuple[int, ...],
    *,
    device,
    budget: str | float | Budget,
    data=None,
    score_fn=None,
    train_data=None,
    loss_fn=None,
    input_fn=None,
    table=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    model_ref=None,
    workers: int | None = None,
    ray: str | None = None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    progress: bool = True,
    log=print,
    noise=None,
    _extra: dict | None = None,
    **settings,
):
    """Prune `model` to `budget` on `device`; returns (pruned model, PruneResult).

    `data`: a classification data set (an edgeprune Dataset or its name: top-1 on its held-out
    split scores candidates); or `score_fn(model) -> float` (higher is better) with `train_data`
    (an iterable of batches: BatchNorm recalibration, and distillation with `loss_fn`) for any
    task. `table`: a LatencyTable or its path (default: the device's table of this model).
    `settings`: PruneSettings fields (search, evals, ...). `run_dir`: log there (and resume).
    `workers=N` scores candidates on a local Ray of N workers, `ray="auto" | ADDRESS` on a cluster
    you run, each task asking `worker_cpus` and `worker_gpus` (see edgeprune/cluster/). `noise`: the
    run's NoiseNote (latency/interleave.py) where this prune is a stage of a longer run (default: its own)."""
    from edgeprune.devices import Device
    from edgeprune.models.onnx import example_tensor
    from edgeprune.task import make_task

    if settings.get("precision") == "auto":  # a prune at each precision, the better plan kept
        from edgeprune.pipeline.precision import prune_each_precision

        given = locals()
        call = {k: given[k] for k in inspect.signature(prune).parameters if k != "settings"}
        return prune_each_precision(prune, call, {k: v for k, v in settings.items() if k != "precision"})
    started = time.monotonic()
    model, x, ref = model.eval(), example_tensor(example_input), _reference(model, model_ref)
    budget = Budget.parse(budget)
    cluster = ClusterOptions(workers=workers, address=ray, worker_cpus=worker_cpus, worker_gpus=worker_gpus)
    device_name = device if isinstance(device, (str, os.PathLike)) else device.spec.path or device.name
    device = Device.load(device) if isinstance(device, (str, os.PathLike)) else device
    run = None if run_dir is None else RunDir(run_dir)
    inputs = {
        "model": ref.to_dict(),
        "model_id": ref.id,
        "device": str(device_name),
        "budget": str(budget),
        **_data_inputs(data, score_fn),
        "input_shape": list(x.shape),
        "model_hash": model_hash(model),
        "table": None if table is None or not isinstance(table, (str, os.PathLike)) else str(table),
        **(_extra or {}),  # the CLI's: how the model and data were named
    }
    PruneSettings.create(settings)  # every value checked before the run folder is made
    with run.writing() if run is not None else contextlib.nullcontext():  # one writer per run folder
        config, cfg = _run_config(run, resume, inputs, settings)
        task = make_task(
            data=data,
            score_fn=score_fn,
            train_data=train_data,
            loss_fn=loss_fn,
            input_fn=input_fn,
            heldout_images=cfg.heldout_images,
        )
        searched = device.at_precision("int8") if cfg.precision == "int8" else device
        job = Pruning(model, x, ref, searched, budget, run, config, cfg, task, log)
        job.reference = device if searched is not device else None
        job.noise = noise
        return job.run_from(table, cluster, resume=resume, progress=progress, started=started)


def _data_inputs(data, score_fn) -> dict:
    """What the run's config records of its data: the data set's name and options, or a custom task."""
    return {
        "data": getattr(data, "name", data),
        "data_options": getattr(data, "options", None) or None,
        "task": "custom" if score_fn is not None else "top-1",
    }


def default_batch(session, evals: int) -> int:
    """One candidate per worker, but at most a third of the evaluations (a batch of q is chosen on
    what the searcher knew before it: the larger q, the less each choice learns)."""
    return 1 if session is None else max(1, min(session.slots, evals // 3))


def _reference(model: nn.Module, model_ref):
    from edgeprune.models.reference import ModelRef

    if isinstance(model_ref, ModelRef):
        return model_ref
    return ModelRef.python(model) if model_ref is None else ModelRef.parse(str(model_ref))


def profile_advice(config: dict, ref, *, step: int | None = None, out=None, recalibrate: bool = False) -> str:
    """The command that profiles this model on this device (prune's warnings end with it): the
    model as the CLI was given it, or the call in Python for a model passed in Python."""
    if not config.get("model_args") and ref.kind in ("python", "pickle"):
        args = [f"device={config['device']!r}", f"out={str(out or 'TABLE')!r}"]
        args += [f"step={step}"] if step else []
        args += ["recalibrate=True"] if recalibrate else []
        return f"edgeprune.profile(model, example_input, {', '.join(args)})"
    model = config.get("model_args") or f"--model {ref.name}" + "".join(
        f" --model-arg {k}={v}" for k, v in ref.kwargs.items()
    )
    shape = ",".join(map(str, config["input_shape"]))
    command = f"edgeprune profile {model} --device {config['device']} --input-shape {shape}"
    command += f" --step {step}" if step else ""
    command += f" --out {out}" if out else ""
    return command + (" --recalibrate" if recalibrate else "")


def prune_run(
    out: str | os.PathLike, *, resume: bool = False, progress: bool = True, log=print, noise=None, **given
) -> dict:
    """The CLI's prune: the model named by `given` (model, weights, model_kwargs, num_classes,
    trust_pickle; data, data_root, image_size, mean, std; device, budget, table and PruneSettings
    fields) pruned into the run folder `out`; returns results.json. `resume=True` continues the
    run in `out` from its own files (its dense.pt, data and device), with what `given` repeats.
    `noise`: the NoiseNote of the run this prune is a stage of (`edgeprune run`'s)."""
    from edgeprune.resolve import MODEL_OPTIONS, check_classes, resolve

    run = RunDir(out)
    settings = {k: v for k, v in given.items() if k in PruneSettings.names()}
    unknown = set(given) - PruneSettings.names() - set(MODEL_OPTIONS) - {"device", "budget", "table"} - set(CLUSTER)
    if unknown:
        raise EdgepruneError(f"unknown prune setting(s) {sorted(unknown)}")
    PruneSettings.create(settings)  # every value checked before any expensive work
    cluster = {k: given[k] for k in CLUSTER if given.get(k) is not None}
    ClusterOptions(**{CLUSTER[k]: v for k, v in cluster.items()})
    if given.get("budget") is not None:
        Budget.parse(given["budget"])
    _check_device_and_table(given)
    if resume and (run / CONFIG).is_file():
        config = run.config
        model_args = config.get("model_args")
        r = resolve(
            weights=str(run / "dense.pt"),
            data=config.get("data"),
            data_root=config.get("data_root"),
            **_image_args(config.get("data_options")),
        )
        device, budget = given.get("device") or config["device"], given.get("budget") or config["budget"]
    else:
        missing = [f"--{k}" for k in ("device", "budget") if given.get(k) is None]
        if not given.get("model") and not given.get("weights"):
            missing.insert(0, "--weights (or --model)")
        if missing and not resume:
            raise EdgepruneError(f"prune needs {', '.join(missing)}")
        if resume:
            raise EdgepruneError(f"{out} holds no pruning run to resume ({CONFIG} missing); start one without --resume")
        r = resolve(**{k: given.get(k) for k in MODEL_OPTIONS}, log=log)
        model_args = r.args
        device, budget = given["device"], given["budget"]
    if r.data is None:
        raise EdgepruneError(
            f"{r.source} names no data set: give --data (fashion-mnist, digits, cifar10, imagefolder:PATH); other "
            "tasks prune from Python with score_fn= (see README)"
        )
    check_classes(r)
    extra = {
        "model_args": model_args,
        "weights": r.source,
        "data_root": given.get("data_root"),
        "data_options": r.data_options or None,
        "dense_meta": {
            k: v
            for k, v in (r.checkpoint.meta if r.checkpoint else {}).items()
            if k in ("test_accuracy", "heldout_accuracy", "recipe", "data_options")
        },
    }
    _, result = prune(
        r.model,
        r.shape,
        device=device,
        budget=budget,
        data=r.data,
        table=given.get("table"),
        run_dir=out,
        resume=resume,
        model_ref=r.ref,
        progress=progress,
        log=log,
        noise=noise,
        _extra=extra,
        **cluster,
        **settings,
    )
    return result.record


def _check_device_and_table(given: dict) -> None:
    """The device profile read and a named table's file there, before the model and data load."""
    from edgeprune.devices import Device

    if given.get("device") is not None:
        Device.load(given["device"])
    table = given.get("table")
    if table and given.get("cost", "latency") == "latency" and not Path(table).is_file():
        raise EdgepruneError(f"latency table {table} does not exist; create it with `edgeprune profile`")


CLUSTER = {"workers": "workers", "ray": "address", "worker_cpus": "worker_cpus", "worker_gpus": "worker_gpus"}


def _image_args(options: dict | None) -> dict:
    options = options or {}
    return {"image_size": options.get("size"), "mean": options.get("mean"), "std": options.get("std")}
