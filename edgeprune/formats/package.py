"""Export a model to the formats devices run, each checked against PyTorch by its own runtime.

ONNX (simplified, checked), OpenVINO IR (from that ONNX), TensorRT engine (where TensorRT runs),
and int8: the ONNX quantized (static QDQ, calibrated on training images, formats/quantize.py)
and its OpenVINO IR. Parity per format: every output on a batch against PyTorch (max abs difference; a classifier's
top-1 agreement), held to `TOLERANCE`, and the task's figure computed by the runtime itself, one
image at a time as the device will run it (static batch 1): a classifier's test accuracy, or the
user's score_fn run on the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.errors import EdgepruneError, choices_error
from edgeprune.progress import progress_bar
from edgeprune.runs import file_sha256

FORMATS = ("onnx", "onnx-int8", "openvino", "openvino-int8", "tensorrt")
CALIBRATION_IMAGES = 256  # training images an int8 export is calibrated on

# how far a runtime's logits may stray from PyTorch's for the file to ship: fp32 runtimes only
# reorder sums and fuse ops (relative differences ~1e-6 here); an fp16 engine rounds every
# activation (~1e-3..1e-2). Beyond these the file computes something else than the model.
TOLERANCE = {
    "fp32": {"max_rel_diff": 1e-3, "top1_agreement": 0.98},
    "fp16": {"max_rel_diff": 5e-2, "top1_agreement": 0.95},
    # int8 rounds every activation to 1/255 of its calibrated range: logits move by several % of
    # theirs and a few close calls flip; a file beyond these was calibrated on the wrong inputs
    "int8": {"max_rel_diff": 0.25, "top1_agreement": 0.90},
}


def parse_formats(text: str | list[str]) -> list[str]:
    formats = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise choices_error("export format", f, FORMATS)
    if "openvino-int8" in formats and "onnx-int8" not in formats:
        formats.insert(formats.index("openvino-int8"), "onnx-int8")  # the int8 IR is read from the int8 ONNX
    return ["onnx"] + [f for f in FORMATS[1:] if f in formats]  # ONNX is the source of the others


def describe_parity(p: dict) -> str:
    said = f"max |diff| {p['max_abs_diff']:.2e} vs PyTorch over {p['outputs']} output{'s' * (p['outputs'] > 1)}"
    if p.get("top1_agreement") is not None:
        said += (
            f", top-1 agreement {p['top1_agreement']:.1%}, test accuracy {p['test_accuracy']:.2%} "
            f"({p['test_images']} images, computed by the runtime)"
        )
    if p.get("runtime_score") is not None:
        said += f", score {p['runtime_score']:.4g} (your score_fn on the file, run by the runtime)"
    return said


def runner(fmt: str, path: Path, onnx_path: Path, input_shape, *, precision: str = "fp16"):
    """run(x) -> logits for one exported artifact, on this machine's runtime for that format."""
    from edgeprune.backends import OnnxRuntimeBackend, OpenVinoBackend, TensorRtBackend

    if fmt in ("onnx", "onnx-int8"):  # an int8 file runs as quantized: it holds its QDQ pairs
        return OnnxRuntimeBackend(threads=1).session(path, input_shape)
    if fmt in ("openvino", "openvino-int8"):
        return OpenVinoBackend(threads=1, precision="f32").session(path, input_shape)
    return TensorRtBackend(precision=precision).session(path, input_shape)  # the engine file written


def parity_verdict(parity: dict, precision: str = "fp32") -> str | None:
    """Why an exported file fails parity with PyTorch (None where it passes `TOLERANCE`)."""
    if "error" in parity:
        return f"the runtime could not run it ({parity['error']})"
    limits = TOLERANCE[precision]
    why = []
    if parity["max_rel_diff"] > limits["max_rel_diff"]:
        why.append(f"outputs differ by {parity['max_rel_diff']:.2g} of their range (limit {limits['max_rel_diff']:g})")
    if parity.get("top1_agreement") is not None and parity["top1_agreement"] < limits["top1_agreement"]:
        agree, least = parity["top1_agreement"], limits["top1_agreement"]
        why.append(f"top-1 agrees on {agree:.0%} of a test batch (limit {least:.0%})")
    return "; ".join(why) or None


def parity_failures(artifacts: dict) -> list[str]:
    """'FORMAT: why' for every artifact whose parity check failed."""
    return [f"{fmt}: {a['parity']['failed']}" for fmt, a in artifacts.items() if a.get("parity", {}).get("failed")]


def pack(template, flat: list):
    """`flat` tensors in the structure of `template` (a model's output: a tensor, tuple, list or dict)."""
    it = iter(flat)

    def build(t):
        if isinstance(t, torch.Tensor):
            return next(it)
        if isinstance(t, dict):
            return {k: build(v) for k, v in t.items()}
        return type(t)(build(v) for v in t)

    return build(template)


class RuntimeModule(nn.Module):
    """An exported file run by its runtime, as a module: one sample at a time (the file's static
    batch of one), outputs in the structure the PyTorch model returns. A task's own `score_fn`
    then scores the file as the device will run it."""

    def __init__(self, run, template) -> None:
        super().__init__()
        self.run, self.template = run, template

    def forward(self, x: torch.Tensor):
        outs = [self.run.outputs(x[i : i + 1].detach().cpu().numpy()) for i in range(len(x))]
        flat = [torch.from_numpy(np.concatenate([o[j] for o in outs])) for j in range(len(outs[0]))]
        return pack(self.template, flat)


@torch.no_grad()
def check_parity(
    run, model: nn.Module, task, *, batch: int = 64, accuracy_images: int | None = None, label: str = ""
) -> dict:
    """Runtime vs PyTorch on a batch (every output), and the task's score computed by the runtime:
    a classifier's test accuracy one image at a time, or the user's score_fn on the file."""
    from edgeprune.models.onnx import flatten_outputs

    model.eval()
    x = _parity_inputs(task, batch)
    ref = [t.numpy() for t in flatten_outputs(model(x))]
    outs = [run.outputs(x[i : i + 1].numpy()) for i in range(len(x))]
    got = [np.concatenate([o[j] for o in outs]) for j in range(len(ref))]
    diffs = [np.abs(g - r) for g, r in zip(got, ref)]
    rel = [float(d.max() / (np.abs(r).max() + 1e-12)) for d, r in zip(diffs, ref)]
    result = {
        "outputs": len(ref),
        "max_abs_diff": float(max(d.max() for d in diffs)),
        "max_rel_diff": max(rel),
        "top1_agreement": None,
        "batch": len(x),
    }
    if task.classification:
        result["top1_agreement"] = float(np.mean(got[0].argmax(1) == ref[0].argmax(1)))
        result.update(_runtime_accuracy(run, task.dataset, accuracy_images, label))
    elif task.score is not None:
        with _progress(f"score by {label or 'runtime'}"):
            result["runtime_score"] = float(task.report_score(RuntimeModule(run, model(x[:1]))))
    return result


def _parity_inputs(task, batch: int) -> torch.Tensor:
    if task.classification:
        return next(iter(task.dataset.batches("test", batch)))[0]
    inputs = task.train.inputs(max(1, -(-batch // 16)), input_of=task.input_of)
    return torch.cat(inputs)[:batch]


class _progress:
    """A one-line status while a user's score_fn runs on the exported file (its length is unknown)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self):
        self.bar = progress_bar()
        self.bar.__enter__()
        self.bar.add_task(self.what, total=None, status="")
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _runtime_accuracy(run, data, accuracy_images: int | None, label: str) -> dict:
    n = len(data.split("test")) if accuracy_images is None else min(accuracy_images, len(data.split("test")))
    correct = seen = 0
    with progress_bar() as bar:
        task = bar.add_task(f"test accuracy by {label or 'runtime'}", total=n, status="")
        for xb, yb in data.batches("test", 500, limit=-(-n // 500)):
            for i in range(min(len(xb), n - seen)):
                correct += int(run(xb[i : i + 1].numpy()).argmax() == int(yb[i]))
                seen += 1
            bar.update(task, completed=seen)
    return {"test_accuracy": correct / max(seen, 1), "test_images": seen, "test_split_images": len(data.split("test"))}


def export_model(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    out_dir: str | os.PathLike,
    formats: list[str],
    task=None,
    tensorrt_precision: str = "fp16",
    accuracy_images: int | None = None,
    calibration: list[np.ndarray] | None = None,
    log=print,
) -> dict:
    """Write every format into `out_dir`; returns {format: {path, sha256, bytes, parity, ...}}.
    With `task` (edgeprune.task), each file's parity is checked against PyTorch by its runtime.
    `calibration`: the int8 formats' calibration inputs (default: CALIBRATION_IMAGES of the task's
    training inputs, in a fixed order; never test images)."""
    from edgeprune.formats.onnx import export_onnx, simplify_and_check

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, input_shape, out / "model.onnx")
    artifacts: dict[str, dict] = {"onnx": {"path": onnx_path, **simplify_and_check(onnx_path)}}
    if any(f.endswith("-int8") for f in formats) and calibration is None:
        calibration = calibration_inputs(task, input_shape, log)
    for fmt in formats[1:]:
        artifacts[fmt] = _write_format(fmt, out, artifacts, tensorrt_precision, calibration)
    for fmt, a in artifacts.items():
        path = a["path"]
        files = [path] + ([path.with_suffix(".bin")] if fmt == "openvino" else [])
        a["files"] = [{"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files]
        a["path"] = str(path)
        if task is not None:
            precision = a.get("precision", "fp32")
            try:
                run = runner(fmt, path, onnx_path, input_shape, precision=tensorrt_precision)
            except EdgepruneError as e:
                a["parity"] = {"error": str(e)}
            else:
                a["parity"] = check_parity(run, model, task, accuracy_images=accuracy_images, label=fmt)
                log(f"{fmt}: " + describe_parity(a["parity"]))
            why = parity_verdict(a["parity"], precision)
            a["parity"].update(passed=why is None, tolerance=TOLERANCE[precision], failed=why)
            if why:
                log(f"{fmt}: FAILS parity with PyTorch: {why}")
    return artifacts


def _write_format(fmt: str, out: Path, artifacts: dict, tensorrt_precision: str, calibration) -> dict:
    """One format's file, from the ONNX already written (the int8 IR from the int8 ONNX)."""
    from edgeprune.formats.openvino import onnx_to_openvino
    from edgeprune.formats.quantize import quantize_int8
    from edgeprune.formats.tensorrt import onnx_to_engine

    onnx_path = artifacts["onnx"]["path"]
    if fmt == "onnx-int8":
        path = quantize_int8(onnx_path, out / "model.int8.onnx", calibration=calibration, progress=True)
        return {"path": path, "precision": "int8", "calibration_inputs": len(calibration)}
    if fmt == "openvino-int8":
        path = onnx_to_openvino(artifacts["onnx-int8"]["path"], out / "openvino-int8" / "model.xml")
        return {"path": path, "precision": "int8"}
    if fmt == "openvino":
        return {"path": onnx_to_openvino(onnx_path, out / "openvino" / "model.xml"), "precision": "fp32"}
    engine = onnx_to_engine(onnx_path, out / f"model-{tensorrt_precision}.engine", precision=tensorrt_precision)
    return {"path": engine, "precision": tensorrt_precision}


def calibration_inputs(task, input_shape, log=print) -> list[np.ndarray]:
    """CALIBRATION_IMAGES inputs of the task's training data, one per array at the file's batch
    of one, drawn in a fixed order without augmentation; the example input alone where the export
    was given no data (said: its ranges then fit that one input)."""
    if task is None:
        raise EdgepruneError("an int8 export needs calibration inputs: give data= or train_data= (training images)")
    train = task.train  # a data set's batches hold batch_size images; a user's loader's, at least one
    n = -(-CALIBRATION_IMAGES // train.batch_size) if train.dataset is not None else CALIBRATION_IMAGES
    batches = train.inputs(n, input_of=task.input_of)
    images = [x[i : i + 1].detach().cpu().numpy() for x in batches for i in range(len(x))][:CALIBRATION_IMAGES]
    if len(images) < 16:
        log(
            f"int8 calibration on {len(images)} input(s) only: the activation ranges fit them; give the export "
            "training data (data= or train_data=) for ranges that fit what the model will see"
        )
    return [x.reshape(input_shape) for x in images]
