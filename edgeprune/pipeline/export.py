"""Export a model to the formats devices run, each checked against PyTorch, with a manifest.

`export(model, example_input, out_dir, formats=..., data=... | score_fn=...)` writes the files
and manifest.json: every file with its hash, the input shape, the plan where known, the task's
figure (PyTorch's and each runtime's own), each file's parity with PyTorch, and the latency
figures known so far (`validate` adds its measurement on the device under "validation"). A file
that fails parity fails the export. `export_run(RUN)` exports a run's model (finetuned if it
was, else as pruned) with the run's figures.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from edgeprune.checks import POSITIVE_OR_NONE, Rule, check_values
from edgeprune.errors import EdgepruneError
from edgeprune.runs import RunDir, write_json, writes_run

# what each export option may be (the CLI's, a config's export: section, the Python keywords);
# formats are checked by the formats package, which knows them
RULES = {
    "formats": Rule(list),
    "out": Rule(str, optional=True),
    "tensorrt_precision": Rule(str, choices=("fp16", "fp32")),
    "accuracy_images": POSITIVE_OR_NONE,
}


def check_options(*, formats, tensorrt_precision: str, accuracy_images: int | None, **others) -> list[str]:
    """The export's options checked (one line for the first that is wrong); returns the formats."""
    from edgeprune.formats import parse_formats

    fmts = parse_formats(formats)
    values = {"tensorrt_precision": tensorrt_precision, "accuracy_images": accuracy_images, **others}
    check_values(values, RULES, where="export")
    return fmts


def export(
    model: nn.Module,
    example_input: torch.Tensor | tuple[int, ...],
    out_dir: str | os.PathLike,
    *,
    formats: str | list[str] = "onnx",
    data=None,
    score_fn=None,
    train_data=None,
    input_fn=None,
    tensorrt_precision: str = "fp16",
    accuracy_images: int | None = None,
    calibration: list | None = None,
    plan=None,
    latency: dict | None = None,
    log=print,
) -> dict:
    """Write `model` as ONNX (and OpenVINO IR, TensorRT engine, int8 ONNX and IR) into `out_dir`;
    returns the manifest. Parity is checked on `data`'s test images (a classifier) or on
    `train_data`'s inputs with `score_fn` run on each file (any task); with neither, on the example
    input. The int8 files are calibrated on `calibration` (arrays of the input's shape), by default
    on training images of `data` / `train_data`."""
    from edgeprune.backends import TensorRtBackend
    from edgeprune.backends.tensorrt import MISSING
    from edgeprune.formats import export_model, parity_failures
    from edgeprune.models.onnx import example_tensor
    from edgeprune.task import make_task

    fmts = check_options(formats=formats, tensorrt_precision=tensorrt_precision, accuracy_images=accuracy_images)
    if "tensorrt" in fmts and not TensorRtBackend.available():
        raise EdgepruneError(MISSING)  # before any work: nothing half-exported
    x = example_tensor(example_input)
    if data is None and score_fn is None:  # outputs compared on the example input alone, nothing scored
        from edgeprune.task import Task
        from edgeprune.training import TrainData, output_matching

        task = Task(score=None, train=TrainData([x]), loss=output_matching)
    else:
        task = make_task(data=data, score_fn=score_fn, train_data=train_data, input_fn=input_fn)
    shape = tuple(x.shape)
    target = Path(out_dir)
    started = time.monotonic()
    artifacts = export_model(
        model,
        input_shape=shape,
        out_dir=target,
        formats=fmts,
        task=task,
        tensorrt_precision=tensorrt_precision,
        accuracy_images=accuracy_images,
        calibration=calibration,
        log=log,
    )
    if task.score is not None:  # a whole test split through PyTorch: seconds, said before it starts
        log("scoring the model by PyTorch on the test split (the manifest's reference figure) ...")
    manifest = {
        "input_shape": list(shape),
        "input": {"name": "input", "dtype": "float32"},
        "plan": plan,
        "formats": artifacts,
        "metric": task.metric,
        "accuracy": _scores(model, task, artifacts),
        "latency": latency or {},
        "seconds": round(time.monotonic() - started, 1),
    }
    if task.classification:
        manifest["input"].update(mean=list(task.dataset.mean), std=list(task.dataset.std))
    write_json(target / "manifest.json", manifest)
    failed = parity_failures(artifacts)
    if failed:  # the files and the manifest stay for a look
        raise EdgepruneError(
            f"the export fails parity with PyTorch ({'; '.join(failed)}): the file computes something else "
            f"than the model, do not ship it; the files and manifest.json are in {target}"
        )
    return manifest


def _scores(model: nn.Module, task, artifacts: dict) -> dict:
    """The task's figure by PyTorch, and by each file's runtime (a classifier's test accuracy, the
    user's score_fn on the file)."""
    scores = {"pytorch_test": task.report_score(model) if task.score is not None else None}
    for fmt, a in artifacts.items():
        parity = a.get("parity", {})
        if "test_accuracy" in parity:
            scores[f"{fmt}_test"] = parity["test_accuracy"]
        if "runtime_score" in parity:
            scores[f"{fmt}_score"] = parity["runtime_score"]
    return scores


@writes_run
def export_run(
    run_dir: str | os.PathLike,
    *,
    formats: str | list[str] = "onnx",
    out: str | os.PathLike | None = None,
    tensorrt_precision: str = "fp16",
    accuracy_images: int | None = None,
    log=print,
) -> dict:
    """`export` of a run's model into `out` (default export/RUN-NAME), with the run's figures."""
    from edgeprune.pipeline.finetune import run_task_data

    fmts = check_options(formats=formats, tensorrt_precision=tensorrt_precision, accuracy_images=accuracy_images)
    run = RunDir(run_dir)
    source, ckpt = run.shipped()
    run.dense()  # checked to be this run's too: the manifest carries its figures
    results = run.read("results.json") or {}
    fmts = with_int8(fmts, results, log)
    data = run_task_data(run)
    target = Path(out) if out else Path("export") / run.name
    chosen = results.get("chosen", {})
    latency = {
        "device": results.get("device"),
        "budget_ms": results.get("budget_ms"),
        "predicted_ms": chosen.get("predicted_ms"),
        "measured_ms_during_search": chosen.get("measured_ms"),
        "dense_measured_ms": results.get("dense", {}).get("measured_ms"),
    }
    log(f"exporting {source} ({', '.join(fmts)}) to {target}")
    try:
        manifest = export(
            ckpt.build(),
            ckpt.example_shape,
            target,
            formats=fmts,
            data=data,
            tensorrt_precision=tensorrt_precision,
            accuracy_images=accuracy_images,
            plan=ckpt.plan,
            latency=latency,
            log=log,
        )
    except EdgepruneError:
        _forget_stale_export(run, target)
        raise
    manifest.update(model=ckpt.model, dataset=ckpt.dataset, source=str(source), run_dir=str(run))
    write_json(target / "manifest.json", manifest)
    write_json(run / "export.json", {"out": str(target), "manifest": str(target / "manifest.json")})
    return manifest


def with_int8(fmts: list[str], results: dict, log=print) -> list[str]:
    """The formats of a run that searched int8 include their int8 files: what it chose was held
    to its budget, and scored, as int8."""
    if (results.get("precision") or {}).get("searched") != "int8":
        return fmts
    added = [f"{f}-int8" for f in fmts if f in ("onnx", "openvino") and f"{f}-int8" not in fmts]
    if added:
        log(f"the run searched int8: also exporting {', '.join(added)}")
    return fmts + added


def _forget_stale_export(run: RunDir, target: Path) -> None:
    """A failed export overwrote the files export.json named: the run is no longer exported."""
    previous = run / "export.json"
    try:
        stale = Path(json.loads(previous.read_text())["out"]).resolve() == target.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        stale = previous.is_file()  # unreadable: it cannot name anything valid either
    if stale:
        previous.unlink()
