"""Export a model to the formats devices run, each checked against PyTorch by its own runtime.

ONNX (simplified, checked), OpenVINO IR (from that ONNX), TensorRT engine (where TensorRT runs).
Parity per format: every output on a batch against PyTorch (max abs difference; a classifier's
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

FORMATS = ("onnx", "openvino", "tensorrt")

# how far a runtime's logits may stray from PyTorch's for the file to ship: fp32 runtimes only
# reorder sums and fuse ops (relative differences ~1e-6 here); an fp16 engine rounds every
# activation (~1e-3..1e-2). Beyond these the file computes something else than the model.
TOLERANCE = {
    "fp32": {"max_rel_diff": 1e-3, "top1_agreement": 0.98},
    "fp16": {"max_rel_diff": 5e-2, "top1_agreement": 0.95},
}


def parse_formats(text: str | list[str]) -> list[str]:
    formats = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise choices_error("export format", f, FORMATS)
    return ["onnx"] + [f for f in formats if f != "onnx"]  # ONNX is the source of the others


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

    if fmt == "onnx":
        return OnnxRuntimeBackend(threads=1).session(path, input_shape)
    if fmt == "openvino":
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
    log=print,
) -> dict:
    """Write every format into `out_dir`; returns {format: {path, sha256, bytes, parity, ...}}.
    With `task` (edgeprune.task), each file's parity is checked against PyTorch by its runtime."""
    from edgeprune.formats.onnx import export_onnx, simplify_and_check
    from edgeprune.formats.openvino import onnx_to_openvino
    from edgeprune.formats.tensorrt import onnx_to_engine

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, input_shape, out / "model.onnx")
    artifacts: dict[str, dict] = {"onnx": {"path": onnx_path, **simplify_and_check(onnx_path)}}
    for fmt in formats:
        if fmt == "openvino":
            artifacts[fmt] = {"path": onnx_to_openvino(onnx_path, out / "openvino" / "model.xml"), "precision": "fp32"}
        elif fmt == "tensorrt":
            engine = out / f"model-{tensorrt_precision}.engine"
            artifacts[fmt] = {"path": onnx_to_engine(onnx_path, engine, precision=tensorrt_precision)}
            artifacts[fmt]["precision"] = tensorrt_precision
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
