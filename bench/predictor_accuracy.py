"""Latency predictor vs the FLOPs-proportional baseline, on random plans measured on the device.

    python bench/predictor_accuracy.py [--n 100] [--pairs resnet20:cpu-onnxruntime ...]

For each (model, device profile): N random plans (each group's keep-count uniform over its
allowed counts) are exported, measured on the device with the profile's protocol, and predicted
by the device's latency table (this machine's own, latency_tables/DEVICE/SETUP/MODEL.json, where
it has one, else latency_tables/DEVICE/MODEL.json; the --json output names it) as calibrated at profile time,
by the same table re-anchored on the dense model measured now (scaled by dense now / dense at
profile time), and by dense-ms x MACs-ratio. --json keeps every plan's figures (rewritten after
every pair, so a run stopped part way keeps the pairs it finished).

    python bench/predictor_accuracy.py --pairs mobilenet_v2:cpu-openvino --against runs/reprofile

--against DIR adds the tables under DIR/DEVICE/MODEL.json (a re-profile, say) as two more
columns, predicting the same measured plans: old table vs new in one run, on one measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgeprune.devices import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.check import check_predictor, predictor_for
from edgeprune.latency.predictor import anchor_scale, error_stats
from edgeprune.latency.table import LatencyTable, find_table
from edgeprune.resolve import resolve

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
    ap.add_argument("--against", help="a second table root (DIR/DEVICE/MODEL.json) predicting the same plans")
    args = ap.parse_args()
    torch.set_num_threads(1)
    group = f"{'±10%':>10} {'±5%':>6} {'med|err|':>9}"
    header = (
        f"{'':<41}| {'table (profile-time cal.)':<27} | {'table, anchored on dense':<27} | {'FLOPs-proportional':<27} |"
    )
    header += f"\n{'model':<20}{'device':<17}{'n':>4} | {group} | {group} | {group} | {'s':>5}"
    if args.against:
        header = header.replace("\n", f"{'':>6} | {'--against table':<27} | {'--against, anchored':<27} |\n", 1)
        header += f" | {group} | {group} |"
    print(header)
    print("-" * len(header.splitlines()[-1]))
    results = []
    for pair in args.pairs:
        model_id, device_name = pair.split(":")
        r = resolve(model_id, load_data=False)
        model, model_id, shape = r.model, r.id, r.shape
        device = Device.load(device_name)
        path = find_table(device, model_id)  # this machine's own where it has one, else the profile's
        table = LatencyTable.load(path, fingerprint=device.fingerprint())
        # the second table is loaded before the measurement, so a missing or mismatched one fails first
        other = None
        if args.against:
            other = _load_against(f"{args.against}/{device_name}/{model_id}.json", device, table.step)
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
        seconds = time.monotonic() - t0
        if args.against:
            r.update(_against(other, model, shape, r))
        cells = []
        for key in ("table", "table_anchored", "flops_baseline"):
            e = r[key]
            cells.append(f"{e['within_10']:>10.0%} {e['within_5']:>6.0%} {e['median_abs_pct']:>8.2f}%")
        row = f"{model_id:<20}{device_name:<17}{r['table']['n']:>4} | " + " | ".join(cells) + f" | {seconds:>5.0f}"
        for key in ("against", "against_anchored") if args.against else ():
            e = r[key]
            row += f" | {e['within_10']:>10.0%} {e['within_5']:>6.0%} {e['median_abs_pct']:>8.2f}%"
        print(row + (" |" if args.against else ""), flush=True)
        results.append(
            {
                "model": model_id,
                "device": device_name,
                "table_path": str(path),
                "sampled": table.meta.get("sampling"),
                **{k: r[k] for k in ("dense_ms", "dense_predicted_ms", "anchor", "table", "table_anchored")},
                **{k: r[k] for k in ("flops_baseline", "plans")},
                **({"against_root": args.against} if args.against else {}),
                **{k: r[k] for k in ("against", "against_anchored") if k in r},
            }
        )
        if args.json_path:  # after every pair: a long run stopped part way keeps what it measured
            with open(args.json_path, "w") as fh:
                json.dump(results, fh, indent=2)


def _load_against(path: str, device: Device, step: int) -> LatencyTable:
    try:
        table = LatencyTable.load(path, fingerprint=device.fingerprint())
    except EdgepruneError as e:
        raise SystemExit(str(e)) from None
    if table.step != step:
        raise SystemExit(f"{path}: channel step {table.step}, the shipped table {step}; profile it with --step {step}")
    return table


def _against(table: LatencyTable, model, shape, r: dict) -> dict:
    """The second table's predictions of the plans `r` measured, raw and anchored on its dense now."""
    s, predictor = predictor_for(model, shape, table)
    anchor = anchor_scale(table, s.full_counts(), r["dense_ms"], predictor.predict())
    predicted = [predictor.predict(p["counts"]) for p in r["plans"]]
    measured = [p["measured_ms"] for p in r["plans"]]
    for p, ms in zip(r["plans"], predicted):
        p["against_predicted_ms"] = ms
    return {
        "against": error_stats(predicted, measured),
        "against_anchored": error_stats([ms * anchor for ms in predicted], measured),
    }


if __name__ == "__main__":
    main()
