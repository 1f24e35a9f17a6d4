"""A device is a queue: one physical device measures one model at a time.

Two measurements at once on one device slow each other down, and both figures are wrong. Every
measurement takes the device's turn first: an exclusive lock on a file named after the physical
device (this host's CPU or GPU for a local profile, the agent's address for a remote one), so
threads of one process, several profiles of one CPU and several edgeprune processes on one host
all wait for each other. Different devices measure in parallel. The time spent waiting is kept
(`waited_s`): what the rule costs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_DIR_ENV = "EDGEPRUNE_LOCK_DIR"


def lock_dir() -> Path:
    """Where the devices' lock files live: $EDGEPRUNE_LOCK_DIR, or a per-user folder in the temp dir."""
    d = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"edgeprune-{os.getuid()}-devices")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


class DeviceQueue:
    """The turn of one physical device (`key`), across threads and processes of this host."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.path = lock_dir() / (re.sub(r"[^0-9A-Za-z_.-]", "_", key) + ".lock")
        self.waited_s = 0.0
        self._count = threading.Lock()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the device for one measurement (a fresh open file per turn: flock excludes each open file)."""
        t0 = time.monotonic()
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            with self._count:
                self.waited_s += time.monotonic() - t0
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def physical_key(spec) -> str:
    """Which physical device a profile measures on: its agent's address, or this host's CPU or GPU."""
    if spec.agent:
        return "agent-" + spec.agent.rstrip("/").split("://")[-1]
    return "local-gpu" if spec.backend == "tensorrt" else "local-cpu"
