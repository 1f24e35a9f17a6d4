"""Do in-context units add up to what a whole model changes by? mobilenet_v2 at 224 on OpenVINO,
its first block's expansion (group 22: 16 -> C at 112x112, the network's largest maps) kept at
C = 64 and at C = 96: the three units C touches (the 1x1 expand, the 3x3 depthwise, the 1x1
project) measured in context both ways, beside the two whole models, all in alternating rounds:

- "summed": K copies' whole outputs summed at the end (the earlier way): all K maps live at once;
- "reduced": each copy's output summed to a scalar as it is written (UNIT_CONTEXT, now).

    python bench/unit_context.py [--rounds 9]

Prints each unit's per-copy cost both ways and the units' summed change from C = 64 to 96 beside
the whole model's measured change (the figure a table must predict).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

GROUP = 22  # torchvision mobilenet_v2's first expansion, at step 16
COPIES = 4


def units(c: int) -> dict:
    from edgeprune.latency.layers import LayerConfig

    return {
        "expand": LayerConfig("conv", 16, c, 112, 112, (1, 1), (1, 1), (0, 0, 0, 0), 1, "relu6"),
        "dw": LayerConfig("conv", c, c, 112, 112, (3, 3), (2, 2), (1, 1, 1, 1), c, "relu6"),
        "project": LayerConfig("conv", c, 24, 56, 56, (1, 1), (1, 1), (0, 0, 0, 0), 1, None),
    }


def main() -> None:
    import onnx
    import torch
    import torchvision

    from edgeprune.devices import Device
    from edgeprune.formats.onnx import export_onnx
    from edgeprune.latency.interleave import measure_interleaved
    from edgeprune.latency.units import unit_model
    from edgeprune.pruning import space

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    items, labels = [], []
    with tempfile.TemporaryDirectory(prefix="edgeprune-context-") as tmp:
        for c in (64, 96):
            for name, cfg in units(c).items():
                for design in ("summed", "reduced"):
                    for k in (1, COPIES):
                        model, shape = unit_model(cfg, copies=k, reduced=design == "reduced")
                        path = Path(tmp) / f"{name}{c}-{design}{k}.onnx"
                        onnx.save(model, path)
                        items.append((str(path), shape))
                        labels.append((c, name, design, k))
        dense = torchvision.models.mobilenet_v2(num_classes=10).eval()
        s = space(dense, torch.randn(1, 3, 224, 224), step=16)
        for c in (64, 96):
            counts = list(s.full_counts())
            counts[GROUP] = c
            path = export_onnx(s.plan(counts).apply(dense).eval(), (1, 3, 224, 224), Path(tmp) / f"whole{c}.onnx")
            items.append((str(path), (1, 3, 224, 224)))
            labels.append((c, "whole", "", 1))
        measured = measure_interleaved(Device.load("cpu-openvino"), items, repeats=args.rounds)
    ms = {label: m.median_ms for label, m in zip(labels, measured)}
    per_copy = {
        (c, n, d): (ms[(c, n, d, COPIES)] - ms[(c, n, d, 1)]) / (COPIES - 1)
        for c, n, d, k in labels
        if n != "whole" and k == 1
    }
    print(f"{'unit':10} {'C':>4} {'summed ms':>10} {'reduced ms':>11}")
    for c in (64, 96):
        for n in units(c):
            print(f"{n:10} {c:4} {per_copy[(c, n, 'summed')]:10.4f} {per_copy[(c, n, 'reduced')]:11.4f}")
    whole = ms[(96, "whole", "", 1)] - ms[(64, "whole", "", 1)]
    print(f"\nwhole model, C 64 -> 96: {whole:+.4f} ms measured")
    for d in ("summed", "reduced"):
        delta = sum(per_copy[(96, n, d)] - per_copy[(64, n, d)] for n in units(96))
        print(f"units {d:8}: {delta:+.4f} ms predicted, {delta / whole:.2f}x the measured change")


if __name__ == "__main__":
    main()
