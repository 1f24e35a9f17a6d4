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

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.pipeline.settings import PruneSettings
from edgeprune.runs import RunDir, RunStore, write_json
from edgeprune.search.budget import Budget

CONFIG = "config.json"


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
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def _table(table, device, model_id: str, shape, settings: PruneSettings, advice: str, log):
    """The latency table (None for a FLOPs search without one), checked against the model and device."""
    from edgeprune.latency.table import LatencyTable, find_table, fingerprint_diff

    if isinstance(table, LatencyTable):
        path, loaded = Path(table.meta.get("path", "(given)")), table
    else:
        path = find_table(device, model_id, table)
        if settings.cost != "latency" and not path.is_file():
            return None, None
        loaded = LatencyTable.load(path)
    loaded.check_input(shape, path, advice)
    if other := fingerprint_diff(loaded.fingerprint, device.fingerprint()):
        # the measured check holds the search to this device either way; the table only guides it
        log(
            f"warning: {path} was profiled on another device setup ({other}): its predictions may be off, and the "
            f"measured check has more to correct; a table of this device predicts better: {advice} --step "
            f"{loaded.step} (written beside it, where a new prune or run finds it)"
        )
    return path, loaded


def _latency_side(s, table, table_path, model_id, device, settings, dense_ms, advice, log):
    """The predictor (anchored on the dense model measured now) and the refit advice."""
    from edgeprune.latency.layers import ModelLayers
    from edgeprune.latency.predictor import Predictor, anchor_scale
    from edgeprune.latency.profiler import CALIBRATION_SCATTER
    from edgeprune.search import LatencyCost

    layers = ModelLayers.from_model(s)
    refit = f"{advice} --step {table.step} --out {table_path} --recalibrate"
    if why := table.other_model(model_id, layers.signature()):
        log(
            f"warning: {table_path}: {why}; its predictions rest on that model's line and the measured check has "
            f"more to correct; profile this model into it (it measures only what is missing and refits): "
            f"{advice} --step {table.step} --out {table_path}"
        )
    predictor = LatencyCost(Predictor(layers, table).compiled())
    if settings.cost == "latency" and (table.calibration.get("fit_median_abs_err") or 0) > CALIBRATION_SCATTER:
        log(
            f"warning: the table's calibration misses its own whole-model measurements by a median "
            f"{table.calibration['fit_median_abs_err']:.1%} (a quiet device: under {CALIBRATION_SCATTER:.0%}): its "
            f"predictions are rough and the measured check has more to correct; refit it when {device.name} "
            f"is quiet: {refit}"
        )
    if settings.anchor:  # the table's calibration dates from its profile; the machine may have drifted since
        predicted = float(predictor(np.asarray([s.full_counts()]))[0])
        predictor.scale = anchor_scale(table, s.full_counts(), dense_ms, predicted)
        if abs(predictor.scale - 1) > 0.1:
            log(
                f"the device measures the dense model {dense_ms:.4g} ms, {abs(predictor.scale - 1):.0%} "
                f"{'slower' if predictor.scale > 1 else 'faster'} than when the table was profiled: predictions "
                f"are scaled by {predictor.scale:.3f} (if this persists, refit the table: {refit})"
            )
    return predictor, refit


def _search_budget(s, settings, predictor, budget_ms, target_ms, dense_ms, has_budget, log, device_name, model_name):
    """(cost function, its unit, the first search budget in it, the dense model's cost)."""
    from edgeprune.search import FlopsCost

    if settings.cost == "flops":
        budget = settings.flops_target if settings.flops_target else target_ms / dense_ms
        cost = FlopsCost(s.cost, s.macs())
        return cost, "of dense MACs", budget, float(cost(np.asarray([s.full_counts()]))[0])
    if dense_ms <= target_ms:
        raise EdgepruneError(
            f"the dense {model_name} measures {dense_ms:.4g} ms on {device_name}, within the {budget_ms:.4g} ms "
            f"budget less its {settings.margin:.0%} margin: nothing to prune; lower the budget"
        )
    dense_cost = float(predictor(np.asarray([s.full_counts()]))[0])
    budget = min(target_ms, dense_cost * target_ms / dense_ms)
    if budget < 0.999 * target_ms and not has_budget:
        # the table's line misses the dense end low: held in ms, the budget would admit plans the
        # table itself says are as slow as the dense model, which the device then refuses
        log(
            f"the table predicts the dense model {dense_cost:.4g} ms, under the {dense_ms:.4g} ms measured: the "
            f"search budget starts at the same share of the prediction, {budget:.4g} ms (predicted); the measured "
            "check corrects the rest"
        )
    return predictor, "ms (predicted)", budget, dense_cost


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
    progress: bool = True,
    log=print,
    _extra: dict | None = None,
    **settings,
):
    """Prune `model` to `budget` on `device`; returns (pruned model, PruneResult).

    `data`: a classification data set (an edgeprune Dataset or its name: top-1 on its held-out
    split scores candidates); or `score_fn(model) -> float` (higher is better) with `train_data`
    (an iterable of batches: BatchNorm recalibration, and distillation with `loss_fn`) for any
    task. `table`: a LatencyTable or its path (default: the device's table of this model).
    `settings`: PruneSettings fields (search, evals, ...). `run_dir`: log there (and resume)."""
    from edgeprune.devices import Device
    from edgeprune.models.onnx import example_tensor
    from edgeprune.pruning import space
    from edgeprune.search.measured import MeasuredSearch, PlanMeter
    from edgeprune.task import make_task

    started = time.monotonic()
    model = model.eval()
    x = example_tensor(example_input)
    ref = _reference(model, model_ref)
    budget = Budget.parse(budget)
    device_name = device if isinstance(device, (str, os.PathLike)) else device.spec.path or device.name
    device = Device.load(device) if isinstance(device, (str, os.PathLike)) else device
    run = None if run_dir is None else RunDir(run_dir)
    inputs = {
        "model": ref.to_dict(),
        "model_id": ref.id,
        "device": str(device_name),
        "budget": str(budget),
        "data": getattr(data, "name", data),
        "task": "custom" if score_fn is not None else "top-1",
        "input_shape": list(x.shape),
        "model_hash": model_hash(model),
        "table": None if table is None or not isinstance(table, (str, os.PathLike)) else str(table),
        **{k: v for k, v in (_extra or {}).items() if k != "dense_meta"},  # the CLI's: how model and data were named
    }
    config, cfg = _run_config(run, resume, inputs, settings)
    task = make_task(
        data=data,
        score_fn=score_fn,
        train_data=train_data,
        loss_fn=loss_fn,
        input_fn=input_fn,
        heldout_images=cfg.heldout_images,
    )
    advice = profile_advice(config, ref)
    table_path, table_obj = _table(config.get("table") or table, device, ref.id, x.shape, cfg, advice, log)
    s = space(
        model,
        x,
        step=(table_obj.step if table_obj else None) or device.spec.channel_step or 8,
        min_keep_ratio=cfg.min_keep,
        depth=cfg.depth,
    )
    if not resume and run is not None:  # a start that failed before its search began leaves no run behind
        (run / "evals.sqlite").unlink(missing_ok=True)
    store = RunStore(None if run is None else run.path)
    meter = PlanMeter(s, device, criterion=cfg.criterion, relative=budget.relative, progress=progress, log=log)
    try:
        if store.get("dense_ms") is None:
            log(f"measuring the dense {ref.id} on {device.name} ...")
            store.set("dense_ms", meter.measure_dense())
        meter.dense_ms = dense_ms = store.get("dense_ms")
        budget_ms = budget.ms(dense_ms)
        target_ms = budget_ms * (1 - cfg.margin)  # what candidates must measure, leaving room for noise
        predictor, refit = (None, "")
        if table_obj is not None:
            predictor, refit = _latency_side(s, table_obj, table_path, ref.id, device, cfg, dense_ms, advice, log)
        cost, unit, first, dense_cost = _search_budget(
            s,
            cfg,
            predictor,
            budget_ms,
            target_ms,
            dense_ms,
            store.get("search_budget") is not None,
            log,
            device.name,
            ref.id,
        )
        from edgeprune.search import BudgetProblem

        problem = BudgetProblem.create(
            s, cost, store.get("search_budget", first), max_keep=cfg.max_keep, fix=cfg.fix, unit=unit, check=False
        )
        search = MeasuredSearch(
            problem=problem,
            meter=meter,
            store=store,
            settings=cfg,
            budget_ms=budget_ms,
            target_ms=target_ms,
            dense_cost=dense_cost,
            log=log,
        )
        search.start(first, refit)
        if run is not None:  # the budget is reachable: from here on, a run to resume
            config["table"] = None if table_path is None else str(table_path)
            write_json(run / CONFIG, {**config, **cfg.to_dict()})
            _keep_dense(run, model, ref, x, config, (_extra or {}).get("dense_meta"))
        choice, evaluator, loop = _search(
            s, task, cfg, problem, search, store, predictor, ref, device, budget_ms, dense_ms, progress, log
        )
        return _finish(
            model,
            s,
            task,
            cfg,
            choice,
            evaluator,
            loop,
            problem,
            run,
            store,
            config,
            budget_ms,
            target_ms,
            predictor,
            table_obj,
            table_path,
            ref,
            device,
            dense_ms,
            started,
        )
    finally:
        store.close()
        meter.close()


def _keep_dense(run: RunDir, model: nn.Module, ref, x: torch.Tensor, config: dict, meta: dict | None) -> None:
    """The dense model in the run (dense.pt): the later stages distil from it and compare with it."""
    from edgeprune.checkpoint import Checkpoint, save_checkpoint

    if (run / "dense.pt").is_file():
        return
    classes = ref.num_classes
    meta = {**(meta or {}), "source": config.get("weights") or "python", "model_hash": config["model_hash"]}
    ckpt = Checkpoint(ref.name, classes, tuple(x.shape[1:]), config.get("data"), model.state_dict(), meta, ref=ref)
    save_checkpoint(ckpt, run / "dense.pt")


def _search(s, task, cfg, problem, search, store, predictor, ref, device, budget_ms, dense_ms, progress, log):
    """Score plans with the proxy and run the measured search; (choice, evaluator, loop)."""
    from edgeprune.pruning import acp_widths
    from edgeprune.search import ProxyEvaluator, SearchLoop, make_searcher

    evaluator = ProxyEvaluator(
        s,
        task,
        criterion=cfg.criterion,
        calibration_batches=cfg.calibration_batches,
        seed=cfg.seed,
        train_steps=cfg.proxy_steps,
    )
    dense_score = evaluator(s.full_counts())
    store.set("dense_score", dense_score)
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

    score = f"proxy accuracy {dense_score:.2%}" if task.classification else f"proxy score {dense_score:.4g}"
    log(
        f"{ref.id} on {device.name}: dense {dense_ms:.4g} ms measured, {score}; budget {budget_ms:.4g} ms; "
        f"{cfg.search} over {problem.dim} groups, {cfg.cost} constraint {problem.budget:.4g} {problem.unit}"
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
    return search.run(loop, task), evaluator, loop


def _finish(
    model,
    s,
    task,
    cfg,
    choice,
    evaluator,
    loop,
    problem,
    run,
    store,
    config,
    budget_ms,
    target_ms,
    predictor,
    table,
    table_path,
    ref,
    device,
    dense_ms,
    started,
):
    """The pruned model (BatchNorm recalibrated), its result, and the run's files."""
    from edgeprune.training import recalibrate_bn_on

    row, m = choice.row, choice.measurement
    counts = [int(c) for c in row["counts"]]
    plan = evaluator.plan(counts)
    pruned = plan.apply(model)
    recalibrate_bn_on(pruned, task.train.inputs(20, seed=0, input_of=task.input_of))
    distinct = [r for r in loop.rows if not r["duplicate"]]
    scores = np.maximum.accumulate([r["score"] for r in distinct])
    record = {
        "run_dir": None if run is None else str(run),
        "model": ref.id,
        "dataset": config.get("data"),
        "task": task.metric,
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
        },
        "met_budget": choice.met,
        "speedup": dense_ms / m["measured_ms"],
        "evals": len(distinct),
        "evals_to_99pct": int(np.argmax(scores >= 0.99 * scores[-1]) + 1),
        "rounds": choice.rounds,
        "seconds_per_eval": float(np.median(evaluator.seconds)) if evaluator.seconds else None,
        "seconds": round(time.monotonic() - started, 1),
        "searcher": loop.searcher.state(),
    }
    if run is not None:
        record["files"] = _write_run(run, plan, pruned, ref, config, record, loop, store, budget_ms, device)
        write_json(run / "results.json", record)
    return pruned, PruneResult(plan, record, None if run is None else run.path)


def _write_run(run, plan, pruned, ref, config, record, loop, store, budget_ms, device) -> dict:
    from edgeprune.checkpoint import Checkpoint, save_checkpoint
    from edgeprune.report import convergence_plot, scatter_plot

    plan.save(run / "plan.json")
    c = record["chosen"]
    meta = {
        "base_checkpoint": str(run / "dense.pt"),
        "proxy_accuracy": c["proxy_accuracy"],
        "measured_ms": c["measured_ms"],
    }
    shape = tuple(config["input_shape"][1:])
    save_checkpoint(
        Checkpoint(
            ref.name, ref.num_classes, shape, config.get("data"), pruned.state_dict(), meta, plan.to_dict(), ref
        ),
        run / "pruned.pt",
    )
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
        title=f"{ref.id}: proxy score vs latency on {device.name}",
    )
    names = ("plan.json", "pruned.pt", "dense.pt", "convergence.png", "scatter.png", "evals.sqlite")
    return {k: str(run / k) for k in names}


def _reference(model: nn.Module, model_ref):
    from edgeprune.models.reference import ModelRef

    if isinstance(model_ref, ModelRef):
        return model_ref
    return ModelRef.python(model) if model_ref is None else ModelRef.parse(str(model_ref))


def profile_advice(config: dict, ref) -> str:
    """The command that profiles this model on this device (prune's warnings end with it): the
    model as the CLI was given it, or how to do it in Python."""
    if config.get("model_args"):
        model = config["model_args"]
    elif ref.kind in ("python", "pickle"):
        return f"edgeprune.profile(model, example_input, device={config['device']!r}, out=TABLE)"
    else:
        model = f"--model {ref.name}" + "".join(f" --model-arg {k}={v}" for k, v in ref.kwargs.items())
    return f"edgeprune profile {model} --device {config['device']}"


MODEL_INPUTS = (
    "model",
    "weights",
    "model_kwargs",
    "num_classes",
    "trust_pickle",
    "data",
    "data_root",
    "image_size",
    "mean",
    "std",
)


def prune_run(out: str | os.PathLike, *, resume: bool = False, progress: bool = True, log=print, **given) -> dict:
    """The CLI's prune: the model named by `given` (model, weights, model_kwargs, num_classes,
    trust_pickle; data, data_root, image_size, mean, std; device, budget, table and PruneSettings
    fields) pruned into the run folder `out`; returns results.json. `resume=True` continues the
    run in `out` from its own files (its dense.pt, data and device), with what `given` repeats."""
    from edgeprune.resolve import check_classes, resolve

    run = RunDir(out)
    settings = {k: v for k, v in given.items() if k in PruneSettings.names()}
    unknown = set(given) - PruneSettings.names() - set(MODEL_INPUTS) - {"device", "budget", "table"}
    if unknown:
        raise EdgepruneError(f"unknown prune setting(s) {sorted(unknown)}")
    PruneSettings.create(settings)  # every value checked before any expensive work
    if given.get("budget") is not None:
        Budget.parse(given["budget"])
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
        r = resolve(**{k: given.get(k) for k in MODEL_INPUTS}, log=log)
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
        _extra=extra,
        **settings,
    )
    return result.record


def _image_args(options: dict | None) -> dict:
    options = options or {}
    return {"image_size": options.get("size"), "mean": options.get("mean"), "std": options.get("std")}
