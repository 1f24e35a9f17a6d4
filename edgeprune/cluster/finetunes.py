"""Finetunes as tasks: several runs, several seeds each, on Ray workers or in turn here.

How much of an accuracy gap between two plans is the finetune's own seed is only known by
finetuning each plan with several seeds. Each (run, seed) is a job with a folder of its own,
a copy of the run (OUT/RUN-sSEED: its config, plan, pruned.pt and dense.pt) finetuned there by
`finetune_run`, which keeps its position as it trains: a job cut short (its worker died, the
driver was killed, `stop_after` passed) resumes from it when asked again, and a finished one is
not repeated. On Ray each job is a task asking `worker_cpus`/`worker_gpus` (it trains on
`cuda` where it was given a GPU), re-run by Ray where its worker dies. The job folders must be
on storage every node of the cluster sees (a local cluster's are).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeprune.cluster.session import ClusterOptions, RaySession, error_line
from edgeprune.errors import EdgepruneError

COPIED = ("config.json", "plan.json", "pruned.pt", "dense.pt", "results.json")


@dataclass
class FinetuneJob:
    run: Path  # the run folder finetuned
    seed: int
    folder: Path  # its copy, where this seed's finetune lives

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def done(self) -> bool:
        return (self.folder / "finetune.json").is_file()

    def prepare(self) -> None:
        """Copy what the finetune reads (once: a started job keeps its own files)."""
        if (self.folder / "pruned.pt").is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (self.run / name).is_file():
                shutil.copy2(self.run / name, self.folder / name)


def seed_jobs(runs: Sequence[str | os.PathLike], seeds: Sequence[int], out: str | os.PathLike | None) -> list:
    """One job per (run, seed), seed by seed (a study cut short has every run at its first seeds);
    the copies in `out`, or in each RUN/seeds/."""
    jobs = []
    for run in map(Path, runs):
        if not (run / "pruned.pt").is_file():
            raise EdgepruneError(f"{run} has no pruned.pt: give run folders written by `edgeprune prune`")
    names = [Path(r).name for r in runs]
    if out is not None and len(set(names)) < len(names):
        raise EdgepruneError(
            f"two runs are named alike ({', '.join(names)}): their copies would share a folder in {out}"
        )
    for seed in seeds:
        for run in map(Path, runs):
            folder = (Path(out) / f"{run.name}-s{seed}") if out is not None else run / "seeds" / f"s{seed}"
            jobs.append(FinetuneJob(run, int(seed), folder))
    return jobs


def _finetune_job(folder: str, seed: int, recipe: dict, threads: int) -> dict:
    """One job's finetune (on a worker, or here)."""
    from edgeprune.pipeline.finetune import finetune_run

    torch.set_num_threads(max(1, threads))
    return finetune_run(folder, seed=seed, progress=False, log=lambda s: None, **recipe)


def finetune_seeds(
    runs: Sequence[str | os.PathLike],
    *,
    seeds: Sequence[int],
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    ray: str | None = None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    stop_after: float | None = None,
    log=print,
    **recipe,
) -> list[dict]:
    """Finetune every run with every seed (`recipe`: finetune_run's epochs, lr, ... and device);
    returns the finished jobs' finetune.json records, each with its `run` and `seed`, in job order."""
    if not seeds:
        raise EdgepruneError("give at least one seed")
    cluster = ClusterOptions(workers=workers, address=ray, worker_cpus=worker_cpus, worker_gpus=worker_gpus)
    jobs = seed_jobs(runs, seeds, out)
    todo = [j for j in jobs if not j.done]
    for j in todo:
        j.prepare()
    log(
        f"{len(jobs)} finetunes ({len(jobs) - len(todo)} already done)"
        + (f", on {cluster.describe()}" if cluster.enabled and todo else "")
    )
    started = time.monotonic()
    if todo and cluster.enabled:
        with RaySession(cluster, log=log) as session:
            _on_ray(session, todo, recipe, stop_after, started, log)
    else:
        for k, j in enumerate(todo):
            if stop_after is not None and time.monotonic() - started > stop_after:
                break
            r = _finetune_job(str(j.folder), j.seed, recipe, torch.get_num_threads())
            log(f"{k + 1}/{len(todo)} {j.name}: test {r['test_accuracy']:.2%} ({r['seconds']:.0f} s)")
    return [
        {**json.loads((j.folder / "finetune.json").read_text()), "run": str(j.run), "seed": j.seed}
        for j in jobs
        if j.done
    ]


def _on_ray(session, todo: list, recipe: dict, stop_after: float | None, started: float, log) -> None:
    """The jobs as Ray tasks, reported as each finishes; past `stop_after`, the rest are interrupted
    (their position saved) and left for the next call."""
    ray, o = session.ray, session.options
    if o.worker_gpus and recipe.get("device", "cpu") == "cpu":
        recipe = {**recipe, "device": "cuda"}  # a task given a GPU trains on it
    task = ray.remote(_finetune_job).options(num_cpus=o.worker_cpus, num_gpus=o.worker_gpus, max_retries=3)
    threads = max(1, int(o.worker_cpus))
    running = {task.remote(str(j.folder), j.seed, recipe, threads): j for j in todo}
    done, failed = 0, []
    while running:
        left = None if stop_after is None else max(0.0, stop_after - (time.monotonic() - started))
        ready, _ = ray.wait(list(running), num_returns=1, timeout=left)
        if not ready:  # out of time: interrupt what runs (a KeyboardInterrupt there saves its position)
            for ref in running:
                ray.cancel(ref)
            ray.wait(list(running), num_returns=len(running), timeout=60)  # saving a position takes seconds
            log(f"stopped after {stop_after:.0f} s: {len(running)} finetunes left; the same call resumes them")
            return
        ref = ready[0]
        j = running.pop(ref)
        try:
            r = ray.get(ref)
        except Exception as e:  # a finetune's own error: the others go on, and it is said
            failed.append(f"{j.folder}: {error_line(e)}")
            log(f"{j.name}: finetune failed: {failed[-1]}")
            continue
        done += 1
        log(f"{done}/{len(todo)} {j.name}: test {r['test_accuracy']:.2%} ({r['seconds']:.0f} s)")
    if failed:  # the others finished and are kept; the same call retries these
        raise EdgepruneError(f"{len(failed)} of {len(todo)} finetunes failed; the first: {failed[0]}")


def seed_table(runs: Sequence[str | os.PathLike], records: list[dict]) -> list[dict]:
    """Per run: its seeds' test accuracies (by seed), their mean and standard deviation."""
    rows = []
    for run in (str(Path(r)) for r in runs):
        accs = {r["seed"]: r["test_accuracy"] for r in records if r["run"] == run}
        values = list(accs.values())
        rows.append(
            {
                "run": run,
                "test_accuracy": accs,
                "mean": statistics.mean(values) if values else None,
                "sd": (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None,
            }
        )
    return rows
