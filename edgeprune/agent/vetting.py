"""Request bodies into vetted job items, in a process of their own.

Decoding a large model (JSON, base64, ONNX parsing and checking: ~0.35 s for a 42 MB model here)
holds the interpreter lock; in a thread of the agent it stalled health checks and polls for as
long. In a separate process the agent's event loop stays free, and a parser crash on a crafted
model ends that process, not the agent: the request is refused and a new process takes over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from edgeprune.agent import wire
from edgeprune.agent.cache import AgentCache
from edgeprune.agent.validation import Rejected, check_model


def result_key(model_hash: str, shape: list[int], protocol: dict, fingerprint: dict) -> str:
    """A result's cache key: the same model, shape and protocol on the same device measure alike."""
    blob = json.dumps([model_hash, list(shape), protocol, fingerprint], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Vetter:
    """What vetting needs to know of its agent (sent to the vetting process with each body)."""

    cache_root: Path
    fingerprint: dict
    default_protocol: dict
    max_items: int
    max_input_elements: int

    def _item(self, item: dict, protocol: dict) -> dict:
        shape = wire.parse_shape(item.get("input_shape"), self.max_input_elements)
        data = wire.decode_model(item)
        try:
            check_model(data, shape)
        except Rejected as e:
            raise wire.BadRequest(400, str(e)) from None
        digest = hashlib.sha256(data).hexdigest()
        try:
            AgentCache(self.cache_root, clean=False).store_model(data, digest)
        except OSError as e:
            raise wire.BadRequest(
                503, f"the agent cannot store the model now ({e.strerror or e}); nothing was queued"
            ) from None
        return {"hash": digest, "input_shape": shape, "key": result_key(digest, shape, protocol, self.fingerprint)}

    def one(self, body: bytes) -> tuple[dict, dict, bool]:
        """`POST /measure`'s body: (item, protocol, fresh)."""
        data = wire.parse_json(body)
        protocol = wire.parse_protocol(data, self.default_protocol)
        return self._item(data, protocol), protocol, wire.parse_fresh(data)

    def many(self, body: bytes) -> tuple[list[dict], dict, bool]:
        """`POST /jobs`' body: (items, protocol, fresh); a model measured in turn is sent once and
        referred to by later items (`same_as`)."""
        data = wire.parse_json(body)
        protocol = wire.parse_protocol(data, self.default_protocol)
        fresh = wire.parse_fresh(data)
        prepared: list[dict] = []
        for item in wire.parse_items(data, self.max_items):
            if "same_as" not in item:
                prepared.append(self._item(item, protocol))
                continue
            j = item["same_as"]
            if type(j) is not int or not 0 <= j < len(prepared):
                raise wire.BadRequest(400, f"'same_as' must be the index of an earlier item, got {j!r}")
            shape = wire.parse_shape(item.get("input_shape"), self.max_input_elements)
            if shape != prepared[j]["input_shape"]:
                raise wire.BadRequest(
                    400, f"an item 'same_as' {j} must have its input shape {prepared[j]['input_shape']}"
                )
            prepared.append(prepared[j])
        return prepared, protocol, fresh


def _watch_parent() -> None:
    """In the vetting process: end with the agent (nothing else would end it after a kill -9)."""
    import os

    from edgeprune.backends.worker import Watchdog

    Watchdog(os.getppid()).start()


def _ready() -> bool:
    return True


class VettingPool:
    """One vetting process (the device's CPU is also what measures: one is enough), restarted
    after a crash."""

    def __init__(self, vetter: Vetter, *, timeout_s: float = 120.0) -> None:
        self.vetter, self.timeout_s = vetter, timeout_s
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_watch_parent
        )
        pool.submit(_ready)  # start it now, not on the first request
        return pool

    async def run(self, what: str, body: bytes):
        """`Vetter.one` or `Vetter.many` on `body`, awaited without blocking the event loop."""
        pool = self.pool
        try:
            return await asyncio.wait_for(asyncio.wrap_future(pool.submit(getattr(self.vetter, what), body)),
                                          self.timeout_s)  # fmt: skip
        except TimeoutError:  # a model built to be slow to check: end that process, keep serving
            self._restart(pool, kill=True)
            raise wire.BadRequest(
                400, f"vetting this request took over {self.timeout_s:.0f} s; nothing was queued"
            ) from None
        except BrokenProcessPool:  # 503: a request vetted beside the culprit may well be fine on a retry
            self._restart(pool)
            raise wire.BadRequest(
                503, "vetting crashed its process (a malformed or oversized model?); nothing was queued"
            ) from None

    def _restart(self, pool: ProcessPoolExecutor, *, kill: bool = False) -> None:
        if self.pool is not pool:  # another request started the next one already
            return
        if kill:  # the executor has no public way to stop a task in progress
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._start()

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
