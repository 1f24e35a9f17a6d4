"""INT8 against fp32, side by side in one run: each model exported by edgeprune as fp32 and as
int8 (static QDQ, weights per channel, calibrated on 256 training images; formats/quantize.py),
both files measured in alternating rounds on the same runtime (1 thread), and, for the Fashion-MNIST
checkpoints, the test accuracy each file scores when its runtime computes it.

Models: the zoo's resnet20 and mobilenet_v2_cifar (Fashion-MNIST, 28x28) and, with --large,
torchvision's mobilenet_v2 and resnet18 at 224 (untrained: int8 kernels' time does not depend on
the weights; calibrated on random inputs, so no accuracy for them).

    python bench/int8.py [--large] [--images 2000] [--budgets 50% 25%] [--evals 30] [--epochs 2]

Prints per model and runtime: fp32 ms, int8 ms, the speedup (fp32 / int8; each model's quietest
round, as every ratio here), and fp32 vs int8 test accuracy with the difference in points. Then,
for each budget (a share of the dense fp32 model), the three ways to meet it side by side: int8
only, pruned fp32, pruned + int8 (`prune --precision int8`); bench/int8_budgets.py says how
(`--budgets` with no value skips them: they prune and finetune 16 runs, an hour or more here).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from int8_budgets import add_arguments, budget_table  # beside this script

RUNTIMES = (("onnxruntime", "cpu-onnxruntime", "onnx"), ("openvino", "cpu-openvino", "openvino"))


def models(large: bool) -> list[tuple[str, object, tuple, bool]]:
    """(label, nn.Module, input shape, trained on Fashion-MNIST)."""
    import torchvision

    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.zoo import resolve_weights

    out = []
    for name in ("resnet20", "mobilenet_v2_cifar"):
        model = load_checkpoint(resolve_weights(f"zoo:{name}-fashion-mnist")).build().eval()
        out.append((f"{name} (28x28)", model, (1, 1, 28, 28), True))
    if large:
        for name in ("mobilenet_v2", "resnet18"):
            model = getattr(torchvision.models, name)(num_classes=1000).eval()
            out.append((f"{name} (224)", model, (1, 3, 224, 224), False))
    return out


def export(model, shape, trained: bool, out: Path, images: int) -> dict:
    """The fp32 and int8 files (ONNX and OpenVINO IR) with their parity and runtime accuracy."""
    from edgeprune.data import load_dataset
    from edgeprune.formats import export_model
    from edgeprune.formats.quantize import random_inputs
    from edgeprune.task import Task

    formats = ["onnx", "onnx-int8", "openvino", "openvino-int8"]
    if trained:
        task = Task.classification_on(load_dataset("fashion-mnist"))
        return export_model(model, input_shape=shape, out_dir=out, formats=formats, task=task,
                            accuracy_images=images, log=lambda s: None)  # fmt: skip
    return export_model(model, input_shape=shape, out_dir=out, formats=formats, calibration=random_inputs(shape),
                        log=lambda s: None)  # fmt: skip


def measure(device_name: str, fp32: str, int8: str, shape) -> tuple[float, float]:
    """Both files in alternating rounds on the fp32 device (an int8 file runs as quantized: its QDQ pairs)."""
    from edgeprune.devices import Device
    from edgeprune.latency.interleave import measure_interleaved

    a, b = measure_interleaved(Device.load(device_name), [(fp32, shape), (int8, shape)])
    return a.median_ms, b.median_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="also mobilenet_v2 and resnet18 at 224")
    p.add_argument("--images", type=int, default=2000, help="test images each runtime scores")
    add_arguments(p)
    args = p.parse_args()
    head = f"{'model':22} {'runtime':12} {'fp32 ms':>9} {'int8 ms':>9} {'speedup':>8} "
    head += f"{'fp32 acc':>9} {'int8 acc':>9} {'delta':>7}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-int8-bench-") as tmp:
        for label, model, shape, trained in models(args.large):
            art = export(model, shape, trained, Path(tmp) / label.split()[0], args.images)
            for runtime, device, fmt in RUNTIMES:
                fp32_ms, int8_ms = measure(device, art[fmt]["path"], art[f"{fmt}-int8"]["path"], shape)
                acc = [art[f].get("parity", {}).get("test_accuracy") for f in (fmt, f"{fmt}-int8")]
                cells = [f"{a:.2%}" if a is not None else "-" for a in acc]
                delta = f"{(acc[1] - acc[0]) * 100:+.2f}" if None not in acc else "-"
                rows.append(f"{label:22} {runtime:12} {fp32_ms:9.4f} {int8_ms:9.4f} {fp32_ms / int8_ms:7.2f}x "
                            f"{cells[0]:>9} {cells[1]:>9} {delta:>7}")  # fmt: skip
                print(rows[-1], flush=True)
    print()
    print(head)
    print("-" * len(head))
    print("\n".join(rows))
    if args.budgets:
        print("\n" + budget_table(args))


if __name__ == "__main__":
    main()
