"""The agent's jobs: a bounded queue in front of the one device, and the table clients poll.

A job is a list of models to measure. It waits in the queue, runs item by item, and ends done or
cancelled. Only finished jobs ever leave the table (by age, then by count): a client polling a
long batch never finds it gone. The queue holds at most `max_queued` items: a request that would
pass it is refused whole (HTTP 503, nothing queued), so a client's retry cannot queue twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"
CANCELLED_RESULT = {"error": "cancelled", "cancelled": True}


class QueueFull(Exception):
    """Nothing was queued; the message says how full the queue is."""


@dataclass
class Job:
    items: list[dict]  # {"hash", "input_shape", "key"}
    protocol: dict
    fresh: bool = False  # measure again even where a result is cached (a comparison, a drift check)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = QUEUED
    results: list[dict | None] = field(default_factory=list)
    cancel_requested: bool = False
    finished_at: float | None = None  # time.monotonic() when it ended

    def __post_init__(self) -> None:
        if not self.results:
            self.results = [None] * len(self.items)

    @property
    def todo(self) -> int:
        return sum(r is None for r in self.results)

    def view(self) -> dict:
        done = sum(r is not None for r in self.results)
        return {"job": self.id, "status": self.status, "done": done, "total": len(self.items), "results": self.results}


class JobBoard:
    """The queue and the table, under one lock (the worker thread and the request handlers share them)."""

    def __init__(self, *, max_queued: int, keep_jobs: int, keep_s: float) -> None:
        self.max_queued, self.keep_jobs, self.keep_s = max_queued, keep_jobs, keep_s
        self.jobs: dict[str, Job] = {}
        self.waiting: deque[Job] = deque()
        self.pending = 0  # items waiting to be measured, over all jobs
        self.measuring: Job | None = None  # the job whose item is in the worker right now
        self.cond = threading.Condition()  # reentrant: a cancel stops the worker while holding it

    def add(self, job: Job) -> None:
        """Queue `job` (or file it as done when nothing is left to measure); QueueFull if it does not fit."""
        with self.cond:
            todo = job.todo
            if todo and self.pending + todo > self.max_queued:
                raise QueueFull(
                    f"the agent's queue is full ({self.pending} items waiting, {todo} more asked, "
                    f"limit {self.max_queued}); nothing was queued, retry later"
                )
            self._expire()
            self.jobs[job.id] = job
            if todo:
                self.pending += todo
                self.waiting.append(job)
                self.cond.notify()
            else:
                self._finish(job, DONE)

    def get(self, job_id: str) -> Job | None:
        with self.cond:
            return self.jobs.get(job_id)

    def next(self) -> Job:
        """The next job to run (blocks until there is one); it is marked running."""
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            job = self.waiting.popleft()
            job.status = RUNNING
            return job

    def record(self, job: Job, i: int, result: dict) -> None:
        with self.cond:
            if job.results[i] is None:
                self.pending -= 1
            job.results[i] = result

    def end(self, job: Job) -> None:
        """The worker is through with `job`: done, or cancelled if that was asked meanwhile."""
        with self.cond:
            if job.cancel_requested:
                self._cancel_rest(job)
            self._finish(job, CANCELLED if job.cancel_requested else DONE)

    def cancel(self, job: Job, *, only_queued: bool = False) -> str:
        """Cancel `job`; returns its status before: a queued job is cancelled at once, a running one
        is flagged (its caller stops the measurement) unless `only_queued`, a finished one is left."""
        with self.cond:
            before = job.status
            if before == QUEUED:
                self.waiting.remove(job)
                self._cancel_rest(job)
                self._finish(job, CANCELLED)
            elif before == RUNNING and not only_queued:
                job.cancel_requested = True
            return before

    def _cancel_rest(self, job: Job) -> None:
        for i, r in enumerate(job.results):
            if r is None:
                job.results[i] = dict(CANCELLED_RESULT)
                self.pending -= 1

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished_at = status, time.monotonic()

    def _expire(self) -> None:
        """Finished jobs leave after `keep_s`, the oldest first beyond `keep_jobs`; unfinished ones never."""
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        finished.sort(key=lambda j: j.finished_at)
        excess = len(finished) - self.keep_jobs + 1  # room for the one being added
        for j in finished:
            if now - j.finished_at > self.keep_s or excess > 0:
                del self.jobs[j.id]
                excess -= 1
