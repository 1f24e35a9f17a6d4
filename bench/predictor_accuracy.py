"""Latency predictor vs the FLOPs-proportional baseline, on random plans measured on the device.

    python bench/predictor_accuracy.py [--n 100] [--pairs resnet20:cpu-onnxruntime ...]

For each (model, device profile): N random plans (each group's keep-count uniform over its
allowed counts) are exported, measured on the device with the profile's protocol, and predicted
by the shipped latency table (latency_tables/DEVICE/MODEL.json) as calibrated at profile time,
by the same table re-anchored on the dense model measured now (scaled by dense now / dense at
profile time), and by dense-ms x MACs-ratio. --json keeps every plan's figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgeprune.devices import Device
from edgeprune.latency.check import check_predictor
from edgeprune.latency.table import LatencyTable
from edgeprune.resolve import resolve_model

PAIRS = [
    f"{m}:{d}"
    for d in ("cpu-onnxruntime", "cpu-openvino")
    for m in ("resnet20", "resnet56", "mobilenet_v2_cifar", "resnet18", "mobilenet_v2")
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--pairs", nargs="+", default=PAIRS)
    ap.add_argument("--mode", default="uniform", choices=["uniform", "near-uniform"])
    ap.add_argument("--depth", action="store_true", help="plans may also remove residual blocks")
    ap.add_argument("--json", dest="json_path", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    group = f"{'±10%':>10} {'±5%':>6} {'med|err|':>9}"
    header = (
        f"{'':<41}| {'table (profile-time cal.)':<27} | {'table, anchored on dense':<27} | {'FLOPs-proportional':<27} |"
    )
    header += f"\n{'model':<20}{'device':<17}{'n':>4} | {group} | {group} | {group} | {'s':>5}"
    print(header)
    print("-" * len(header.splitlines()[-1]))
    results = []
    for pair in args.pairs:
        model_id, device_name = pair.split(":")
        model, model_id, shape = resolve_model(model_id)
        device = Device.load(device_name)
        table = LatencyTable.load(f"latency_tables/{device_name}/{model_id}.json", fingerprint=device.fingerprint())
        t0 = time.monotonic()
        r = check_predictor(
            model=model,
            input_shape=shape,
            table=table,
            device=device,
            n=args.n,
            mode=args.mode,
            depth=args.depth,
            progress=False,
        )
        cells = []
        for key in ("table", "table_anchored", "flops_baseline"):
            e = r[key]
            cells.append(f"{e['within_10']:>10.0%} {e['within_5']:>6.0%} {e['median_abs_pct']:>8.2f}%")
        print(
            f"{model_id:<20}{device_name:<17}{r['table']['n']:>4} | "
            + " | ".join(cells)
            + f" | {time.monotonic() - t0:>5.0f}",
            flush=True,
        )
        results.append(
            {
                "model": model_id,
                "device": device_name,
                **{k: r[k] for k in ("dense_ms", "dense_predicted_ms", "anchor", "table", "table_anchored")},
                **{k: r[k] for k in ("flops_baseline", "plans")},
            }
        )
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
