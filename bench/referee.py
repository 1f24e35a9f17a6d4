"""Does edgeprune time a model the way its runtime's own tool does? Each model measured by
edgeprune (its device profile, the worker process, runtime-native timing) beside the runtime's
referee, in alternating rounds, in one run:

- OpenVINO: `benchmark_app` (sync API, 1 stream, 1 thread, f32, no hint, no pinning), its median;
- ONNX Runtime: a minimal io-binding loop (input bound once, output preallocated), its median.

edgeprune's Python-call timing (`--timing python-call`, what it measured before) is shown beside
for the record. Models: the quickstart's (resnet20 at 28x28, pruned to half its channels; the
shipped Fashion-MNIST checkpoint), a pruned resnet56, and mobilenet_v2 at 224 (torchvision,
untrained: weights do not change its time), and resnet18 at 224 with --large.

    python bench/referee.py [--rounds 3] [--seconds 3] [--large]

Prints, per model and runtime, the referee's median, edgeprune's native and Python-call medians
and their ratios to the referee (median over rounds); the goal is native within 1.00 +- 0.03.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

GOAL = 0.03


def models(large: bool) -> list[tuple[str, object, tuple]]:
    """(label, nn.Module, input shape): the quickstart's model, a pruned resnet56, mobilenet_v2 at 224."""
    import torchvision

    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.pruning import space
    from edgeprune.zoo import resolve_weights

    out = []
    for name in ("resnet20", "resnet56"):
        dense = load_checkpoint(resolve_weights(f"zoo:{name}-fashion-mnist")).build().eval()
        import torch

        s = space(dense, torch.randn(1, 1, 28, 28), step=8)
        out.append((f"{name} pruned (28x28)", s.uniform(0.5).apply(dense).eval(), (1, 1, 28, 28)))
    out.append(("mobilenet_v2 (224)", torchvision.models.mobilenet_v2(num_classes=1000).eval(), (1, 3, 224, 224)))
    if large:
        out.append(("resnet18 (224)", torchvision.models.resnet18(num_classes=1000).eval(), (1, 3, 224, 224)))
    return out


def benchmark_app(xml: Path, seconds: float) -> float:
    """benchmark_app's median latency in ms (its own figure: each request's latency, timed in the runtime)."""
    tool = Path(sys.executable).with_name("benchmark_app")
    cmd = [str(tool), "-m", str(xml), "-d", "CPU", "-api", "sync", "-nstreams", "1", "-nthreads", "1"]
    cmd += ["-infer_precision", "f32", "-hint", "none", "-pin", "NO", "-t", str(max(1, round(seconds)))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    value, unit = re.search(r"Median:\s+([\d.]+)\s+(ms|us)", out).groups()
    return float(value) / (1000.0 if unit == "us" else 1.0)


def iobinding_loop(onnx: Path, shape: tuple, seconds: float) -> float:
    """A minimal ONNX Runtime loop, in a fresh process as edgeprune's worker is: input bound once,
    outputs preallocated, `run_with_iobinding` timed; the median in ms."""
    code = f"""
import time, statistics, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
s = ort.InferenceSession({str(onnx)!r}, o, providers=["CPUExecutionProvider"])
name = s.get_inputs()[0].name
x = np.random.default_rng(0).standard_normal({shape!r}, dtype=np.float32)
b = s.io_binding(); b.bind_cpu_input(name, x)
for out, v in zip(s.get_outputs(), s.run(None, {{name: x}})):
    b.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(np.empty_like(v)))
end = time.monotonic() + 0.3
while time.monotonic() < end: s.run_with_iobinding(b)
t, end = [], time.monotonic() + {seconds}
while time.monotonic() < end:
    t0 = time.perf_counter(); s.run_with_iobinding(b); t.append((time.perf_counter() - t0) * 1000)
print(statistics.median(t))
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def edgeprune_ms(device, path: Path, shape: tuple, timing: str, seconds: float) -> float:
    protocol = replace(device.spec.protocol, timing=timing, min_s=seconds, min_runs=50, precision=None, max_s=None)
    return device.measure(path, shape, protocol, fresh=True).median_ms


def referee_rounds(runtime: str, device, onnx: Path, xml: Path, shape, rounds: int, seconds: float) -> dict:
    """Alternating rounds of the referee and edgeprune (native, then Python call) on one model."""
    rows = []
    for _ in range(rounds):
        ref = benchmark_app(xml, seconds) if runtime == "openvino" else iobinding_loop(onnx, shape, seconds)
        path = xml if runtime == "openvino" else onnx
        native = edgeprune_ms(device, path, shape, "native", seconds)
        call = edgeprune_ms(device, path, shape, "python-call", seconds)
        rows.append((ref, native, call))
    return {
        "referee_ms": statistics.median(r[0] for r in rows),
        "native_ms": statistics.median(r[1] for r in rows),
        "call_ms": statistics.median(r[2] for r in rows),
        "native_ratio": statistics.median(r[1] / r[0] for r in rows),
        "call_ratio": statistics.median(r[2] / r[0] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per model and runtime")
    ap.add_argument("--seconds", type=int, default=3, help="timed seconds per measurement")
    ap.add_argument("--large", action="store_true", help="also resnet18 at 224")
    args = ap.parse_args()

    import openvino as ov

    from edgeprune.devices import Device
    from edgeprune.formats import export_onnx, simplify_and_check

    devices = {"openvino": Device.load("cpu-openvino"), "onnxruntime": Device.load("cpu-onnxruntime")}
    started, results = time.monotonic(), []
    with tempfile.TemporaryDirectory() as d:
        for i, (label, model, shape) in enumerate(models(args.large)):
            onnx = export_onnx(model, shape, Path(d) / f"m{i}.onnx")
            simplify_and_check(onnx)
            xml = Path(d) / f"m{i}.xml"
            ov.save_model(ov.Core().read_model(str(onnx)), str(xml), compress_to_fp16=False)
            for runtime, device in devices.items():
                r = referee_rounds(runtime, device, onnx, xml, shape, args.rounds, args.seconds)
                results.append((label, runtime, r))
                print(
                    f"{label:26s} {runtime:11s} referee {r['referee_ms']:.4g} ms  native {r['native_ms']:.4g} ms "
                    f"({r['native_ratio']:.3f})  python-call {r['call_ms']:.4g} ms ({r['call_ratio']:.3f})",
                    flush=True,
                )
    print()
    print("| model | runtime | referee | referee ms | edgeprune native ms | ratio | python-call ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runtime, r in results:
        ref = "benchmark_app" if runtime == "openvino" else "io-binding loop"
        print(
            f"| {label} | {runtime} | {ref} | {r['referee_ms']:.4g} | {r['native_ms']:.4g} | {r['native_ratio']:.3f} "
            f"| {r['call_ms']:.4g} | {r['call_ratio']:.3f} |"
        )
    within = sum(abs(r["native_ratio"] - 1) <= GOAL for *_, r in results)
    took = time.monotonic() - started
    print(f"\nnative within 1.00 +- {GOAL:.2f} of the referee: {within} of {len(results)} ({took:.0f} s)")


if __name__ == "__main__":
    main()
