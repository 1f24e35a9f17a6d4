"""The `edgeprune` command: parses arguments, calls the library, prints results.

Every verb is a thin face of a library function; errors the user can fix print one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgeprune.agent.limits import OPTIONS as AGENT_LIMITS
from edgeprune.errors import EdgepruneError
from edgeprune.pipeline.settings import PruneSettings

app = typer.Typer(
    name="edgeprune",
    help="Prune CNNs to a millisecond budget measured on the target device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# not wrapped: a path or a command in a log stays whole, ready to copy (a terminal wraps it for the eye);
# no emoji codes: rich would print a fingerprint's ":CD:" or a path's ":ab:" as a picture
out = Console(soft_wrap=True, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)


def _threads(threads: int | None) -> None:
    from edgeprune.checks import THREADS, check_value

    if check_value("threads", threads, THREADS):
        import torch

        torch.set_num_threads(threads)


# how a command names the user's model: the same options everywhere (edgeprune/resolve.py reads them)
Model = Annotated[
    str | None,
    typer.Option(help="Model: a name (see `edgeprune models`), path/to/file.py:factory or package.module:factory."),
]
Weights = Annotated[
    str | None,
    typer.Option(
        help="Weights: an edgeprune checkpoint or zoo:NAME, a state dict (.pt/.pth, also under a 'state_dict' or "
        "'model' key), or torchvision:ENUM (e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1, from the local torch "
        "hub cache; nothing is downloaded)."
    ),
]
ModelArg = Annotated[
    list[str] | None, typer.Option("--model-arg", help="A factory keyword argument NAME=VALUE; repeatable.")
]
NumClasses = Annotated[
    int | None, typer.Option(help="Classes the model answers: its classifier head is replaced where they differ.")
]
TrustPickle = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Let --weights be a whole pickled module (unpickling runs code from it)."),
]
Data = Annotated[
    str | None, typer.Option(help="Data set: fashion-mnist, digits[:SIZE], cifar10[:PATH], imagefolder:PATH.")
]
DataRoot = Annotated[str | None, typer.Option(help="Folder of the data set files.")]
ImageSize = Annotated[int | None, typer.Option(help="imagefolder: image size (default: the weights' own, else 224).")]
Mean = Annotated[str | None, typer.Option(help="imagefolder: normalisation mean, R,G,B (default: ImageNet's).")]
Std = Annotated[str | None, typer.Option(help="imagefolder: normalisation std, R,G,B (default: ImageNet's).")]
InputShape = Annotated[str | None, typer.Option(help="N,C,H,W input shape (default: the data's or checkpoint's).")]


def _shape_only(model, weights, model_arg, num_classes, trust_pickle, data, image_size, input_shape):
    """The model and its input shape, as profile and predict need them (no images loaded)."""
    from edgeprune.resolve import resolve

    return resolve(
        model,
        weights,
        model_kwargs=model_arg,
        num_classes=num_classes,
        trust_pickle=trust_pickle,
        data=data,
        image_size=image_size,
        input_shape=input_shape,
        load_data=False,
    )


@app.command()
def models() -> None:
    """List model names: built-ins for small inputs, then torchvision classifiers."""
    from edgeprune.models import BUILTINS, list_models

    for name in list_models():
        out.print(f"{name}\t{'built-in' if name in BUILTINS else 'torchvision'}")


@app.command()
def train(
    out_path: Annotated[Path, typer.Option("--out", help="Checkpoint file to write.")],
    data: Annotated[str, typer.Option(help="fashion-mnist, digits[:SIZE], cifar10[:PATH] or imagefolder:PATH.")],
    model: Model = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Start from these weights (e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1); see prune."),
    ] = None,
    model_arg: ModelArg = None,
    trust_pickle: TrustPickle = False,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule to 0).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not applied to BN and biases).")] = 5e-4,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up epochs.")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batch order and augmentation.")] = 0,
    max_batches: Annotated[int | None, typer.Option(help="Batches per epoch, for smoke runs.")] = None,
    data_root: DataRoot = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    restart: Annotated[bool, typer.Option(help="Ignore an interrupted run's resume file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a model (or finetune pretrained weights on your data, the head following its classes) with SGD +
    cosine schedule; rerun the same command to resume an interrupted run."""
    from edgeprune.resolve import parse_model_args, resolve
    from edgeprune.training import Recipe
    from edgeprune.training import train as train_fn

    _threads(threads)
    if not model and not weights:
        raise EdgepruneError("name the model to train: --model (and --weights to start from trained weights)")
    recipe = Recipe(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        seed=seed,
        max_batches_per_epoch=max_batches,
    )
    log = _log(json_out)
    r = resolve(
        model,
        weights,
        model_kwargs=model_arg,
        trust_pickle=trust_pickle,
        data=data,
        data_root=data_root,
        image_size=image_size,
        mean=mean,
        std=std,
        log=lambda s: None,
    )  # the data as the weights want it
    ckpt = train_fn(
        model=model,
        weights=weights,
        data=r.data,
        out=out_path,
        recipe=recipe,
        restart=restart,
        model_kwargs=parse_model_args(model_arg),
        trust_pickle=trust_pickle,
        log=log,
    )
    _print_trained(ckpt, out_path, json_out)


def _print_trained(ckpt, out_path: Path, json_out: bool) -> None:
    result = {
        "checkpoint": str(out_path),
        "model": ckpt.model,
        "data": ckpt.dataset,
        "test_accuracy": ckpt.meta["test_accuracy"],
        "heldout_accuracy": ckpt.meta["heldout_accuracy"],
    }
    if json_out:
        print(json.dumps(result))
    else:
        out.print(
            f"wrote {out_path}: test accuracy {result['test_accuracy']:.2%}, held-out {result['heldout_accuracy']:.2%}"
        )


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str))


TABLE_HELP = "Latency table (default latency_tables/DEVICE/MODEL.json, or this device setup's own beside it)."
TABLE_OUT_HELP = (
    "Table file (default latency_tables/DEVICE/MODEL.json, or DEVICE/SETUP/MODEL.json where that one is "
    "another device setup's)."
)


@app.command()
def devices(json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List device profiles (devices/*.yaml) and whether each runtime is usable here."""
    from edgeprune.backends import BACKENDS
    from edgeprune.devices import DeviceSpec, list_profiles

    rows = []
    for name in list_profiles():
        spec = DeviceSpec.load(name)
        usable = "via agent" if spec.agent else ("yes" if BACKENDS[spec.backend].available() else "no")
        rows.append(
            {
                "name": name,
                "backend": spec.backend,
                "options": spec.options,
                "agent": spec.agent,
                "usable": usable,
                "description": spec.description,
            }
        )
    runtimes = {n: b.available() for n, b in BACKENDS.items()}
    if json_out:
        _print_json({"profiles": rows, "runtimes_here": runtimes})
        return
    table = Table(title="device profiles")
    for col in ("name", "backend", "options", "agent", "usable here"):  # names whole; options, agents folded
        table.add_column(col, no_wrap=col not in ("options", "agent"), overflow="fold")
    for r in rows:
        opts = "\n".join(f"{k}={v}" for k, v in r["options"].items())
        table.add_row(r["name"], r["backend"], opts, r["agent"] or "-", r["usable"])
    out.print(table)
    out.print("runtimes here: " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in runtimes.items()))


def _onnx_input_shape(path: Path) -> tuple[int, ...]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EdgepruneError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0][:100]})") from None
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if not dims or min(dims) < 1:
        raise EdgepruneError(f"{path} has a dynamic input shape {dims}; give --input-shape N,C,H,W")
    return tuple(dims)


@app.command()
def measure(
    model_path: Annotated[Path, typer.Argument(help="ONNX file to measure.", metavar="MODEL.onnx")],
    device: Annotated[str, typer.Option(help="Device profile name or YAML path.")] = "cpu-onnxruntime",
    input_shape: Annotated[str | None, typer.Option(help="N,C,H,W (default: the model's static input).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Measure a whole ONNX model's latency on a device with its profile's protocol."""
    from edgeprune.devices import Device
    from edgeprune.resolve import parse_shape

    if not model_path.is_file():
        raise EdgepruneError(f"{model_path} does not exist")
    shape = parse_shape(input_shape) if input_shape else _onnx_input_shape(model_path)
    dev = Device.load(device)
    m = dev.measure(model_path, shape)
    result = {
        "model": str(model_path),
        "device": dev.name,
        "input_shape": list(shape),
        **m.to_dict(),
        "fingerprint": dev.fingerprint(),
        "protocol": dev.spec.protocol.to_dict(),
    }
    if json_out:
        _print_json(result)
    else:
        out.print(
            f"{model_path} on {dev.name}: median {m.median_ms:.4f} ms, p90 {m.p90_ms:.4f} ms, "
            f"cv {m.cv:.1%}, n {m.n}, foreign CPU load {m.foreign_load:.0%} ({dev.spec.protocol.timing} timing)"
        )


@app.command()
def profile(
    model: Model = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    num_classes: NumClasses = None,
    trust_pickle: TrustPickle = False,
    device: Annotated[
        list[str] | None,
        typer.Option(
            help="Device profile name or YAML path (default cpu-onnxruntime); repeat it to profile several "
            "devices at once."
        ),
    ] = None,
    out_path: Annotated[list[Path] | None, typer.Option("--out", help=TABLE_OUT_HELP + " One per --device.")] = None,
    step: Annotated[
        str, typer.Option(help="Channel step: N, auto (detect it), or profile (the device profile's channel_step).")
    ] = "profile",
    data: Data = None,
    image_size: ImageSize = None,
    input_shape: InputShape = None,
    calibrate: Annotated[
        int,
        typer.Option(help="Random whole-model plans measured to calibrate (raised on a table: only the new ones)."),
    ] = 24,
    recalibrate: Annotated[
        bool,
        typer.Option(
            help="Measure the dense model and --calibrate plans anew, together, and refit the table's calibration "
            "on them alone (units kept): after the device drifted, in minutes instead of a whole profile."
        ),
    ] = False,
    copies: Annotated[
        int | None,
        typer.Option(
            help="Measure each unit alone (1) or in context: K summed copies against one "
            "(default: the device profile's unit_copies)."
        ),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(
            help="Measure N widths per axis of each family of configurations and interpolate the rest, checked on "
            "held-out ones; 0: measure every configuration [default: sampled (5) above 5,000 configurations]."
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a summary as JSON.")] = False,
) -> None:
    """Profile every layer configuration reachable by pruning a model into a latency table (resumable; a table of
    this device setup gets only what it lacks)."""
    from edgeprune.devices import Device
    from edgeprune.latency.profiler import check_options as check_profile
    from edgeprune.latency.profiler import profile as profile_fn
    from edgeprune.latency.table import find_table

    step_value = _step_option(step)
    check_profile(step=step_value, calibrate=calibrate, copies=copies, recalibrate=recalibrate, sample=sample)
    devices = [Device.load(d) for d in device or ["cpu-onnxruntime"]]
    r = _shape_only(model, weights, model_arg, num_classes, trust_pickle, data, image_size, input_shape)
    if out_path and len(out_path) != len(devices):
        raise EdgepruneError(f"{len(devices)} --device but {len(out_path)} --out: give one --out per --device, or none")
    targets = [
        find_table(dev, r.id, (out_path or [None] * len(devices))[i], writing=True) for i, dev in enumerate(devices)
    ]
    log = _log(json_out)
    tables = profile_fn(
        r.model,
        r.shape,
        model_id=r.id,
        device=devices if len(devices) > 1 else devices[0],
        out=targets if len(devices) > 1 else targets[0],
        step=step_value,
        copies=copies,
        calibrate=calibrate,
        recalibrate=recalibrate,
        sample=sample,
        log=log,
    )
    _print_profiled(tables if isinstance(tables, list) else [tables], targets, devices, r.id, json_out)


def _print_profiled(tables: list, targets: list, devices: list, model_id: str, json_out: bool) -> None:
    if json_out:
        summaries = [_profile_summary(t, target, dev, model_id) for t, target, dev in zip(tables, targets, devices)]
        _print_json(summaries[0] if len(summaries) == 1 else {"tables": summaries})
        return
    from edgeprune.latency.calibration import describe as describe_calibration

    for table, target in zip(tables, targets):
        cal = table.calibration
        out.print(
            f"wrote {target}: {len(table.entries)} entries at step {table.step}, "
            f"{describe_calibration(cal)} on {cal['n']} whole models "
            f"(median miss {cal.get('fit_median_abs_err') or 0:.1%})"
            + (f"; {table.meta['sampling']['interpolated']} interpolated" if table.meta.get("sampling") else "")
        )


def _step_option(step: str) -> int | str | None:
    """--step as profile takes it: None (the device profile's), "auto" or a number."""
    if step == "profile":
        return None
    if step == "auto":
        return "auto"
    if step.isdigit() and int(step) > 0:
        return int(step)
    raise EdgepruneError(f"--step must be a positive number or auto, got {step!r}")


def _profile_summary(table, target, dev, model_id: str) -> dict:
    return {
        "table": str(target),
        "device": dev.name,
        "model": model_id,
        "step": table.step,
        "unit_copies": table.unit_copies,
        "entries": len(table.entries),
        "calibration": table.calibration,
        "profile_seconds": table.meta.get("profile_seconds"),
        "sampling": table.meta.get("sampling"),  # None: every configuration measured
    }


@app.command()
def predict(
    model: Model = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    num_classes: NumClasses = None,
    trust_pickle: TrustPickle = False,
    table_path: Annotated[Path | None, typer.Option("--table", help=TABLE_HELP)] = None,
    plan: Annotated[Path | None, typer.Option(help="Plan JSON to predict (default: the dense model).")] = None,
    check: Annotated[int, typer.Option(help="Measure N random plans on --device and report the error.")] = 0,
    device: Annotated[
        str, typer.Option(help="Device profile for --check (and the default table).")
    ] = "cpu-onnxruntime",
    data: Data = None,
    image_size: ImageSize = None,
    input_shape: InputShape = None,
    strict: Annotated[bool, typer.Option(help="Refuse a table profiled on another device setup.")] = False,
    depth: Annotated[bool, typer.Option(help="--check: random plans may also remove residual blocks.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Predict a plan's latency from a table; --check N holds the predictor against the device."""
    from edgeprune.devices import Device
    from edgeprune.latency.check import check_predictor, predictor_for
    from edgeprune.latency.table import LatencyTable, find_table
    from edgeprune.pruning import Plan

    if check < 0:
        raise EdgepruneError(f"--check must be a number of plans (0: none), got {check}")
    r = _shape_only(model, weights, model_arg, num_classes, trust_pickle, data, image_size, input_shape)
    net, model_id, shape = r.model, r.id, r.shape
    dev = Device.load(device)
    table_path = find_table(dev, model_id, table_path, log=_log(json_out))  # this setup's own, where it has one
    table = LatencyTable.load(table_path, fingerprint=dev.fingerprint() if dev and strict else None, strict=strict)
    table.check_input(
        shape, table_path, f"edgeprune profile {r.args} --device {device} --input-shape {','.join(map(str, shape))}"
    )
    plan_obj = Plan.load(plan) if plan else None
    s, predictor = predictor_for(net, shape, table, depth=bool(plan_obj and plan_obj.drop))
    if why := table.other_model(model_id, predictor.layers.signature()):
        # no measurement corrects a prediction here (prune's measured check does): refuse, as prune's advice says
        raise EdgepruneError(
            f"{table_path}: {why}; a prediction of {model_id} would rest on that model's line: profile {model_id} "
            f"into a table of its own (only what it lacks is measured): edgeprune profile {r.args} --device {device} "
            f"--step {table.step}"
        )
    counts = s.counts_of(plan_obj) if plan_obj else s.full_counts()
    result = {
        "model": model_id,
        "table": str(table_path),
        "predicted_ms": predictor.predict(counts),
        "macs": s.macs(counts),
        "params": s.params(counts),
    }
    if not json_out:  # the prediction first: the check measures for a while after it
        out.print(
            f"{model_id}: predicted {result['predicted_ms']:.4f} ms ({result['macs'] / 1e6:.2f} M MACs, "
            f"{result['params']:,} params)"
        )
    if check:
        result["check"] = check_predictor(
            model=net,
            input_shape=shape,
            table=table,
            device=dev,
            n=check,
            depth=depth,
            progress=not json_out,
            log=_log(json_out),
        )
    if json_out:
        _print_json(result)
        return
    if check:
        _print_check(result["check"])


def _print_check(c: dict) -> None:
    """`predict --check`'s table: the prediction error of each predictor over the plans measured."""
    t = Table(title=f"prediction error over {len(c['plans'])} random plans measured on {c['device']}")
    for col in ("predictor", "within ±5%", "within ±10%", "median |err|", "max |err|"):
        t.add_column(col, justify="right")
    rows = (
        ("latency table", "table"),
        ("table, anchored on dense", "table_anchored"),
        ("FLOPs-proportional", "flops_baseline"),
    )
    for label, key in rows:
        e = c[key]
        t.add_row(
            label,
            f"{e['within_5']:.0%}",
            f"{e['within_10']:.0%}",
            f"{e['median_abs_pct']:.2f}%",
            f"{e['max_abs_pct']:.1f}%",
        )
    out.print(t)


Workers = Annotated[
    int | None, typer.Option(help="Score candidates (and finetune seeds) on a local Ray of N workers (loopback only).")
]
RayAddress = Annotated[
    str | None,
    typer.Option("--ray", help="Run the workers on your Ray cluster: auto, HOST:PORT or ray://HOST:10001."),
]
WorkerCpus = Annotated[float | None, typer.Option(help="CPUs each worker task asks for (default 1).")]
WorkerGpus = Annotated[
    float | None, typer.Option(help="GPUs each worker task asks for (default 0; 0.25 shares a GPU).")
]


def _prune_inputs(
    out_path: Annotated[
        Path, typer.Option("--out", help="Run directory (created; holds evals.sqlite, plan, checkpoints).")
    ],
    weights: Weights = None,
    model: Model = None,
    model_arg: ModelArg = None,
    num_classes: NumClasses = None,
    trust_pickle: TrustPickle = False,
    device: Annotated[str | None, typer.Option(help="Device profile name or YAML path.")] = None,
    budget_ms: Annotated[
        str | None, typer.Option("--budget-ms", help="Latency budget: milliseconds (2.5) or a share of dense (50%).")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Data set (default: the checkpoint's).")] = None,
    data_root: DataRoot = None,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    table: Annotated[str | None, typer.Option(help=TABLE_HELP)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out (after a crash or kill).")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (scoring).")] = None,
    workers: Workers = None,
    ray: RayAddress = None,
    worker_cpus: WorkerCpus = None,
    worker_gpus: WorkerGpus = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None: ...


def _setting_option(f) -> inspect.Parameter:
    """A CLI option for one PruneSettings field: its help, and its default shown."""
    meta, dash = f.metadata, f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = f" (default {default})" if default not in (None, []) and meta["kind"] is not bool else ""
    if meta["kind"] is bool:
        option = typer.Option(f"--{dash}/--no-{dash}", help=f"{meta['help']} (default {'on' if default else 'off'})")
        kind = bool | None
    elif meta["kind"] is list:
        option, kind = typer.Option(f"--{dash}", help=meta["help"]), list[str] | None
    else:
        option, kind = typer.Option(f"--{dash}", help=meta["help"] + shown), meta["kind"] | None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, option])


def prune_cmd(**given) -> None:
    """Search per-group widths for the most accurate plan whose latency on the device meets the budget."""
    from edgeprune.pipeline.prune import prune_run

    _threads(given.pop("threads"))
    json_out, out_path, resume = given.pop("json_out"), given.pop("out_path"), given.pop("resume")
    given["budget"] = given.pop("budget_ms")
    given["model_kwargs"] = given.pop("model_arg") or None
    log = _log(json_out)
    result = prune_run(out_path, resume=resume, log=log, **{k: v for k, v in given.items() if v not in (None, [])})
    if json_out:
        _print_json(result)
        return
    _print_pruned(result)


# the prune command's options: its inputs, then every PruneSettings field (defined once, in pipeline/settings.py)
prune_cmd.__signature__ = inspect.Signature(
    [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(_prune_inputs, eval_str=True).parameters.values()
    ]
    + [_setting_option(f) for f in dataclasses.fields(PruneSettings)]
)
prune_cmd.__annotations__ = {p.name: p.annotation for p in prune_cmd.__signature__.parameters.values()}
app.command("prune")(prune_cmd)


def _print_pruned(result: dict) -> None:
    from edgeprune.search.measured import held_name

    d, c = result["dense"], result["chosen"]
    t = Table(
        title=f"{result['model']} pruned by {result['search']} ({result['cost']} constraint) on {result['device']}"
    )
    for col in ("model", "proxy score", "predicted ms", "measured ms", "MMACs", "params"):
        t.add_column(col, justify="right")
    score = (lambda v: f"{v:.2%}") if result.get("task") == "top-1" else (lambda v: f"{v:.4g}")
    t.add_row(
        "dense", score(d["proxy_accuracy"]), "", f"{d['measured_ms']:.4g}", f"{d['macs'] / 1e6:.2f}", f"{d['params']:,}"
    )
    pred = f"{c['predicted_ms']:.4g}" if c["predicted_ms"] is not None else ""
    t.add_row(
        "chosen",
        score(c["proxy_accuracy"]),
        pred,
        f"{c['measured_ms']:.4g}",
        f"{c['macs'] / 1e6:.2f}",
        f"{c['params']:,}",
    )
    out.print(t)
    if c.get("removed_blocks"):
        out.print(f"residual blocks removed whole: {', '.join(c['removed_blocks'])}")
    verdict = "[green]meets[/green]" if result["met_budget"] else "[red]MISSES[/red]"
    p = result.get("precision") or {}
    dense = f"{result['speedup']:.2f}x faster than dense"
    if p.get("reference_ms") is not None:  # searched at another precision: against the dense model the user has
        dense = f"{p['speedup_vs_reference']:.2f}x faster than dense {p['reference_precision']}, in {p['searched']}"
    out.print(
        f"{verdict} the {result['budget_ms']:.4g} ms budget ({held_name(result.get('held_on'))} "
        f"{c['measured_ms']:.4g} ms, {dense}); {result['evals']} evaluations, "
        f"{result['seconds_per_eval'] or 0:.2f} s each; run directory {result['run_dir']}"
    )


@app.command("finetune")
def finetune_cmd(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directory written by `edgeprune prune` (several with --seeds).", metavar="RUN"),
    ],
    epochs: Annotated[int, typer.Option(help="Finetune epochs (cosine schedule).")] = 5,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term (the rest: labels).")] = 0.9,
    seed: Annotated[int, typer.Option(help="Seed of the finetune (batch order, augmentation).")] = 0,
    seeds: Annotated[
        int | None,
        typer.Option(
            help="Finetune each RUN with N seeds (--seed onwards), each in a copy RUN/seeds/sK, as tasks (with "
            "--workers/--ray, in parallel); prints each run's mean and spread."
        ),
    ] = None,
    max_batches: Annotated[int | None, typer.Option(help="Batches per epoch, for smoke runs.")] = None,
    train_device: Annotated[str, typer.Option(help="torch device to train on (cpu, cuda).")] = "cpu",
    qat: Annotated[
        bool,
        typer.Option(
            "--qat",
            help="Then, where the model's int8 file scores more than --qat-threshold under it on the held-out "
            "images, finetune it through simulated int8 rounding, and keep that where its int8 file scores higher.",
        ),
    ] = False,
    qat_epochs: Annotated[int, typer.Option(help="Quantization-aware epochs (with --qat).")] = 1,
    qat_lr: Annotated[float, typer.Option(help="Their peak learning rate (with --qat).")] = 0.005,
    qat_threshold: Annotated[
        float, typer.Option(help="The held-out score int8 may lose before --qat trains (0.005: half a point).")
    ] = 0.005,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    workers: Workers = None,
    ray: RayAddress = None,
    worker_cpus: WorkerCpus = None,
    worker_gpus: WorkerGpus = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Finetune a run's pruned model, distilled from its dense parent; rerun to resume."""
    from edgeprune.pipeline import finetune_run
    from edgeprune.pipeline.finetune import check_options as check_finetune

    _threads(threads)
    recipe = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "temperature": temperature, "alpha": alpha}
    recipe.update(max_batches=max_batches, device=train_device)
    if qat:
        recipe.update(qat=True, qat_epochs=qat_epochs, qat_lr=qat_lr, qat_threshold=qat_threshold)
    check_finetune(**recipe, seed=seed)  # before any run is copied or a worker started
    if seeds is not None or workers is not None or ray is not None:
        n = 1 if seeds is None else seeds
        _finetune_seeds(run_dirs, seed, n, recipe, workers, ray, worker_cpus, worker_gpus, json_out)
        return
    if len(run_dirs) > 1:
        raise EdgepruneError("several runs are finetuned with --seeds N (each in copies of its own); give one RUN")
    r = finetune_run(run_dirs[0], seed=seed, log=_log(json_out), **recipe)
    if json_out:
        _print_json(r)
        return
    out.print(
        f"finetuned {r['run_dir']}: held-out {r['heldout_accuracy_before']:.2%} -> {r['heldout_accuracy']:.2%} "
        f"(best epoch {r['best_epoch']}), test {r['test_accuracy']:.2%} (dense {r['dense_test_accuracy']:.2%}); "
        f"wrote {r['checkpoint']}"
    )
    if r.get("qat") is not None:
        out.print(f"int8: {r['qat']['summary']}")


def _finetune_seeds(runs, first: int, n: int, recipe: dict, workers, ray, cpus, gpus, json_out: bool) -> None:
    from edgeprune.cluster.finetunes import finetune_seeds, seed_table

    if n < 1:
        raise EdgepruneError(f"--seeds must be at least 1, got {n}")
    cluster = {"worker_cpus": cpus, "worker_gpus": gpus}
    records = finetune_seeds(
        runs,
        seeds=range(first, first + n),
        workers=workers,
        ray=ray,
        log=_log(json_out),
        **{k: v for k, v in cluster.items() if v is not None},
        **recipe,
    )
    rows = seed_table(runs, records)
    if json_out:
        _print_json({"runs": rows, "finetunes": records})
        return
    t = Table(title=f"test accuracy after {recipe['epochs']} epochs, per seed")
    for col in ("run", *(f"seed {s}" for s in range(first, first + n)), "mean", "sd"):
        t.add_column(col, justify="right")
    for row in rows:
        accs = row["test_accuracy"]
        cells = [f"{accs[s]:.2%}" if s in accs else "-" for s in range(first, first + n)]
        mean = "-" if row["mean"] is None else f"{row['mean']:.2%}"
        sd = "-" if row["sd"] is None else f"{row['sd'] * 100:.2f}"
        t.add_row(row["run"], *cells, mean, sd)
    out.print(t)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", metavar="RUN")],
    formats: Annotated[
        str,
        typer.Option(
            "--format",
            help="Comma-separated: onnx, openvino, tensorrt, onnx-int8, openvino-int8 (int8: static QDQ "
            "quantization calibrated on training images).",
        ),
    ] = "onnx",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder (default export/RUN-NAME).")] = None,
    tensorrt_precision: Annotated[str, typer.Option(help="TensorRT engine precision: fp16 or fp32.")] = "fp16",
    accuracy_images: Annotated[
        int | None, typer.Option(help="Test images the runtimes score (default: the whole test split).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export a run's model (finetuned if it was) with parity checks and a manifest."""
    from edgeprune.pipeline import export_run

    m = export_run(
        run_dir,
        formats=formats,
        out=out_dir,
        tensorrt_precision=tensorrt_precision,
        accuracy_images=accuracy_images,
        log=_log(json_out),
    )
    if json_out:
        _print_json(m)
        return
    from edgeprune.report.report import EXPORT_HEADER, export_rows

    t = Table(title=f"{m['model']} exported from {m['source']}")
    for col in EXPORT_HEADER:
        t.add_column(col, justify="right")
    for row in export_rows(m):
        t.add_row(*row)
    out.print(t)


@app.command("validate")
def validate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Exported run directory.", metavar="RUN")],
    device: Annotated[str | None, typer.Option(help="Device profile (default: the run's).")] = None,
    claim_speedup: Annotated[
        float | None,
        typer.Option(
            help="A claimed speedup to hold against the measurement; the same structure at the other precision "
            "(int8, or fp32 for an int8 file) is measured beside it."
        ),
    ] = None,
    sparse: Annotated[bool, typer.Option(help="Also measure an unstructured-sparse model of the same size.")] = True,
    repeats: Annotated[
        int | None,
        typer.Option(
            help="Rounds of measuring the models in turn, in short windows; each model's quietest counts "
            "[default: 15 or more, spanning 15 x the protocol's min_s]."
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Measure the shipped model and its dense parent on the device: budget, prediction, speedup, accuracy.

    Rewrites the run's report.md / report.html with the result. The budget is decided on the device
    profile's verdict_statistic (median of steady runs by default; p90).
    Exits with status 1 when the shipped model misses the budget, 3 when the host was too noisy to
    decide (for scripts and CI; 2 is a usage error)."""
    from edgeprune.pipeline import validate_run

    v = validate_run(
        run_dir, device=device, claim_speedup=claim_speedup, sparse=sparse, repeats=repeats, log=_log(json_out)
    )
    if json_out:
        _print_json(v)
        raise typer.Exit(_verdict_status(v))
    from edgeprune.report.report import validation_rows

    t = Table(title=f"validation of {v['artifact']} on {v['device']}")
    for col in ("", "value", "note"):
        t.add_column(col, justify="right")
    for row in validation_rows(v):
        t.add_row(*row)
    out.print(t)
    out.print(f"report: {v['report']}")
    if status := _verdict_status(v):
        raise typer.Exit(status)


def _verdict_status(v: dict) -> int:
    """validate's exit status: 0 meets the budget, 1 misses it, 3 undecided (the host too noisy; 2 is
    a usage error)."""
    return {"meets": 0, "misses": 1, "undecided": 3}[v["verdict"]["outcome"]]


def _log(json_out: bool):
    """Progress lines: to stderr when stdout carries JSON; printed as they are (no rich markup)."""
    console = err if json_out else out
    return lambda s: console.print(s, highlight=False, markup=False)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="Pipeline config (YAML); none: the quickstart.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path("runs"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (scoring, finetuning).")] = 2,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run profile, prune, finetune, export, validate and report (resuming finished stages)."""
    from edgeprune.pipeline import run_pipeline

    _threads(threads)
    s = run_pipeline(config, runs_root=runs_dir, log=_log(json_out))
    if json_out:
        _print_json(s)
        return
    t = Table(title=f"{s['model']} on {s['device']}: budget {s['budget_ms']:.4g} ms")
    for col in ("model", "test accuracy", "measured ms", "speedup"):
        t.add_column(col, justify="right")
    t.add_row("dense", f"{s['dense_test_accuracy']:.2%}", f"{s['dense_ms']:.4g}", "1.00x")
    t.add_row("pruned", f"{s['pruned_test_accuracy']:.2%}", f"{s['measured_ms']:.4g}", f"{s['speedup']:.2f}x")
    out.print(t)
    out.print(s["chosen_plan"], markup=False, highlight=False)
    predicted = ""  # none where the search's constraint was FLOPs
    if s["predicted_ms"] is not None:
        carried = ", carried to the dense model as it measures now" if s["prediction_carried"] else ""
        predicted = f"; predicted {s['predicted_ms']:.4g} ms ({s['prediction_error_pct']:+.1f} % error{carried})"
    referred = f" ({s['referred']})" if s["referred"] else ""
    if s.get("verdict"):
        from edgeprune.latency.verdict import verdict_line

        out.print(verdict_line(s["verdict"]) + referred, markup=False, highlight=False)
        out.print(f"quietest window {s['measured_ms']:.4g} ms{predicted}", markup=False, highlight=False)
    else:
        verdict = "[green]within[/green]" if s["meets_budget"] else "[red]OVER[/red]"
        budget = f"{s['budget_ms']:.4g} ms budget"
        out.print(f"measured {s['measured_ms']:.4g} ms: {verdict} the {budget}{referred}{predicted}")
    out.print(f"ONNX: {s['onnx']}\nreport: {s['report']}\n({s['seconds']:.0f} s)")


agent_app = typer.Typer(help="Run edgeprune's measuring agent on a device.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")


@agent_app.command("serve")
def agent_serve(
    device: Annotated[str, typer.Option(help="Device profile this agent measures with.")],
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8470,
    token_file: Annotated[str | None, typer.Option(help="Token file (created owner-only on first start).")] = None,
    cache: Annotated[str | None, typer.Option(help="Cache folder (default ~/.cache/edgeprune/agent/DEVICE).")] = None,
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate (PEM); serve https. Needs --tls-key.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key (PEM) of --tls-cert.")] = None,
    max_mb: Annotated[int, typer.Option(help="Largest request accepted, in MiB.")] = AGENT_LIMITS["max_mb"],
    max_items: Annotated[int, typer.Option(help="Most models in one request.")] = AGENT_LIMITS["max_items"],
    max_queued: Annotated[
        int, typer.Option(help="Most models waiting to be measured, all clients together.")
    ] = AGENT_LIMITS["max_queued"],
    max_input_elements: Annotated[int, typer.Option(help="Largest input tensor, in elements.")] = AGENT_LIMITS[
        "max_input_elements"
    ],
    max_uploads: Annotated[int, typer.Option(help="Requests received and vetted at once.")] = AGENT_LIMITS[
        "max_uploads"
    ],
    max_connections: Annotated[int, typer.Option(help="Open connections at once.")] = AGENT_LIMITS["max_connections"],
    keep_jobs: Annotated[int, typer.Option(help="Finished jobs kept for clients to read...")] = AGENT_LIMITS[
        "keep_jobs"
    ],
    keep_hours: Annotated[float, typer.Option(help="...and for at most this many hours.")] = AGENT_LIMITS["keep_hours"],
    job_timeout: Annotated[float, typer.Option(help="Time limit of one measurement, in seconds.")] = AGENT_LIMITS[
        "job_timeout"
    ],
) -> None:
    """Serve measurements of this device to remote edgeprune clients (bearer token required)."""
    from edgeprune.agent.server import serve

    serve(
        device=device,
        host=host,
        port=port,
        token_file=token_file,
        cache=cache,
        tls_cert=tls_cert,
        tls_key=tls_key,
        log=lambda s: out.print(s, highlight=False, markup=False, soft_wrap=True),  # a log line is never folded
        max_mb=max_mb,
        max_items=max_items,
        max_queued=max_queued,
        max_input_elements=max_input_elements,
        max_uploads=max_uploads,
        max_connections=max_connections,
        keep_jobs=keep_jobs,
        keep_hours=keep_hours,
        job_timeout=job_timeout,
    )


class Stopped(Exception):
    """Ctrl-C in a verb: what was kept and the command that goes on (printed by `main`, exit 130)."""

    def __init__(self, kept: str, resume: str) -> None:
        super().__init__(kept)
        self.kept, self.resume = kept, resume


def _resume_command(verb: str, given: dict) -> str:
    """The command line as given, with what makes it resume (prune: --resume)."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--restart"]  # --restart would throw away what was kept
    if verb == "prune" and "--resume" not in args and (Path(given["out_path"]) / "config.json").is_file():
        args = [*args, "--resume"]
    return shlex.join(["edgeprune", *args])


def _what_was_kept(verb: str, given: dict) -> str:
    """What an interrupted verb leaves to resume from, read from what it wrote."""
    if verb == "prune":
        db = Path(given["out_path"]) / "evals.sqlite"
        if not (Path(given["out_path"]) / "config.json").is_file():
            return "the search had not started: nothing to keep"
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(db)) as con:
                n = con.execute("SELECT COUNT(*) FROM evals").fetchone()[0]
        except sqlite3.Error:
            return f"every evaluation finished is kept in {db}"
        return f"{n} evaluations and every device measurement are kept in {db}"
    kept = {
        "profile": "every batch of units measured so far is kept in the table",
        "finetune": "the finetune's resume file keeps its position, finetuned.pt its best epoch",
        "run": "finished stages are kept, and the interrupted one keeps what it did",
        "train": "the resume file keeps the training's position",
    }
    return kept.get(verb, "nothing half-written was kept")


def _interruptible(verb: str, command):
    """`command`, a Ctrl-C in it turned into `Stopped` (Typer would end it silently, exit 130)."""

    @functools.wraps(command)
    def call(**given):
        try:
            return command(**given)
        except KeyboardInterrupt as e:
            kept = getattr(e, "kept", None) or _what_was_kept(verb, given)
            raise Stopped(kept, _resume_command(verb, given)) from None

    return call


for _info in app.registered_commands:
    _info.callback = _interruptible(_info.name or _info.callback.__name__, _info.callback)


def _click_exceptions():
    """The click exceptions Typer raises (its own copy of click since Typer 0.2x, click before)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older Typer: click itself
        from click import exceptions
    return exceptions


def _error(line: str) -> None:
    """The one line of an error the user can fix (their values printed as they are, not as markup), exit 2."""
    from rich.text import Text

    err.print(Text.assemble(("error:", "red"), " ", line), highlight=False)
    sys.exit(2)


def main() -> None:
    """Run a verb; errors the user can fix (a bad value, a missing file) print one `error:` line, exit 2."""
    click = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except EdgepruneError as e:
        _error(str(e))
    except click.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `edgeprune`: the help, as Typer shows it
            app(["--help"], standalone_mode=False)
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        _error(f"{e.format_message().rstrip('.')}{where}")
    except (Stopped, typer.Abort, KeyboardInterrupt) as e:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while this prints: no traceback
        try:
            if isinstance(e, Stopped):
                err.print(f"interrupted: {e.kept}; to go on: {e.resume}", highlight=False, markup=False)
            else:
                err.print("interrupted", highlight=False)
        finally:  # a caller in this process (a test, a notebook) keeps its Ctrl-C, and so do its children
            signal.signal(signal.SIGINT, previous)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
