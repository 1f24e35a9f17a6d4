"""How stable is a share-of-dense verdict on this machine? The same pruned/dense pair measured
again and again, two ways in one run, trials alternating:

- before: each model one run of the device's full protocol (warm-up 0.3 s, >= 1 s timed, noisy
  runs repeated), the models in turn for 3 rounds, each keeping its median round (validation up
  to stop 14);
- now: the models in turn in 15 short windows, each keeping its quietest
  (edgeprune/latency/interleave.py; validation, the prune's measured check and the profiler).

    python bench/measure_noise.py --run runs/ship-ort/resnet20-cpu-onnxruntime-50-bocr --trials 8

Prints, per trial, each way's dense ms and pruned/dense ratio, then per way the ratio's median,
its spread across trials (largest / smallest - 1) and the seconds a trial took. A way whose
ratio moves between trials gives budget verdicts that flip between validations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="an exported run directory (its ONNX file and its dense parent)")
    ap.add_argument("--device", default=None, help="device profile (default: the run's)")
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args()

    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.devices import Device
    from edgeprune.formats import export_onnx, simplify_and_check
    from edgeprune.latency.interleave import measure_interleaved, spread
    from edgeprune.latency.measurement import Protocol
    from edgeprune.zoo import resolve_weights

    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    manifest = json.loads(Path(json.loads((run / "export.json").read_text())["manifest"]).read_text())
    device = Device.load(args.device or config["device"])
    shape = tuple(manifest["input_shape"])
    pruned = Path(manifest["formats"]["onnx"]["path"])
    full = device.spec.protocol

    def before(items):  # stop 14's validation: full protocol per model, 3 rounds, median round
        ms = device.measure_many(list(items) * 3, full, fresh=True)
        return [sorted(ms[r * len(items) + i].median_ms for r in range(3))[1] for i in range(len(items))]

    def now(items):
        return [m.median_ms for m in measure_interleaved(device, items)]

    ways = {"before": before, "now": now}
    rows: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as d:
        dense_path = export_onnx(load_checkpoint(resolve_weights(config["weights"])).build(), shape, Path(d) / "d.onnx")
        simplify_and_check(dense_path)
        items = [(pruned, shape), (dense_path, shape)]
        device.measure(dense_path, shape, Protocol(min_s=0.5))  # start the worker, warm the machine
        print(f"{run.name} on {device.name}: pruned / dense, {args.trials} trials, ways alternating")
        print(f"{'trial':>5}  {'way':<7}{'dense ms':>10}{'pruned ms':>11}{'ratio':>8}{'seconds':>9}")
        for t in range(args.trials):
            for name in ways if t % 2 == 0 else reversed(list(ways)):
                t0 = time.monotonic()
                p, dn = ways[name](items)
                rows[name].append((dn, p / dn, time.monotonic() - t0))
                print(f"{t:>5}  {name:<7}{dn:>10.4f}{p:>11.4f}{p / dn:>8.3f}{rows[name][-1][2]:>9.1f}", flush=True)
    print(f"\n{'way':<8}{'ratio median':>13}{'ratio spread':>14}{'dense spread':>14}{'s / trial':>11}")
    for name, r in rows.items():
        ratios, dense = [x[1] for x in r], [x[0] for x in r]
        print(
            f"{name:<8}{statistics.median(ratios):>13.3f}{spread(ratios):>13.1%}{spread(dense):>13.1%}"
            f"{statistics.median(x[2] for x in r):>11.1f}"
        )
    b, n = (spread([x[1] for x in rows[w]]) for w in ("before", "now"))
    print(f"\nratio spread, now / before: {n / b:.2f}x" if b > 0 else "")


if __name__ == "__main__":
    main()
