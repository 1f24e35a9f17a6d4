"""Candidate scoring on Ray workers: the search's evaluations, in parallel.

Each worker is a Ray actor holding what scoring needs, built once: the model and the task (from
Ray's object store, put there once by the driver), its own prunable space of the model and its
own `ProxyEvaluator` (calibration batches, the teacher's targets). The driver hands out plans,
one per idle worker, and collects (score, seconds); it alone writes the run's store.

A worker that dies (killed, out of memory, its node lost) loses only the plan it was scoring:
Ray restarts the actor (rebuilding it from the object store) and the plan is handed out again.
A plan that kills its worker `MAX_ATTEMPTS` times is an error, not a loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from edgeprune.cluster.session import error_line
from edgeprune.errors import EdgepruneError

MAX_ATTEMPTS = 3


class ProxyWorker:
    """One scoring worker (a Ray actor): the model's space and proxy, built on the worker at its first
    call from `shared` (references to the model and the task in the object store, fetched once per
    worker process; after a restart, fetched again)."""

    def __init__(self, example_input, space_args: dict, evaluator_args: dict, threads: int) -> None:
        import os

        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.where = (os.getpid(), ray.get_runtime_context().get_node_id())
        self.args = (example_input, space_args, evaluator_args)
        self.evaluator = None

    def _ready(self, shared: list) -> None:
        if self.evaluator is not None:
            return
        import ray

        from edgeprune.pruning import space
        from edgeprune.search.proxy import ProxyEvaluator

        model, task = ray.get(shared)
        example_input, space_args, evaluator_args = self.args
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # a task given a (share of a) GPU scores on it
        s = space(model.eval(), example_input, **space_args)
        self.evaluator = ProxyEvaluator(s, task, device=device, **evaluator_args)

    def process(self, shared: list) -> tuple[int, str]:
        """(process id, Ray node id): where this worker runs, once it is ready to score."""
        self._ready(shared)
        return self.where

    def score(self, shared: list, counts: Sequence[int]) -> tuple[float, float, str]:
        """(score, seconds, plan hash) of the plan keeping `counts`."""
        self._ready(shared)
        t0 = time.perf_counter()
        plan = self.evaluator.plan(counts)
        score = self.evaluator.compute(plan)
        return score, time.perf_counter() - t0, plan.hash()


class ScoringPool:
    """Ray actors that score plans, one plan at a time each; `score(plans)` returns in plan order."""

    def __init__(self, session, *, model, example_input, space_args: dict, task, evaluator_args: dict, log=print):
        self.session, self.log = session, log
        ray, o = session.ray, session.options
        # the model and the task go to the object store once; each call carries only their references
        self.shared = [session.put(model, code_of=list(model.modules())), session.put(task, code_of=_task_code(task))]
        actor = ray.remote(ProxyWorker).options(
            num_cpus=o.worker_cpus, num_gpus=o.worker_gpus, max_restarts=-1, max_task_retries=0
        )
        threads = max(1, int(o.worker_cpus))
        self.actors = [actor.remote(example_input, space_args, evaluator_args, threads) for _ in range(session.slots)]
        self.requeued = 0
        try:  # every worker built before the first plan is handed out: a model that cannot load fails here, once
            self.where = ray.get([a.process.remote(self.shared) for a in self.actors])
        except Exception as e:
            self.close()
            raise EdgepruneError(f"the scoring workers could not be started: {error_line(e)}") from None

    def summary(self) -> dict:
        """Where the scoring ran (results.json's `scoring`)."""
        return {
            "where": self.session.options.describe(),
            "workers": len(self.where),
            "nodes": len({node for _, node in self.where}),
            "requeued": self.requeued,
        }

    def score(self, plans: list[Sequence[int]], hashes: list[str]) -> list[tuple[float, float]]:
        """(score, seconds) of each plan, computed on the workers; `hashes`: the driver's plan hashes,
        which each worker's must equal (the same space on both sides)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        ray = self.session.ray
        queue = deque(range(len(plans)))
        idle = list(self.actors)
        running: dict = {}
        results: list = [None] * len(plans)
        attempts = [0] * len(plans)
        while queue or running:
            while queue and idle:
                i, a = queue.popleft(), idle.pop()
                attempts[i] += 1
                running[a.score.remote(self.shared, [int(c) for c in plans[i]])] = (i, a)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, a = running.pop(ref)
            idle.append(a)  # Ray restarts a dead actor; calls wait until it is back
            try:
                score, seconds, plan_hash = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError):
                if attempts[i] >= MAX_ATTEMPTS:
                    raise EdgepruneError(
                        f"the plan {hashes[i]} killed its scoring worker {attempts[i]} times (out of memory?): "
                        "give each worker more memory, or fewer --workers"
                    ) from None
                self.requeued += 1
                self.log(f"a scoring worker died while scoring plan {hashes[i]}: scoring it again")
                queue.appendleft(i)
                continue
            except RayTaskError as e:
                raise _cause(e) from None
            if plan_hash != hashes[i]:
                raise EdgepruneError(
                    f"a worker built another plan ({plan_hash}) from the keep-counts of {hashes[i]}: the model's "
                    "space differs on the workers; check that they run the same edgeprune and torch-pruning"
                )
            results[i] = (score, seconds)
        return results

    def close(self) -> None:
        for a in self.actors:
            self.session.ray.kill(a)
        self.actors = []


def _task_code(task) -> list:
    """The user's callables a task carries (their modules travel by value)."""
    found = [getattr(task, k, None) for k in ("score", "loss", "input_of", "test_score")]
    train = getattr(task, "train", None)
    found.append(getattr(train, "source", None))
    return [f for f in found if f is not None]


def _cause(error) -> Exception:
    """The exception a worker raised, as the driver's own (an EdgepruneError stays one line)."""
    cause = error.cause if getattr(error, "cause", None) is not None else error
    if isinstance(cause, EdgepruneError):
        return EdgepruneError(str(cause))
    return cause
