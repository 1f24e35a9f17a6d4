"""How much of an accuracy gap between two pruned plans is the finetune's own seed.

    python bench/finetune_seeds.py RUN [RUN ...] [--seeds 3] [--first-seed 0] [--epochs 30] [--jobs 9]

Each RUN (a run directory with pruned.pt) is copied to OUT/NAME-sK for every seed K and finetuned
there with that seed, the same recipe as bench/ship.py. Where the run was already finetuned with
that recipe and seed (ship.py finetunes with seed 0), its own finetune is kept instead. The table
gives each run's test accuracy per seed, mean and standard deviation, and each run's mean minus
the first run's. The copies are separate processes, so a GPU host can finetune them all at once
(--jobs; --train-device cuda). --first-seed adds seeds to a study done elsewhere (e.g. seed 0 on a
GPU host). Jobs start seed by seed (every run's first seed, then every run's second, ...), so a
study cut short still has each run at its first seeds. --stop-after S (a leased machine's time
limit) interrupts the finetunes still running after S seconds: each saves its position, and the
same command resumes them; the table then lists the seeds finished so far.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

COPY = ("config.json", "plan.json", "pruned.pt", "results.json", "dense.pt")


def _same_recipe(run: Path, args, seed: int) -> bool:
    """Whether RUN was already finetuned with this recipe and seed (bench/ship.py finetunes with seed 0)."""
    from dataclasses import asdict

    from edgeprune.training import DistillConfig, Recipe

    try:
        fine = json.loads((run / "finetune.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = asdict(Recipe(epochs=args.epochs, lr=args.lr, seed=seed))  # what finetune() builds from these
    return (
        (run / "finetuned.pt").is_file()
        and fine.get("recipe") == wanted
        and fine.get("distillation") == asdict(DistillConfig())
        and fine.get("device") == args.train_device
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)  # bench/ship.py's
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--train-device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per finetune (default: cores / jobs)")
    ap.add_argument("--stop-after", type=float, default=None, help="seconds; interrupt what still runs then")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-seeds"))
    ap.add_argument("--one", nargs=2, metavar=("RUN", "SEED"), help=argparse.SUPPRESS)  # a child's job
    args = ap.parse_args()
    if args.one:
        from edgeprune.pipeline import finetune_run as finetune

        # a job started in the background by a script inherits SIGINT ignored (POSIX), and Python then
        # leaves it so: on the device machine the --stop-after interrupt reached no child, and the
        # command ran past its time limit. Here an interrupt raises KeyboardInterrupt, whatever the parent
        signal.signal(signal.SIGINT, signal.default_int_handler)

        r = finetune(
            args.one[0], epochs=args.epochs, lr=args.lr, seed=int(args.one[1]), device=args.train_device, progress=False
        )
        print(f"{args.one[0]}: test {r['test_accuracy']:.2%} ({r['seconds']:.0f} s)", flush=True)
        return
    if not args.runs:
        raise SystemExit("give one or more run directories (written by `edgeprune prune`)")
    for run in args.runs:
        if not (run / "pruned.pt").is_file():
            raise SystemExit(f"{run} holds no pruned.pt: give run directories written by `edgeprune prune`")
    if args.seeds < 1 or args.first_seed < 0:
        raise SystemExit("--seeds must be at least 1 and --first-seed at least 0")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = []
    for seed in seeds:  # seed-major: a study cut short has every run at its first seeds
        for run in args.runs:
            copy = args.out / f"{run.name}-s{seed}"
            if (copy / "finetune.json").is_file():
                continue
            copy.mkdir(parents=True, exist_ok=True)
            for f in COPY:
                if (run / f).is_file():
                    shutil.copy2(run / f, copy / f)
            if _same_recipe(run, args, seed):  # the run's own finetune is this seed's: keep it
                shutil.copy2(run / "finetuned.pt", copy / "finetuned.pt")
                fine = json.loads((run / "finetune.json").read_text())
                fine.update(run_dir=str(copy), checkpoint=str(copy / "finetuned.pt"), reused_from=str(run))
                (copy / "finetune.json").write_text(json.dumps(fine, indent=1) + "\n")
                print(f"{copy.name}: the run's own finetune has this recipe and seed; reused", flush=True)
                continue
            jobs.append((copy, seed))
    common = ["--epochs", str(args.epochs), "--lr", str(args.lr), "--train-device", args.train_device]
    # each child gets its share of the cores: 9 children on a 16-core H100 host, each with torch's
    # default thread count, had not finished after 380 s where one alone takes ~115 s
    threads = str(args.threads or max(1, (os.cpu_count() or 1) // max(1, min(args.jobs, len(jobs) or 1))))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    procs: list[tuple[Path, subprocess.Popen]] = []
    t0 = time.monotonic()

    def out_of_time() -> bool:
        return args.stop_after is not None and time.monotonic() - t0 > args.stop_after

    for copy, seed in jobs:
        while sum(p.poll() is None for _, p in procs) >= args.jobs and not out_of_time():
            time.sleep(1)
        if out_of_time():
            break
        log = open(copy / "finetune.log", "a")  # noqa: SIM115 - the child process owns it
        cmd = [sys.executable, __file__, *common, "--one", str(copy), str(seed)]
        procs.append((copy, subprocess.Popen(cmd, stdout=log, stderr=log, env=env)))
    while any(p.poll() is None for _, p in procs) and not out_of_time():
        time.sleep(1)
    stopped = [c for c, p in procs if p.poll() is None]
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)  # fit saves its position on KeyboardInterrupt
    for c, p in procs:
        try:
            p.wait(timeout=60)  # saving a position takes a second; a child stuck past this is ended
        except subprocess.TimeoutExpired:
            print(f"{c.name}: no answer to the interrupt in 60 s; ended without saving its position", flush=True)
            p.kill()
            p.wait()
    failed = [str(c) for c, p in procs if p.returncode != 0 and c not in stopped]
    if failed:
        raise SystemExit(f"finetune failed for {failed}; see their finetune.log")
    left = len(jobs) - (len(procs) - len(stopped))
    if left:
        print(
            f"stopped after {args.stop_after:.0f} s: {left} of {len(jobs)} finetunes not finished "
            f"({len(stopped)} interrupted, their positions saved); the same command resumes them",
            flush=True,
        )
    if jobs and not left:
        print(f"{len(jobs)} finetunes in {time.monotonic() - t0:.0f} s", flush=True)
    print(f"{'run':<50}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}{'sd':>7}{'vs first':>10}")
    first = None
    for run in args.runs:
        done = [args.out / f"{run.name}-s{s}" / "finetune.json" for s in seeds]
        accs = [json.loads(f.read_text())["test_accuracy"] * 100 if f.is_file() else None for f in done]
        have = [a for a in accs if a is not None]
        label = f"{run.parent.name}/{run.name}"
        cells = "".join(f"{a:>8.2f}%" if a is not None else f"{'-':>9}" for a in accs)
        if not have:
            print(f"{label:<50}{cells}")
            continue
        mean = statistics.mean(have)
        sd = statistics.stdev(have) if len(have) > 1 else 0.0
        first = mean if first is None else first
        print(f"{label:<50}{cells}{mean:>8.2f}%{sd:>7.2f}{mean - first:>+9.2f}p")
    print(f"finetune: {args.epochs} epochs on {args.train_device}, lr {args.lr}; accuracy = test split (PyTorch)")


if __name__ == "__main__":
    main()
