"""How much of an accuracy gap between two pruned plans is the finetune's own seed.

    python bench/finetune_seeds.py RUN [RUN ...] [--seeds 3] [--first-seed 0] [--epochs 30]
                                   [--workers 9 | --ray ADDRESS] [--worker-gpus 0.1] [--stop-after S]

Each RUN (a run directory with pruned.pt) is copied to OUT/NAME-sK for every seed K and finetuned
there with that seed, the same recipe as bench/ship.py, through edgeprune's own scale-out path
(`edgeprune.cluster.finetunes.finetune_seeds`: each copy a Ray task with --workers or --ray,
in turn without). Where the run was already finetuned with that recipe and seed (ship.py
finetunes with seed 0), its own finetune is kept instead. The table gives each run's test
accuracy per seed, mean and standard deviation, and each run's mean minus the first run's.
A GPU host finetunes them all at once (--workers N --worker-gpus 1/N). --first-seed adds seeds to
a study done elsewhere. Jobs are ordered seed by seed, so a study cut short has each run at its
first seeds. --stop-after S (a leased machine's time limit) interrupts the finetunes still
running after S seconds: each saves its position, and the same command resumes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    ap.add_argument("--workers", type=int, default=None, help="a local Ray of N workers")
    ap.add_argument("--ray", default=None, help="a Ray cluster's address")
    ap.add_argument("--worker-cpus", type=float, default=1.0)
    ap.add_argument("--worker-gpus", type=float, default=0.0)
    ap.add_argument("--stop-after", type=float, default=None, help="seconds; interrupt what still runs then")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-seeds"))
    args = ap.parse_args()
    if not args.runs:
        raise SystemExit("give one or more run directories (written by `edgeprune prune`)")
    if args.seeds < 1 or args.first_seed < 0:
        raise SystemExit("--seeds must be at least 1 and --first-seed at least 0")
    from edgeprune.cluster.finetunes import finetune_seeds, seed_jobs, seed_table

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for job in seed_jobs(args.runs, seeds, args.out):
        if not job.done and _same_recipe(job.run, args, job.seed):  # the run's own finetune is this seed's
            job.prepare()
            shutil.copy2(job.run / "finetuned.pt", job.folder / "finetuned.pt")
            fine = json.loads((job.run / "finetune.json").read_text())
            fine.update(run_dir=str(job.folder), checkpoint=str(job.folder / "finetuned.pt"), reused_from=str(job.run))
            (job.folder / "finetune.json").write_text(json.dumps(fine, indent=1) + "\n")
            print(f"{job.name}: the run's own finetune has this recipe and seed; reused", flush=True)
    records = finetune_seeds(
        args.runs, seeds=seeds, out=args.out, workers=args.workers, ray=args.ray, worker_cpus=args.worker_cpus,
        worker_gpus=args.worker_gpus, stop_after=args.stop_after, epochs=args.epochs, lr=args.lr,
        device=args.train_device, log=lambda s: print(s, flush=True),
    )  # fmt: skip
    print(f"{'run':<50}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}{'sd':>7}{'vs first':>10}")
    first = None
    for row in seed_table(args.runs, records):
        accs = [row["test_accuracy"].get(s) for s in seeds]
        run = Path(row["run"])
        label = f"{run.parent.name}/{run.name}"
        cells = "".join(f"{a * 100:>8.2f}%" if a is not None else f"{'-':>9}" for a in accs)
        if row["mean"] is None:
            print(f"{label:<50}{cells}")
            continue
        mean, sd = row["mean"] * 100, row["sd"] * 100
        first = mean if first is None else first
        print(f"{label:<50}{cells}{mean:>8.2f}%{sd:>7.2f}{mean - first:>+9.2f}p")
    print(f"finetune: {args.epochs} epochs on {args.train_device}, lr {args.lr}; accuracy = test split (PyTorch)")


if __name__ == "__main__":
    main()
