"""The agent's disk cache: received models by SHA-256, results by (model, shape, protocol, fingerprint).

Everything is written whole (`runs.write_bytes`: a temporary file, fsynced and renamed), so a
crash leaves either the old file or the new one (and a stray `*.tmp`, removed on the next
start). A model file is trusted only while its bytes still hash to its name: a truncated or
swapped file is dropped and the model is asked for again, never measured under the wrong name.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeprune.runs import file_sha256, write_bytes


class AgentCache:
    def __init__(self, root: Path, *, clean: bool = True) -> None:
        """`clean`: remove stray `*.tmp` files (only the agent, as it starts, knows none are being written)."""
        self.root = root
        self.models, self.results = root / "models", root / "results"
        for d in (self.models, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.removed_tmp = self._remove_stale_tmp() if clean else 0

    def _remove_stale_tmp(self) -> int:
        """Half-written files of an agent that was killed while writing."""
        stale = [p for d in (self.models, self.results) for p in d.glob("*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def model_path(self, digest: str) -> Path:
        return self.models / f"{digest}.onnx"

    def intact(self, digest: str) -> bool:
        """Whether the model file is there and still hashes to its name; a bad one is dropped."""
        path = self.model_path(digest)
        if not path.exists():
            return False
        try:
            if file_sha256(path) == digest:
                return True
        except OSError:
            pass
        path.unlink(missing_ok=True)
        return False

    def store_model(self, data: bytes, digest: str) -> None:
        if not self.intact(digest):
            write_bytes(self.model_path(digest), data)

    def result(self, key: str) -> dict | None:
        path = self.results / f"{key}.json"
        try:
            result = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            result = None
        if isinstance(result, dict) and isinstance(result.get("measurement"), dict):
            return result
        path.unlink(missing_ok=True)  # unreadable or not a result: measured again, and the bad file goes
        return None

    def store_result(self, key: str, result: dict) -> None:
        write_bytes(self.results / f"{key}.json", json.dumps(result).encode())
