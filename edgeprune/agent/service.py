"""The agent's work, apart from HTTP: jobs onto the board, one worker measuring them in turn,
results into the cache (models arrive there vetted, from `vetting`)."""

from __future__ import annotations

import logging
import threading
import time

from edgeprune import __version__
from edgeprune.agent.cache import AgentCache
from edgeprune.agent.jobs import CANCELLED_RESULT, Job, JobBoard
from edgeprune.agent.limits import Limits
from edgeprune.agent.protocol import API
from edgeprune.backends.worker import JobTimeout, Worker, WorkerDied
from edgeprune.devices.spec import DeviceSpec

log = logging.getLogger("edgeprune.agent")

# the item's model file failed its hash check and was dropped: the client sends the model again
RESEND = "the agent's copy of this model was damaged and has been dropped; send the model again"


class Agent:
    """State of one agent: cache, job board, worker (and the thread that feeds it)."""

    def __init__(self, spec: DeviceSpec, cache: AgentCache, limits: Limits) -> None:
        self.spec, self.cache, self.limits = spec, cache, limits
        self.board = JobBoard(max_queued=limits.max_queued, keep_jobs=limits.keep_jobs, keep_s=limits.keep_s)
        self.worker = Worker(spec.to_dict())
        self.fingerprint = spec.make_backend().fingerprint()
        self.measured = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _answer(self, item: dict, result: dict, cached: bool) -> dict:
        return {**result, "cached": cached, "model": item["hash"], "input_shape": item["input_shape"]}

    def submit(self, items: list[dict], protocol: dict, *, fresh: bool = False) -> Job:
        """A job with its cached answers filled in; QueueFull (nothing queued) if the rest does not fit."""
        job = Job(items, protocol, fresh=fresh)
        for i, item in enumerate(items):
            hit = None if fresh else self.cache.result(item["key"])
            if hit is not None:
                job.results[i] = self._answer(item, hit, cached=True)
        self.board.add(job)
        return job

    def cancel(self, job: Job, *, only_queued: bool = False) -> str:
        """Cancel a job; a measurement of it in progress is stopped (never another job's).
        Returns its status before."""
        with self.board.cond:
            before = self.board.cancel(job, only_queued=only_queued)
            if before == "running" and not only_queued and self.board.measuring is job:
                self.worker.interrupt()
        return before

    def _run(self, job: Job, item: dict) -> tuple[str, object]:
        """The worker's answer for one item; ('cancelled', None) where the job was cancelled first."""
        with self.board.cond:
            if job.cancel_requested:
                return "cancelled", None
            self.board.measuring = job
        try:
            return self.worker.run(str(self.cache.model_path(item["hash"])), item["input_shape"], job.protocol,
                                   self.limits.job_timeout_s)  # fmt: skip
        except (WorkerDied, JobTimeout) as e:
            return ("cancelled", None) if job.cancel_requested else ("error", str(e))
        finally:
            with self.board.cond:
                self.board.measuring = None

    def _measure(self, job: Job, item: dict) -> dict:
        if not self.cache.intact(item["hash"]):
            return {"error": RESEND, "resend": True, "model": item["hash"]}
        status, payload = self._run(job, item)
        if status == "cancelled":
            return dict(CANCELLED_RESULT)
        if status != "ok":
            return {"error": payload, "model": item["hash"]}
        result = {"measurement": payload, "fingerprint": self.fingerprint, "protocol": job.protocol,
                  "measured_at": time.time()}  # fmt: skip
        self.cache.store_result(item["key"], result)
        self.measured += 1
        return self._answer(item, result, cached=False)

    def _loop(self) -> None:
        while True:
            job = self.board.next()
            for i, item in enumerate(job.items):
                if job.cancel_requested:
                    break
                if job.results[i] is not None:
                    continue
                try:
                    hit = None if job.fresh else self.cache.result(item["key"])  # an earlier job may have measured it
                    result = self._answer(item, hit, cached=True) if hit is not None else self._measure(job, item)
                except Exception as e:  # a full disk, say: this item fails, the agent keeps measuring
                    log.error("item %d of job %s failed: %s: %s", i, job.id, type(e).__name__, e)
                    result = {"error": f"agent error: {type(e).__name__}: {str(e)[:200]}", "model": item["hash"]}
                self.board.record(job, i, result)
            self.board.end(job)

    def info(self) -> dict:
        return {
            "agent_version": __version__,
            "api": API,
            "device": self.spec.name,
            "backend": self.spec.backend,
            "fingerprint": self.fingerprint,
            "queue_length": self.board.pending,
            "measured": self.measured,
            "worker_pid": self.worker.pid,
            "protocol": self.spec.protocol.to_dict(),
            "limits": self.limits.to_dict(),
        }
