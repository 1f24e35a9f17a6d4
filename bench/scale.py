"""The same seeded search with 1 and 2 Ray workers, and on a cluster of two `ray start` nodes.

    python bench/scale.py [--weights zoo:resnet20-fashion-mnist] [--device cpu-onnxruntime]
                          [--budget 50%] [--search bocr] [--evals 24] [--batch 2] [--proxy-steps 0]
                          [--worker-gpus 0.25] [--no-devices]

Three real `edgeprune.prune` runs of one seeded search (same searcher, seed, batch of q
candidates), differing only in where the candidates are scored:

- `1 worker`: a local Ray of one worker (each batch scored in turn);
- `2 workers`: a local Ray of two workers (each batch's candidates at once);
- `2 nodes`: a Ray cluster of two one-CPU nodes, each a separate `ray start` process (the head,
  and a node joining it), reached with `ray=ADDRESS`: the cluster path, not local mode.

With the same q, the searcher proposes the same candidates whatever scores them, so the
evaluations must be identical (checked: counts and scores of every evaluation). Printed per
run: wall time, the time spent scoring (the part that parallelises), the rest (measuring on the
device, the searcher's own work: serial by design), and the speedups against `1 worker`.
Runs are written to runs/bench-scale/ (deleted and redone on every call).

Then the device rule's cost: a small CNN profiled on two device profiles of this one CPU
(ONNX Runtime and OpenVINO), one after the other and then both at once (`profile(device=[a, b])`):
the two take turns on the CPU, so at once is no faster; each device's time spent waiting for
its turn is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from edgeprune.pipeline import prune_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodeCluster:
    """`ray start --head` and `ray start --address` (one CPU each), stopped on exit."""

    def __enter__(self) -> str:
        ray = str(Path(sys.executable).parent / "ray")
        # token authentication, as Ray 2.60 sets up for a head it starts; every node must use it
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        port = _free_port()
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        self.ray = ray
        subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                       env=self.env, check=True, capture_output=True)  # fmt: skip
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *common],
                       env=self.env, check=True, capture_output=True)  # fmt: skip
        os.environ["RAY_AUTH_MODE"] = "token"
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        subprocess.run([self.ray, "stop", "--force"], env=self.env, capture_output=True)
        os.environ.pop("RAY_AUTH_MODE", None)


def run(args, name: str, **where) -> dict:
    out = Path("runs/bench-scale") / name.replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    record = prune_run(
        out, weights=args.weights, device=args.device, budget=args.budget, search=args.search, evals=args.evals,
        batch=args.batch, seed=0, proxy_steps=args.proxy_steps, progress=False, log=lambda s: None,
        **({"worker_gpus": args.worker_gpus} if args.worker_gpus else {}), **where,
    )  # fmt: skip
    record["wall_s"] = time.perf_counter() - t0
    from edgeprune.runs import RunStore

    store = RunStore(out)
    record["evaluations"] = [(tuple(r["counts"]), round(r["score"], 6)) for r in store.evals() if r["round"] == 0]
    store.close()
    print(f"{name}: {record['wall_s']:.0f} s, {record['scoring']}", flush=True)
    return record


def devices_at_once() -> None:
    import tempfile

    import edgeprune
    from edgeprune.devices import Device

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3),
        torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()  # fmt: skip
    names = ["cpu-onnxruntime", "cpu-openvino"]
    kw = {"step": 8, "calibrate": 4, "progress": False, "log": lambda s: None}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for name in names:
            edgeprune.profile(model, (1, 3, 32, 32), device=name, out=Path(d) / f"seq-{name}.json", **kw)
        sequential = time.perf_counter() - t0
        devices = [Device.load(n) for n in names]
        t0 = time.perf_counter()
        edgeprune.profile(model, (1, 3, 32, 32), device=devices, out=[Path(d) / f"par-{n}.json" for n in names], **kw)
        together = time.perf_counter() - t0
    waits = ", ".join(f"{dev.name} waited {dev.queue.waited_s:.0f} s for its turn" for dev in devices)
    print(f"\ntwo profiles of this CPU: one after the other {sequential:.0f} s, at once {together:.0f} s ({waits})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="zoo:resnet20-fashion-mnist")
    ap.add_argument("--device", default="cpu-onnxruntime")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--search", default="bocr")
    ap.add_argument("--evals", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--proxy-steps", type=int, default=0)
    ap.add_argument("--worker-gpus", type=float, default=0.0, help="GPUs each scoring task asks for (a GPU host)")
    ap.add_argument("--no-devices", action="store_true", help="skip the two-profiles-at-once part")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the driver's own share: the searcher and the device's exports
    runs = {"1 worker": run(args, "1 worker", workers=1), "2 workers": run(args, "2 workers", workers=2)}
    with TwoNodeCluster() as address:
        runs["2 nodes"] = run(args, "2 nodes", ray=address)
    base = runs["1 worker"]
    print(
        f"\n{args.search}, {args.evals} evaluations at q = {args.batch}, seed 0, {args.weights} on {args.device}, "
        f"budget {args.budget}; {os.cpu_count()} cores here"
    )
    head = f"{'':<10}{'wall s':>8}{'scoring s':>11}{'rest s':>8}{'x wall':>8}{'x scoring':>11}"
    print(head + f"{'nodes':>7}{'evals':>7}  same evaluations   chosen (proxy, measured ms)")
    for name, r in runs.items():
        rest = r["wall_s"] - r["seconds_scoring"]
        same = "yes" if r["evaluations"] == base["evaluations"] else "NO"
        c = r["chosen"]
        print(
            f"{name:<10}{r['wall_s']:>8.0f}{r['seconds_scoring']:>11.0f}{rest:>8.0f}"
            f"{base['wall_s'] / r['wall_s']:>8.2f}{base['seconds_scoring'] / r['seconds_scoring']:>11.2f}"
            f"{r['scoring']['nodes']:>7}{r['evals']:>7}  {same:<18} {c['proxy_accuracy']:.2%}, {c['measured_ms']:.4g}"
        )
    print(json.dumps({k: {"wall_s": v["wall_s"], "seconds_scoring": v["seconds_scoring"]} for k, v in runs.items()}))
    if not args.no_devices:
        devices_at_once()


if __name__ == "__main__":
    main()
