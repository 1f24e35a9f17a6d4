"""Export a model to the formats devices run, each checked against PyTorch by its own runtime.

ONNX (simplified, checked), OpenVINO IR (from that ONNX), TensorRT engine (where TensorRT runs).
Parity per format: logits of a test batch against PyTorch (max abs difference, top-1 agreement),
held to `TOLERANCE`, and the test-split accuracy computed by the runtime itself, one image at a
time as the device will run it (static batch 1).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.errors import EdgepruneError, choices_error
from edgeprune.progress import progress_bar

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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        why.append(f"logits differ by {parity['max_rel_diff']:.2g} of their range (limit {limits['max_rel_diff']:g})")
    if parity["top1_agreement"] < limits["top1_agreement"]:
        agree, least = parity["top1_agreement"], limits["top1_agreement"]
        why.append(f"top-1 agrees on {agree:.0%} of a test batch (limit {least:.0%})")
    return "; ".join(why) or None


def parity_failures(artifacts: dict) -> list[str]:
    """'FORMAT: why' for every artifact whose parity check failed."""
    return [f"{fmt}: {a['parity']['failed']}" for fmt, a in artifacts.items() if a.get("parity", {}).get("failed")]


@torch.no_grad()
def check_parity(run, model: nn.Module, data, *, batch: int = 64, accuracy_images: int | None = None, label="") -> dict:
    """Runtime vs PyTorch on a test batch, and the runtime's own test accuracy."""
    model.eval()
    x, _ = next(iter(data.batches("test", batch)))
    ref = model(x).numpy()
    got = np.concatenate([run(x[i : i + 1].numpy()) for i in range(len(x))])
    n = len(data.split("test")) if accuracy_images is None else min(accuracy_images, len(data.split("test")))
    correct = seen = 0
    with progress_bar() as bar:
        task = bar.add_task(f"test accuracy by {label or 'runtime'}", total=n, status="")
        for xb, yb in data.batches("test", 500, limit=-(-n // 500)):
            for i in range(min(len(xb), n - seen)):
                correct += int(run(xb[i : i + 1].numpy()).argmax() == int(yb[i]))
                seen += 1
            bar.update(task, completed=seen)
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "max_rel_diff": float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)),
        "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
        "batch": len(x),
        "test_accuracy": correct / max(seen, 1),
        "test_images": seen,
        "test_split_images": len(data.split("test")),
    }


def export_model(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    out_dir: str | os.PathLike,
    formats: list[str],
    data=None,
    tensorrt_precision: str = "fp16",
    accuracy_images: int | None = None,
    log=print,
) -> dict:
    """Write every format into `out_dir`; returns {format: {path, sha256, bytes, parity, ...}}."""
    from edgeprune.export.onnx import export_onnx, simplify_and_check
    from edgeprune.export.openvino import onnx_to_openvino
    from edgeprune.export.tensorrt import onnx_to_engine

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
        a["files"] = [{"path": str(p), "sha256": sha256(p), "bytes": p.stat().st_size} for p in files]
        a["path"] = str(path)
        if data is not None:
            precision = a.get("precision", "fp32")
            try:
                run = runner(fmt, path, onnx_path, input_shape, precision=tensorrt_precision)
            except EdgepruneError as e:
                a["parity"] = {"error": str(e)}
            else:
                a["parity"] = check_parity(run, model, data, accuracy_images=accuracy_images, label=fmt)
                p = a["parity"]
                log(
                    f"{fmt}: max |diff| {p['max_abs_diff']:.2e} vs PyTorch, top-1 agreement "
                    f"{p['top1_agreement']:.1%}, test accuracy {p['test_accuracy']:.2%} ({p['test_images']} "
                    "images, computed by the runtime)"
                )
            why = parity_verdict(a["parity"], precision)
            a["parity"].update(passed=why is None, tolerance=TOLERANCE[precision], failed=why)
            if why:
                log(f"{fmt}: FAILS parity with PyTorch: {why}")
    return artifacts
