"""`edgeprune run CONFIG.yaml`: profile -> prune -> finetune -> export -> validate -> report.

Each stage is the library function of its CLI verb. The run directory records which stages
finished (pipeline.json); running the same config again skips them and resumes an interrupted one
(the search from its SQLite store, the finetune from its resume file). Without a config, the
quickstart: the shipped resnet20 on Fashion-MNIST, pruned by BOCR to half its measured latency
with ONNX Runtime on this CPU.

A config (YAML; every key but `weights` and `device` optional):

    name: resnet20-half            # run directory runs/NAME (or `out: PATH`)
    weights: zoo:resnet20-fashion-mnist
    device: cpu-onnxruntime
    table: latency_tables/cpu-onnxruntime/resnet20.json   # profiled first when missing
    profile: {step: 16, calibrate: 24}
    prune: {budget: 50%, search: bocr, evals: 40}          # any `edgeprune prune` setting
    finetune: {epochs: 2, lr: 0.05}                        # epochs: 0 skips finetuning
    export: {formats: [onnx, openvino]}
    validate: {claim_speedup: 3.87}
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import yaml

from edgeprune.errors import EdgepruneError
from edgeprune.runs import write_json

STAGES = ("profile", "prune", "finetune", "export", "validate", "report")
SECTIONS = {"name", "out", "model", "weights", "data", "data_root", "device", "table", *STAGES}

QUICKSTART = {
    "name": "quickstart",
    "weights": "zoo:resnet20-fashion-mnist",
    "device": "cpu-onnxruntime",
    "prune": {"budget": "50%", "search": "bocr", "evals": 30},
    "finetune": {"epochs": 1, "lr": 0.05},
    "export": {"formats": ["onnx"]},
    "validate": {},
}


def load_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"config {path} does not exist (examples: configs/*.yaml)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EdgepruneError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise EdgepruneError(f"config {path} must be a mapping of sections (weights, device, prune, ...)")
    return cfg


def check_config(cfg: dict) -> dict:
    unknown = set(cfg) - SECTIONS
    if unknown:
        raise EdgepruneError(f"unknown config section(s) {sorted(unknown)}; known: {', '.join(sorted(SECTIONS))}")
    missing = [k for k in ("weights", "device") if not cfg.get(k)]
    if missing:
        raise EdgepruneError(f"the config needs {' and '.join(missing)}")
    known = stage_settings()
    for stage in STAGES:
        if cfg.get(stage) is not None and not isinstance(cfg[stage], dict):
            raise EdgepruneError(f"config section {stage!r} must be a mapping, got {cfg[stage]!r}")
        unknown = set(cfg.get(stage) or {}) - known[stage]
        if unknown:  # here, not minutes later when the stage starts
            raise EdgepruneError(
                f"unknown {stage} setting(s) {sorted(unknown)} in the config; known: {', '.join(sorted(known[stage]))}"
            )
    return cfg


def stage_settings() -> dict[str, set[str]]:
    """What each config section may set: the keyword arguments of its stage's function (those
    the pipeline sets itself left out)."""
    from edgeprune.pipeline.export import export_run
    from edgeprune.pipeline.finetune import finetune
    from edgeprune.pipeline.prune import PruneConfig
    from edgeprune.pipeline.validate import validate

    def keywords(fn, *own: str) -> set[str]:
        params = inspect.signature(fn).parameters.values()
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"progress", "log", *own}

    return {
        "profile": {"step", "calibrate"},
        "prune": PruneConfig.names() - {"weights", "device", "table", "data", "data_root"},
        "finetune": keywords(finetune),
        "export": keywords(export_run),
        "validate": keywords(validate, "report"),  # progress and log: the pipeline's
        "report": set(),
    }


def run_pipeline(
    config: dict | str | os.PathLike | None = None,
    *,
    runs_root: str | os.PathLike = "runs",
    progress: bool = True,
    log=print,
) -> dict:
    """Run (or resume) every stage of `config` (default: the quickstart); returns a summary."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.devices import Device
    from edgeprune.latency.table import default_table
    from edgeprune.pipeline.export import export_run
    from edgeprune.pipeline.finetune import finetune
    from edgeprune.pipeline.prune import prune
    from edgeprune.pipeline.validate import validate
    from edgeprune.report import write_report
    from edgeprune.runs import RunStore
    from edgeprune.zoo import resolve_weights

    cfg = check_config(
        dict(QUICKSTART) if config is None else config if isinstance(config, dict) else load_config(config)
    )
    ckpt = load_checkpoint(resolve_weights(cfg["weights"]))
    if cfg.get("model") and cfg["model"] != ckpt.model:
        raise EdgepruneError(f"config names model {cfg['model']!r}, the checkpoint holds {ckpt.model!r}")
    device = Device.load(cfg["device"])
    name = cfg.get("name") or f"{ckpt.model}-{device.name}"
    run = Path(cfg.get("out") or Path(runs_root) / name)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "pipeline.json"
    state = _load_state(state_path)
    if state.get("config") not in (None, cfg):
        raise EdgepruneError(f"{run} was run with another config; use another name/out, or delete {state_path}")
    state["config"] = cfg

    def table(writing: bool = False) -> Path:
        """The config's table, else this device setup's (latency/table.py), looked up when needed."""
        return Path(cfg.get("table") or default_table(device.name, ckpt.model, device.fingerprint, writing=writing))

    prune_settings = dict(cfg.get("prune") or {})
    started = time.monotonic()

    def stage(name: str, fn) -> None:
        if state["stages"].get(name) == "done":
            log(f"[{name}] done before: skipped")
            return
        log(f"[{name}]")
        t0 = time.monotonic()
        fn()
        state["stages"][name] = "done"
        state["seconds"][name] = round(state["seconds"].get(name, 0) + time.monotonic() - t0, 1)
        write_json(state_path, state)

    def do_profile() -> None:
        existing = table()
        if prune_settings.get("cost", "latency") != "latency" or existing.is_file() and _complete(existing):
            return  # an existing table is reused (prune warns where it is another device setup's)
        from edgeprune.latency.profiler import profile

        opts = cfg.get("profile") or {}
        profile(
            model=ckpt.build(),
            model_id=ckpt.model,
            input_shape=(1, *ckpt.input_shape),
            device=device,
            out=table(writing=True),  # beside a half-profiled table of another setup, not into it
            step=opts.get("step"),
            calibrate=opts.get("calibrate", 24),
            progress=progress,
            log=log,
        )

    def do_prune() -> None:
        settings = {
            "weights": cfg["weights"],
            "device": cfg["device"],
            "data": cfg.get("data"),
            "data_root": cfg.get("data_root"),
            **prune_settings,
        }
        resume = (run / "config.json").is_file()
        if resume and (run / "results.json").is_file():
            return
        found = None if resume else table()  # a resume reads the table its run started on (config.json)
        if found is not None and (prune_settings.get("cost", "latency") == "latency" or found.is_file()):
            settings["table"] = str(found)
        settings.setdefault("budget", "50%")
        prune(run, resume=resume, progress=progress, log=log, **({k: v for k, v in settings.items() if v is not None}))

    def do_finetune() -> None:
        opts = dict(cfg.get("finetune") or {})
        if opts.get("epochs", 1) == 0:
            return
        finetune(run, progress=progress, log=log, **opts)

    def do_export() -> None:
        opts = dict(cfg.get("export") or {})
        export_run(run, formats=opts.pop("formats", ["onnx"]), log=log, **opts)

    def do_validate() -> None:
        validate(
            run,
            device=(cfg.get("validate") or {}).get("device"),
            report=False,  # the report stage writes it
            progress=progress,
            log=log,
            **{k: v for k, v in (cfg.get("validate") or {}).items() if k != "device"},
        )

    stage("profile", do_profile)
    stage("prune", do_prune)
    stage("finetune", do_finetune)
    stage("export", do_export)
    stage("validate", do_validate)
    stage("report", lambda: write_report(run))
    RunStore(run).close()
    return _summary(run, time.monotonic() - started)


def _complete(table: Path) -> bool:
    from edgeprune.latency.table import LatencyTable

    t = LatencyTable.load(table)
    return t.calibration.get("n", 0) > 0 and "configurations" in t.meta


def _load_state(path: Path) -> dict:
    import json

    state = json.loads(path.read_text()) if path.is_file() else {}
    state.setdefault("stages", {})
    state.setdefault("seconds", {})
    return state


def _summary(run: Path, seconds: float) -> dict:
    import json

    def load(name):
        p = run / name
        return json.loads(p.read_text()) if p.is_file() else None

    results, fine, val, export = (
        load("results.json"),
        load("finetune.json"),
        load("validation.json"),
        load("export.json"),
    )
    manifest = json.loads(Path(export["manifest"]).read_text()) if export else None
    return {
        "run_dir": str(run),
        "model": results["model"] if results else None,
        "device": results["device"] if results else None,
        # the budget the verdict was held against: a share of dense is of the dense model measured then
        "budget_ms": val["budget_ms"] if val else (results["budget_ms"] if results else None),
        "dense_test_accuracy": val["dense_test_accuracy"] if val else None,
        "pruned_test_accuracy": val["test_accuracy"] if val else (fine or {}).get("test_accuracy"),
        "dense_ms": val["dense_measured"]["median_ms"] if val else None,
        "measured_ms": val["measured"]["median_ms"] if val else None,
        "meets_budget": val["meets_budget"] if val else None,
        "predicted_ms": val["predicted_ms"] if val else None,
        "prediction_error_pct": val["prediction_error_pct"] if val else None,
        # the search's prediction, carried by the dense model's ratio now / then (validate.py)
        "prediction_carried": bool(val) and val.get("predicted_at_search_ms") not in (None, val["predicted_ms"]),
        "speedup": val["speedup"] if val else None,
        "onnx": manifest["formats"]["onnx"]["path"] if manifest else None,
        "report": str(run / "report.html"),
        "stages": load("pipeline.json")["seconds"],
        "seconds": round(seconds, 1),
    }
