"""Validate a shipped model on the device: measured latency against the budget, the prediction
and the dense parent; its score against the dense parent's; a claimed speedup against the
measured one; and what unstructured sparsity at the same parameter count buys on that runtime.

Everything is measured with the device profile's protocol, locally or through its agent, the
models in turn in many short windows, each keeping its quietest (edgeprune/latency/interleave.py),
so that a slow phase of a shared machine cannot decide a ratio.

`validate(model, dense=..., example_input=..., device=..., budget=...)` takes models (or an
exported file); `validate_run(RUN)` validates a run's export with the run's figures and writes
validation.json, the manifest's "validation" and the report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune.checks import POSITIVE_OR_NONE, Rule, check_values
from edgeprune.errors import EdgepruneError
from edgeprune.runs import RunDir, write_json, writes_run


def _artifact_for(device, manifest: dict, log=print, *, int8: bool = False) -> Path:
    """What the device runs: the OpenVINO IR for a local OpenVINO device when exported, else the ONNX
    file (an agent receives ONNX; TensorRT builds its engine from it on the device); for an int8
    device, the int8 files, or the fp32 ONNX where none was exported (the device quantizes it on
    random inputs: its latency is the int8 model's, its accuracy is not known). `int8`: the run
    searched int8 on a device of another precision: its int8 files, which run quantized there."""
    formats = manifest["formats"]
    if int8 and "onnx-int8" not in formats:
        raise EdgepruneError(
            "the run searched int8 and its export has no int8 file: export it again (`edgeprune export RUN` adds "
            "onnx-int8 for such a run)"
        )
    int8 = int8 or device.spec.precision == "int8"
    if int8 and "onnx-int8" not in formats:
        log(
            f"{device.name} runs int8 and the export has no int8 file: measuring the fp32 ONNX quantized on random "
            "inputs (its latency is the int8 model's; its accuracy is not): export --formats onnx-int8 to ship int8"
        )
        return Path(formats["onnx"]["path"])
    suffix = "-int8" if int8 else ""
    if device.spec.backend == "openvino" and not device.remote and f"openvino{suffix}" in formats:
        return Path(formats[f"openvino{suffix}"]["path"])
    return Path(formats[f"onnx{suffix}"]["path"])


@dataclass
class Measured:
    """The shipped model and its dense parent (and a sparse one) measured in turn."""

    shipped: object  # Measurement
    dense: object
    sparse: dict | None
    twin: dict | None = None  # the shipped structure at the other precision (int8 <-> fp32), for a claim


def twin_of(shipped: Path, manifest: dict | None, device) -> tuple[str, Path, bool] | None:
    """The shipped structure at the other precision, which a speedup claim is also held beside:
    (precision, file, whether to quantize it first). For an fp32 file, the export's int8 file of
    the same format, else its fp32 ONNX quantized (for its latency); for an int8 one, the export's
    fp32 file. None on an int8 device (every file runs int8 there) or where no file serves."""
    from edgeprune.formats.quantize import is_quantized

    if device.spec.precision == "int8":
        return None
    formats = (manifest or {}).get("formats", {})
    fmt = "openvino" if shipped.suffix == ".xml" else "onnx"
    path = lambda f: Path(formats[f]["path"]) if f in formats else None  # noqa: E731
    int8 = Path(formats.get(f"{fmt}-int8", {}).get("path", "")) == shipped or (fmt == "onnx" and is_quantized(shipped))
    if int8:
        return ("fp32", path(fmt), False) if path(fmt) else None
    if path(f"{fmt}-int8"):
        return "int8", path(f"{fmt}-int8"), False
    source = shipped if fmt == "onnx" else path("onnx")
    return ("int8", source, True) if source else None


def measure_against_dense(
    dev,
    shipped: Path,
    dense: nn.Module,
    shape,
    *,
    shipped_weights: int | None,
    repeats: int | None,
    progress: bool,
    log,
    noise=None,
    twin: tuple[str, Path, bool] | None = None,
) -> Measured:
    """Measure the shipped file beside the dense model (and, given `shipped_weights`, the dense
    model magnitude-sparsified to that many weights), in turn, `repeats` rounds. `noise`: the run's
    NoiseNote (a noisy device is said once a run; default: once for this measurement)."""
    from edgeprune.formats.quantize import as_int8
    from edgeprune.latency.interleave import ROUNDS, NoiseNote, measure_interleaved, rounds_progress
    from edgeprune.models.onnx import export_onnx, simplify_and_check
    from edgeprune.pruning.sparse import magnitude_sparsify, weight_count

    labels = ["shipped", "dense", "sparse"][: 2 + (shipped_weights is not None)] + ([twin[0]] if twin else [])
    rounds = (
        f"{repeats} rounds" if repeats else f"{ROUNDS} rounds or more, over {ROUNDS * dev.spec.protocol.min_s:.3g} s"
    )
    what = f"the {', '.join(labels[:-1])} and {labels[-1]} models"
    # said before the dense (and sparse) models are exported and checked: seconds of work
    log(f"measuring {what} on {dev.name}, in turn, in short windows, {rounds} ...")
    with tempfile.TemporaryDirectory(prefix="edgeprune-validate-") as tmp, contextlib.ExitStack() as files:
        dense_path = export_onnx(dense, shape, Path(tmp) / "dense.onnx")
        simplify_and_check(dense_path)  # the same treatment as the shipped file
        items = [(shipped, shape), (dense_path, shape)]
        if shipped_weights is not None:
            sparse_model = magnitude_sparsify(dense, keep=shipped_weights)
            sparse_path = export_onnx(sparse_model, shape, Path(tmp) / "sparse.onnx")
            simplify_and_check(sparse_path)  # like for like: its zeros stay weights in a dense layout
            items.append((sparse_path, shape))
        if twin:
            items.append((files.enter_context(as_int8(twin[1], shape)) if twin[2] else twin[1], shape))
        # the shipped model measuring slower than its dense parent is measured on (a slow phase
        # that spared the dense model's windows) before it is believed
        with rounds_progress(
            f"measuring {what} on {dev.name}", len(items), rounds=repeats or ROUNDS, enabled=progress
        ) as shown:
            measured = measure_interleaved(dev, items, repeats=repeats, pruned=(1, [0]), on_result=shown)
    noise = noise if noise is not None else NoiseNote()
    for label, m in zip(labels, measured):
        noise.note(label, m.extra["rounds_ms"], log)
    sparse_row = None
    if shipped_weights is not None:
        nonzero = weight_count(sparse_model, nonzero=True)
        sparse_row = {
            "nonzero_weights": nonzero,
            "sparsity": 1 - nonzero / weight_count(dense),
            "measured": measured[2].to_dict(),
            "speedup": measured[1].median_ms / measured[2].median_ms,
        }
    twin_row = None
    if twin:
        twin_row = {"precision": twin[0], "measured": measured[-1].to_dict()}
        twin_row["speedup"] = measured[1].median_ms / measured[-1].median_ms
    return Measured(measured[0], measured[1], sparse_row, twin_row)


def verdict(
    m: Measured,
    *,
    budget,
    budget_ms: float | None = None,
    predicted_ms: float | None = None,
    dense_then_ms: float | None = None,
    claim_speedup: float | None = None,
    statistic: str = "median",
    tolerance: float = 0.10,
) -> dict:
    """The figures of a validation: budget, speedup, the prediction carried to the device as it
    measures now, the claim.

    `budget_ms`: the run's one budget figure (prune's, from the dense model it measured at its
    start, `dense_then_ms`), printed the same everywhere; without it, the budget of the dense
    model measured then, or now. The budget is decided on `statistic` of the shipped model's steady
    runs (latency/verdict.py; "undecided" where the windows disagree by over `tolerance` and only
    the quietest meets it); ratios (speedup, the claim, the prediction's error) on the quietest
    windows. A share of dense stays a ratio: the shipped model is referred to the dense model as
    measured then (its figure x then / now, like for like, as prune refers its candidates), and
    that figure, `held_ms`, is held against the budget."""
    from edgeprune.latency.verdict import decide, steady
    from edgeprune.search.budget import Budget

    budget = Budget.parse(budget)
    dense_now, measured = m.dense.median_ms, m.shipped.median_ms
    if budget_ms is None:
        budget_ms = budget.ms(dense_then_ms or dense_now)
    runs = m.shipped.extra.get("steady") or steady([m.shipped])
    dense_runs = m.dense.extra.get("steady") or steady([m.dense])
    shipped_stat, dense_stat = runs[f"{statistic}_ms"], dense_runs[f"{statistic}_ms"]
    refer = budget.relative and dense_then_ms
    held = shipped_stat * dense_then_ms / dense_stat if refer else shipped_stat
    held_quietest = measured * dense_then_ms / dense_now if refer else measured
    outcome = decide(held, held_quietest, budget_ms, spread=runs["spread"], tolerance=tolerance)
    # the search's prediction was carried to the device by the dense model measured then (prune's
    # anchor); carried on to the dense model measured now, its error is the table's own
    carried = dense_now / dense_then_ms if dense_then_ms else 1.0
    predicted = predicted_ms * carried if predicted_ms else None
    result = {
        "budget_ms": budget_ms,
        "budget": str(budget),
        "measured": m.shipped.to_dict(),
        "held_ms": held,  # what is held against the budget: the statistic, referred as above for a share of dense
        "dense_measured": m.dense.to_dict(),
        "repeats": len(m.dense.extra["rounds_ms"]),
        "meets_budget": outcome == "meets",
        "verdict": {
            "outcome": outcome,
            "statistic": statistic,
            "held_ms": held,
            "budget_ms": budget_ms,
            "quietest_held_ms": held_quietest,
            "tolerance": tolerance,
            "steady": runs,
            "dense_steady": dense_runs,
        },
        "margin_pct": (budget_ms - held) / budget_ms * 100,
        "predicted_ms": predicted,
        "prediction_error_pct": (predicted - measured) / measured * 100 if predicted else None,
        "predicted_at_search_ms": predicted_ms,
        "dense_at_search_ms": dense_then_ms,
        "prediction_error_at_search_pct": (predicted_ms - measured) / measured * 100 if predicted_ms else None,
        "speedup": dense_now / measured,
        "claim": None,
        "unstructured_sparse": m.sparse,
    }
    if claim_speedup is not None:
        result["claim"] = {
            "claimed_speedup": claim_speedup,
            "measured_speedup": result["speedup"],
            "share_of_claim": result["speedup"] / claim_speedup,
            "holds": result["speedup"] >= claim_speedup,
        }
        if m.twin:  # the same structure at the other precision: what quantizing adds (or removes)
            result["claim"][f"{m.twin['precision']}_structured_speedup"] = m.twin["speedup"]
    result["precision_twin"] = m.twin
    return result


# what each validate option may be (the CLI's, a config's validate: section, the Python keywords)
RULES = {
    "device": Rule(str, optional=True),
    "claim_speedup": Rule(float, lo=0, lo_open=True, optional=True),
    "sparse": Rule(bool),
    "repeats": POSITIVE_OR_NONE,
}


def _check_options(repeats, claim_speedup) -> None:
    check_values({"repeats": repeats, "claim_speedup": claim_speedup}, RULES, where="validate")


def validate(
    model: nn.Module | str | os.PathLike,
    *,
    dense: nn.Module,
    example_input: torch.Tensor | tuple[int, ...],
    device,
    budget,
    claim_speedup: float | None = None,
    sparse: bool = True,
    repeats: int | None = None,
    predicted_ms: float | None = None,
    data=None,
    score_fn=None,
    progress: bool = True,
    log=print,
) -> dict:
    """Measure `model` (a pruned nn.Module, or an exported ONNX / OpenVINO file) beside `dense` on
    `device` and hold it to `budget`; with `data` or `score_fn`, both models' scores beside."""
    from edgeprune.devices import Device
    from edgeprune.models.onnx import example_tensor, export_onnx, simplify_and_check
    from edgeprune.pruning.sparse import weight_count

    _check_options(repeats, claim_speedup)
    dev = Device.load(device) if isinstance(device, (str, os.PathLike)) else device
    shape = tuple(example_tensor(example_input).shape)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeprune-shipped-") as tmp:
        if isinstance(model, nn.Module):
            shipped = export_onnx(model, shape, Path(tmp) / "model.onnx")
            simplify_and_check(shipped)
        else:
            shipped = Path(model)
        weights = weight_count(model) if sparse and isinstance(model, nn.Module) else None
        twin = twin_of(shipped, None, dev) if claim_speedup is not None else None
        m = measure_against_dense(
            dev, shipped, dense, shape, shipped_weights=weights, repeats=repeats, progress=progress, log=log, twin=twin
        )
    result = {
        "device": dev.name,
        "fingerprint": dev.fingerprint(),
        "protocol": dev.spec.protocol.to_dict(),
        **verdict(m, budget=budget, predicted_ms=predicted_ms, claim_speedup=claim_speedup, **_decided_by(dev)),
    }
    if (data is not None or score_fn is not None) and isinstance(model, nn.Module):
        from edgeprune.task import make_task

        task = make_task(data=data, score_fn=score_fn, train_data=[])
        result["score"], result["dense_score"] = task.report_score(model), task.report_score(dense)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


@writes_run
def validate_run(
    run_dir: str | os.PathLike,
    *,
    device: str | None = None,
    claim_speedup: float | None = None,
    sparse: bool = True,
    repeats: int | None = None,
    report: bool = True,
    progress: bool = True,
    log=print,
    noise=None,
) -> dict:
    """Validate a run's export on its device (or `device`), `repeats` rounds (default: at least 15,
    spanning 15 x the protocol's min_s), and write RUN/validation.json; `report`: then (re)write
    the run's report.md and report.html with it. The export's manifest.json gets the figures too.
    The budget is the run's one figure (results.json's); `noise`: the run's NoiseNote, where this
    validation is a stage of a longer run (`edgeprune run`)."""
    from edgeprune.devices import Device
    from edgeprune.pruning.sparse import weight_count

    _check_options(repeats, claim_speedup)
    run = RunDir(run_dir)
    if not (run / "export.json").is_file():
        raise EdgepruneError(f"{run} has not been exported: run `edgeprune export {run}` first")
    manifest_path, manifest = run.manifest_path(), run.manifest()
    config, results = run.config, run.results
    dev = Device.load(device or config["device"])
    dense_ckpt, source = run.dense(), _exported_from(run, manifest)
    dense = dense_ckpt.build()
    shape = tuple(manifest["input_shape"])
    precision = results.get("precision") or {}
    # a run that searched int8 on a device of another precision: its int8 file beside the dense
    # model as the device runs it (what the budget is a share of), the dense figure of then that one's
    other = precision.get("searched") == "int8" and dev.spec.precision != "int8"
    dense_then = precision.get("reference_ms") if other else results.get("dense", {}).get("measured_ms")
    shipped = _artifact_for(dev, manifest, log, int8=other)
    started = time.monotonic()
    log(f"validating {shipped} on {dev.name} ({'agent ' + dev.spec.agent if dev.remote else 'this machine'})")
    weights = weight_count(source.build()) if sparse else None
    twin = twin_of(shipped, manifest, dev) if claim_speedup is not None else None
    m = measure_against_dense(
        dev, shipped, dense, shape, shipped_weights=weights, repeats=repeats, progress=progress, log=log, noise=noise,
        twin=twin,
    )  # fmt: skip
    figures = verdict(
        m,
        budget=config["budget"],
        budget_ms=results["budget_ms"],
        predicted_ms=results["chosen"].get("predicted_ms"),
        dense_then_ms=dense_then,
        claim_speedup=claim_speedup,
        **_decided_by(dev),
    )
    result = {
        "run_dir": str(run),
        "device": dev.name,
        "fingerprint": dev.fingerprint(),
        "protocol": dev.spec.protocol.to_dict(),
        "artifact": str(shipped),
        **figures,
        **_accuracy(run, manifest, shipped, dense, dense_ckpt),
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    if report:
        result["report"] = str(run / "report.html")
    write_json(run / "validation.json", result)
    _into_manifest(manifest_path, manifest, result)
    if report:
        from edgeprune.report import write_report

        write_report(run.path)
    return result


def _decided_by(dev) -> dict:
    """The device profile's verdict statistic, and its protocol's tolerance for disagreeing windows."""
    return {"statistic": dev.spec.verdict_statistic, "tolerance": dev.spec.protocol.max_cv}


def _exported_from(run: RunDir, manifest: dict):
    """The checkpoint the run's export was made from, refused where it is not this run's."""
    from edgeprune.checkpoint import load_checkpoint

    source = Path(manifest.get("source") or "")
    if source.parent.resolve() != run.path.resolve() or not source.is_file():
        raise EdgepruneError(
            f"{run}/export.json names an export of {source}, not of this run's model: export this run again "
            f"(`edgeprune export {run}`)"
        )
    return run.check_lineage(source.name, load_checkpoint(source))


def _accuracy(run: RunDir, manifest: dict, shipped: Path, dense: nn.Module, dense_ckpt) -> dict:
    """The shipped file's test accuracy (computed by its runtime at export) beside the dense model's,
    on the same test images."""
    fmt = next((f for f, a in manifest["formats"].items() if Path(a["path"]) == shipped), "onnx")
    acc = manifest["accuracy"].get(f"{fmt}_test", manifest["accuracy"]["pytorch_test"])
    dense_acc = run.recorded_dense_accuracy(dense_ckpt)
    parity = manifest["formats"].get(fmt, {}).get("parity", {})
    images, split = parity.get("test_images"), parity.get("test_split_images")
    subset = False
    if images is not None and (split is None or images < split) or dense_acc is None:
        # the runtime may have scored only the first `images` test images (export --accuracy-images):
        # then the dense model is scored on those same images, or the delta would compare two samples
        from edgeprune.pipeline.finetune import run_task_data
        from edgeprune.training import accuracy

        data = run_task_data(run)
        subset = images is not None and images < len(data.split("test"))
        dense_acc = accuracy(dense, data, "test", images=images if subset else None)
    return {
        "test_accuracy": acc,
        "dense_test_accuracy": dense_acc,
        "accuracy_delta_points": (acc - dense_acc) * 100 if dense_acc is not None else None,
        "accuracy_images": images if subset else None,  # None: the whole test split
    }


def _into_manifest(path: Path, manifest: dict, result: dict) -> None:
    """The export's manifest gets the validation's figures: it travels with the files, without the run."""
    keys = (
        "device",
        "artifact",
        "budget_ms",
        "meets_budget",
        "verdict",
        "predicted_ms",
        "prediction_error_pct",
        "speedup",
        "test_accuracy",
        "dense_test_accuracy",
        "accuracy_delta_points",
        "accuracy_images",
    )
    manifest["validation"] = {k: result[k] for k in keys}
    manifest["validation"].update(
        measured_ms=result["measured"]["median_ms"],
        dense_measured_ms=result["dense_measured"]["median_ms"],
        fingerprint=result["fingerprint"],
    )
    write_json(path, manifest)
