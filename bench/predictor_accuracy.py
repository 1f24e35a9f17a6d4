"""Latency predictor vs the FLOPs-proportional baseline, on random plans measured on the device.

    python bench/predictor_accuracy.py [--n 100] [--pairs resnet20:cpu-onnxruntime ...]

For each (model, device profile): N random plans (each group's keep-count uniform over its
allowed counts) are exported, measured on the device with the profile's protocol, and predicted
by the shipped latency table (latency_tables/DEVICE/MODEL.json) and by dense-ms x MACs-ratio.
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
    ap.add_argument("--json", dest="json_path", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    header = (
        f"{'model':<20}{'device':<17}{'n':>4} | {'table ±10%':>10} {'±5%':>6} {'med|err|':>9} | "
        f"{'FLOPs ±10%':>10} {'±5%':>6} {'med|err|':>9} | {'s':>5}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for pair in args.pairs:
        model_id, device_name = pair.split(":")
        model, model_id, shape = resolve_model(model_id)
        device = Device.load(device_name)
        table = LatencyTable.load(f"latency_tables/{device_name}/{model_id}.json", fingerprint=device.fingerprint())
        t0 = time.monotonic()
        r = check_predictor(
            model=model, input_shape=shape, table=table, device=device, n=args.n, mode=args.mode, progress=False
        )
        t, f = r["table"], r["flops_baseline"]
        print(
            f"{model_id:<20}{device_name:<17}{t['n']:>4} | {t['within_10']:>10.0%} {t['within_5']:>6.0%} "
            f"{t['median_abs_pct']:>8.2f}% | {f['within_10']:>10.0%} {f['within_5']:>6.0%} "
            f"{f['median_abs_pct']:>8.2f}% | {time.monotonic() - t0:>5.0f}",
            flush=True,
        )
        results.append(
            {"model": model_id, "device": device_name, **{k: r[k] for k in ("dense_ms", "table", "flops_baseline")}}
        )
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
