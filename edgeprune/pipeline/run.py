"""`edgeprune run CONFIG.yaml`: [train ->] profile -> prune -> finetune -> export -> validate -> report.

Each stage is the library function of its CLI verb. The run directory records which stages
finished (pipeline.json); running the same config again skips them and resumes an interrupted one
(the search from its SQLite store, the finetune from its resume file). Without a config, the
quickstart: the shipped resnet20 on Fashion-MNIST, pruned by BOCR to half its measured latency
with ONNX Runtime on this CPU.

A config (YAML; `device` and a model (`weights`, or `model` with a `train` section) required):

    name: pets-3ms                 # run directory runs/NAME (or `out: PATH`)
    model: resnet18                # a name, path/to/file.py:factory or package.module:factory
    model_kwargs: {width: 16}      # the factory's keyword arguments
    weights: torchvision:ResNet18_Weights.IMAGENET1K_V1   # a checkpoint, a state dict, torchvision's ...
    data: imagefolder:/data/pets   # with image_size, mean, std where not the weights' own
    train: {epochs: 5, lr: 0.01}   # finetune the dense model on the data first (the head follows its classes)
    device: cpu-onnxruntime
    table: latency_tables/cpu-onnxruntime/resnet18.json   # profiled first when missing
    profile: {step: 16, calibrate: 24}
    prune: {budget: 50%, search: bocr, evals: 40}          # any `edgeprune prune` setting
    finetune: {epochs: 2, lr: 0.05}                        # epochs: 0 skips finetuning
    export: {formats: [onnx, openvino]}
    validate: {claim_speedup: 3.87}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from edgeprune.checks import check_values
from edgeprune.errors import EdgepruneError
from edgeprune.resolve import MODEL_OPTIONS, SHAPE_RULES, parse_floats
from edgeprune.runs import RunDir, write_json

STAGES = ("train", "profile", "prune", "finetune", "export", "validate", "report")
SECTIONS = {"name", "out", "device", "table", *MODEL_OPTIONS, *STAGES}

QUICKSTART = {
    "name": "quickstart",
    "weights": "zoo:resnet20-fashion-mnist",
    "device": "cpu-onnxruntime",
    "prune": {"budget": "50%", "search": "knapsack", "evals": 30},
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
    """Every section and setting checked before the first stage: a misspelt or out-of-range
    setting is one line now, not a failure minutes later."""
    from edgeprune.cluster.session import ClusterOptions
    from edgeprune.pipeline.prune import CLUSTER
    from edgeprune.pipeline.settings import PruneSettings

    unknown = set(cfg) - SECTIONS
    if unknown:
        raise EdgepruneError(f"unknown config section(s) {sorted(unknown)}; known: {', '.join(sorted(SECTIONS))}")
    if not cfg.get("device"):
        raise EdgepruneError("the config needs a device")
    if not cfg.get("weights") and not (cfg.get("model") and cfg.get("train")):
        raise EdgepruneError("the config needs weights (or a model with a train section that trains it)")
    known = stage_settings()
    for stage in STAGES:
        if cfg.get(stage) is not None and not isinstance(cfg[stage], dict):
            raise EdgepruneError(f"config section {stage!r} must be a mapping, got {cfg[stage]!r}")
        unknown = set(cfg.get(stage) or {}) - known[stage]
        if unknown:  # here, not minutes later when the stage starts
            raise EdgepruneError(
                f"unknown {stage} setting(s) {sorted(unknown)} in the config; known: {', '.join(sorted(known[stage]))}"
            )
    _check_stage_values(cfg)
    check_values({k: cfg.get(k) for k in SHAPE_RULES}, SHAPE_RULES, where="config", as_flag=False)
    parse_floats(cfg.get("mean"), "mean"), parse_floats(cfg.get("std"), "std", positive=True)
    prune = dict(cfg.get("prune") or {})
    try:
        PruneSettings.create({k: v for k, v in prune.items() if k != "budget" and k not in CLUSTER}, as_flag=False)
        ClusterOptions(**{CLUSTER[k]: v for k, v in prune.items() if k in CLUSTER})
        if prune.get("budget") is not None:
            from edgeprune.search.budget import Budget

            Budget.parse(prune["budget"])
    except EdgepruneError as e:
        raise EdgepruneError(f"config section prune: {e}") from None
    return cfg


def _check_stage_values(cfg: dict) -> None:
    """Each stage section's values checked by the rules its stage function checks them with, and
    kept as those rules read them (a YAML `epochs: 2.0` is 2); an error names its section."""
    from edgeprune.checks import check_torch_device
    from edgeprune.formats import parse_formats
    from edgeprune.latency.profiler import check_options as check_profile
    from edgeprune.pipeline.export import RULES as EXPORT
    from edgeprune.pipeline.finetune import RULES as FINETUNE
    from edgeprune.pipeline.validate import RULES as VALIDATE
    from edgeprune.training.train import RECIPE_RULES

    rules = {"train": RECIPE_RULES, "finetune": FINETUNE, "export": EXPORT, "validate": VALIDATE}
    for stage in ("train", "profile", "finetune", "export", "validate"):
        section = dict(cfg.get(stage) or {})
        if not section or (stage == "finetune" and section.get("epochs") == 0):  # epochs: 0 skips it
            continue
        try:
            if stage == "profile":
                check_profile(**section, as_flag=False)
                continue
            cfg[stage] = {**section, **check_values(section, rules[stage], where=stage, as_flag=False)}
            if stage == "export":
                parse_formats(section.get("formats", ["onnx"]))
            if stage == "finetune" and "device" in section:
                check_torch_device(section["device"])
        except EdgepruneError as e:
            raise EdgepruneError(f"config section {stage}: {e}") from None


def stage_settings() -> dict[str, set[str]]:
    """What each config section may set: the names its stage's rules check (the same rules check
    the CLI's options and the Python keywords)."""
    from edgeprune.pipeline.export import RULES as EXPORT
    from edgeprune.pipeline.finetune import RULES as FINETUNE
    from edgeprune.pipeline.prune import CLUSTER
    from edgeprune.pipeline.settings import PruneSettings
    from edgeprune.pipeline.validate import RULES as VALIDATE
    from edgeprune.training.train import RECIPE_RULES

    return {
        "train": set(RECIPE_RULES),
        "profile": {"step", "calibrate"},  # what the pipeline passes on (checked by the profile's rules)
        "prune": PruneSettings.names() | {"budget"} | set(CLUSTER),  # where it runs: local, or on Ray
        "finetune": set(FINETUNE),
        "export": set(EXPORT),
        "validate": set(VALIDATE),
        "report": set(),
    }


class Pipeline:
    """One run of a config: its folder, its state (pipeline.json), and each stage as a method."""

    def __init__(self, cfg: dict, run: Path, progress: bool, log) -> None:
        from edgeprune.devices import Device
        from edgeprune.latency.interleave import NoiseNote

        self.cfg, self.run, self.progress, self.log = cfg, RunDir(run), progress, log
        self.device = Device.load(cfg["device"])
        self.state_path = run / "pipeline.json"
        self.state = _load_state(self.state_path)
        self._config_changed(self.state.get("config"), cfg)
        self.state["config"] = cfg
        self.prune_settings = dict(cfg.get("prune") or {})
        self.noise = NoiseNote()  # the run's: a noisy device is said once, by whichever stage sees it first

    def _config_changed(self, before: dict | None, cfg: dict) -> None:
        """A config may change until the search has started (a corrected budget after a start that
        failed): the stages done run again with it, except a train stage whose inputs are the same.
        After, the run is that config's: another one is refused."""
        if before in (None, cfg):
            return
        if (self.run / "config.json").is_file():
            raise EdgepruneError(
                f"{self.run} was run with another config; use another name/out, or delete {self.state_path}"
            )
        same_model = all(before.get(k) == cfg.get(k) for k in (*MODEL_OPTIONS, "train"))
        self.state["stages"] = {k: v for k, v in self.state["stages"].items() if k == "train" and same_model}
        self.log(f"the config of {self.run} changed before its search started: its stages run again with this one")

    def model_inputs(self, *, trained: bool = True) -> dict:
        """How the config names the dense model (after the train stage: the checkpoint it wrote)."""
        given = {k: self.cfg.get(k) for k in MODEL_OPTIONS}
        if trained and self.cfg.get("train"):
            given.update(
                model=None,
                weights=str(self.run / "trained.pt"),
                model_kwargs=None,
                num_classes=None,
                trust_pickle=False,
            )
        return given

    def stage(self, name: str, fn) -> None:
        if self.state["stages"].get(name) == "done":
            self.log(f"[{name}] done before: skipped")
            return
        self.log(f"[{name}]")
        t0 = time.monotonic()
        fn()
        self.state["stages"][name] = "done"
        self.state["seconds"][name] = round(self.state["seconds"].get(name, 0) + time.monotonic() - t0, 1)
        write_json(self.state_path, self.state)

    def train(self) -> None:
        """Train (or finetune from its weights) the dense model on the config's data: RUN/trained.pt."""
        from edgeprune.resolve import parse_model_args, resolve
        from edgeprune.training import Recipe, train

        given = self.model_inputs(trained=False)
        if not given["data"]:
            raise EdgepruneError("the train section needs data (the data set to train on)")
        r = resolve(**given, log=self.log)  # the data, sized and normalised as the weights want
        train(
            model=given["model"],
            weights=given["weights"],
            data=r.data,
            out=self.run / "trained.pt",
            recipe=Recipe(**self.cfg["train"]),
            model_kwargs=parse_model_args(given["model_kwargs"]),
            trust_pickle=bool(given["trust_pickle"]),
            progress=self.progress,
            log=self.log,
        )

    def table(self, r, writing: bool = False) -> Path:
        from edgeprune.latency.table import find_table

        return find_table(self.device, r.id, self.cfg.get("table"), writing=writing)

    def profile(self) -> None:
        from edgeprune.latency.profiler import profile
        from edgeprune.resolve import resolve

        if self.prune_settings.get("cost", "latency") != "latency":
            return
        r = resolve(**self.model_inputs(), load_data=False, log=self.log)
        existing = self.table(r)
        other = self._profile_first(existing) if existing.is_file() else None  # another setup's, to replace
        if existing.is_file() and _complete(existing, r) and other is None:
            return  # an existing table is reused (prune warns where it is another device setup's)
        opts = self.cfg.get("profile") or {}
        profile(
            r.model,
            r.shape,
            model_id=r.id,
            device=self.device,
            out=self.table(r, writing=True),
            step=opts.get("step") or (other.step if other else None),
            calibrate=opts.get("calibrate", 24),
            sample=opts.get("sample"),
            progress=self.progress,
            log=self.log,
        )

    def _profile_first(self, existing: Path):
        """The table at `existing` where this device is profiled although it exists (another
        setup's, none named, and a profile takes minutes: latency/profiler.py `profiles_first`)."""
        from edgeprune.latency.profiler import profiles_first
        from edgeprune.latency.table import LatencyTable

        other = LatencyTable.load(existing)
        if self.cfg.get("table") or not profiles_first(other, self.device, other.model, self.log):
            return None
        return other

    def prune(self) -> None:
        from edgeprune.pipeline.prune import prune_run

        resume = (self.run / "config.json").is_file()
        if resume and (self.run / "results.json").is_file():
            return
        # the table: the config's, else the one prune looks up itself (find_table, as `table` does
        # here); a resume reads the table its run started on (config.json)
        settings = {"device": self.cfg["device"], **self.model_inputs(), "budget": "50%", **self.prune_settings}
        if not resume:
            settings["table"] = self.cfg.get("table")
        prune_run(
            self.run.path,
            resume=resume,
            progress=self.progress,
            log=self.log,
            noise=self.noise,
            **{k: v for k, v in settings.items() if v is not None},
        )

    def finetune(self) -> None:
        from edgeprune.pipeline.finetune import finetune_run

        opts = dict(self.cfg.get("finetune") or {})
        if opts.get("epochs", 1) == 0:
            return
        finetune_run(self.run.path, progress=self.progress, log=self.log, **opts)

    def export(self) -> None:
        from edgeprune.pipeline.export import export_run

        opts = dict(self.cfg.get("export") or {})
        export_run(self.run.path, formats=opts.pop("formats", ["onnx"]), log=self.log, **opts)

    def validate(self) -> None:
        from edgeprune.pipeline.validate import validate_run

        opts = dict(self.cfg.get("validate") or {})
        # report: its own stage
        validate_run(self.run.path, report=False, progress=self.progress, log=self.log, noise=self.noise, **opts)


def run_pipeline(
    config: dict | str | os.PathLike | None = None,
    *,
    runs_root: str | os.PathLike = "runs",
    progress: bool = True,
    log=print,
) -> dict:
    """Run (or resume) every stage of `config` (default: the quickstart); returns a summary."""
    cfg = check_config(
        dict(QUICKSTART) if config is None else config if isinstance(config, dict) else load_config(config)
    )
    name = cfg.get("name") or f"{Path(str(cfg.get('model') or cfg['weights'])).stem}-{Path(cfg['device']).stem}"
    run = Path(cfg.get("out") or Path(runs_root) / name)
    with RunDir(run).writing():  # one writer per run folder; each stage's own hold passes through
        return _run_stages(cfg, run, progress, log)


def _run_stages(cfg: dict, run: Path, progress: bool, log) -> dict:
    from edgeprune.report import write_report
    from edgeprune.runs import RunStore

    p = Pipeline(cfg, run, progress, log)
    started = time.monotonic()
    if cfg.get("train"):
        p.stage("train", p.train)
    p.stage("profile", p.profile)
    p.stage("prune", p.prune)
    p.stage("finetune", p.finetune)
    p.stage("export", p.export)
    p.stage("validate", p.validate)
    p.stage("report", lambda: write_report(run))
    RunStore(run).close()
    return _summary(RunDir(run), time.monotonic() - started)


def _complete(path: Path, r) -> bool:
    """Whether the table at `path` covers this model: profiled to the end, for its input size,
    every configuration its pruning reaches present (else profile adds what is missing)."""
    from edgeprune.latency.table import LatencyTable

    t = LatencyTable.load(path)
    if t.calibration.get("n", 0) == 0 or "configurations" not in t.meta:
        return False
    if t.input_shape and list(t.input_shape) != list(r.shape):
        return True  # another input size: prune says so in one line
    import torch

    from edgeprune.latency.layers import ModelLayers
    from edgeprune.pruning import space

    layers = ModelLayers.from_model(space(r.model, torch.randn(*r.shape), step=t.step or 8))
    return all(c.key in t.entries for c in layers.reachable())


def _load_state(path: Path) -> dict:
    state = json.loads(path.read_text()) if path.is_file() else {}
    state.setdefault("stages", {})
    state.setdefault("seconds", {})
    return state


def _summary(run: RunDir, seconds: float) -> dict:
    from edgeprune.pruning import Plan
    from edgeprune.report.report import plan_summary, referred_note

    results, fine, val, manifest = (
        run.read("results.json"),
        run.read("finetune.json"),
        run.read("validation.json"),
        run.manifest(),
    )
    plan = Plan.load(run / "plan.json") if (run / "plan.json").is_file() else None
    return {
        "run_dir": str(run),
        "model": results["model"] if results else None,
        "device": results["device"] if results else None,
        # the run's one budget figure: prune's, from the dense model it measured at its start (validate
        # holds the shipped model to this same figure)
        "budget_ms": results["budget_ms"] if results else None,
        "chosen": results["chosen"] if results else None,
        "chosen_plan": plan_summary(results, plan) if results else None,
        "dense_test_accuracy": val["dense_test_accuracy"] if val else None,
        "pruned_test_accuracy": val["test_accuracy"] if val else (fine or {}).get("test_accuracy"),
        "dense_ms": val["dense_measured"]["median_ms"] if val else None,
        "measured_ms": val["measured"]["median_ms"] if val else None,
        # what was held against the budget: the measurement, referred to the dense model at the search
        # where the budget is a share of dense (validate.py's `verdict`)
        "held_ms": val.get("held_ms", val["measured"]["median_ms"]) if val else None,
        "referred": referred_note(val) if val else "",
        "meets_budget": val["meets_budget"] if val else None,
        "verdict": val.get("verdict") if val else None,  # the outcome and the statistic it was decided on
        "predicted_ms": val["predicted_ms"] if val else None,
        "prediction_error_pct": val["prediction_error_pct"] if val else None,
        # the search's prediction, carried by the dense model's ratio now / then (validate.py)
        "prediction_carried": bool(val) and val.get("predicted_at_search_ms") not in (None, val["predicted_ms"]),
        "speedup": val["speedup"] if val else None,
        "onnx": manifest["formats"]["onnx"]["path"] if manifest else None,
        "report": str(run / "report.html"),
        "stages": run.read("pipeline.json")["seconds"],
        "seconds": round(seconds, 1),
    }
