"""Run directories: where a pipeline run keeps its config, results and artifacts."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeprune.checkpoint import Checkpoint

LOCK = ".lock"  # in a run folder: who writes it now (a flock, and the holder's PID and command)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file atomically (temp file `NAME.*.tmp` + fsync + rename + fsync of the folder), so
    readers, and a machine that loses power, see the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (a large model is never held whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (`write_bytes`)."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def new_run_dir(root: str | os.PathLike = "runs", name: str = "run") -> Path:
    """A fresh directory `root/name-YYYYmmdd-HHMMSS[-k]`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def writes_run(stage: Callable) -> Callable:
    """`stage(run_dir, ...)` run while holding the run folder (`RunDir.writing`)."""

    @functools.wraps(stage)
    def call(run_dir, *args, **kwargs):
        with RunDir(run_dir).writing(create=False):
            return stage(run_dir, *args, **kwargs)

    return call


def _holder(f: IO[str]) -> dict:
    """Who holds a run folder's lock, as it wrote itself into the file (empty where unreadable)."""
    try:
        f.seek(0)
        holder = json.loads(f.read() or "{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


class RunStore:
    """A run directory's record of a search: every evaluation and device measurement in SQLite,
    each committed as it happens (a run killed at any point, even with SIGKILL, keeps every
    finished evaluation), plus small key/value state (e.g. a budget tightened after measuring)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS evals (
        i INTEGER PRIMARY KEY, round INTEGER, u_raw TEXT, u TEXT, counts TEXT, plan_hash TEXT,
        predicted_ms REAL, macs REAL, cost REAL, budget REAL, score REAL, seconds REAL,
        duplicate INTEGER, created REAL);
    CREATE TABLE IF NOT EXISTS measurements (
        counts TEXT PRIMARY KEY, plan_hash TEXT, round INTEGER, predicted_ms REAL, measured_ms REAL,
        raw_ms REAL, dense_beside_ms REAL, p90_ms REAL, cv REAL, n INTEGER, steady_median_ms REAL,
        steady_p90_ms REAL, created REAL);
    CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);
    """

    def __init__(self, run_dir: str | os.PathLike | None) -> None:
        """The store of `run_dir`; None keeps it in memory (a search without a run folder)."""
        import sqlite3

        self.dir = None if run_dir is None else Path(run_dir)
        self.path = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path = self.dir / "evals.sqlite"
        self.db = sqlite3.connect(":memory:" if self.path is None else self.path)
        self.db.row_factory = sqlite3.Row
        with self.db:
            self.db.executescript(self.SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(measurements)")}
            # runs started before these columns existed
            for column in ("raw_ms", "dense_beside_ms", "steady_median_ms", "steady_p90_ms"):
                if column not in have:
                    self.db.execute(f"ALTER TABLE measurements ADD COLUMN {column} REAL")

    def close(self) -> None:
        self.db.close()

    def _insert(self, table: str, row: dict, *, replace: bool = False) -> None:
        row = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for k, v in row.items()}
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self.db:  # one transaction per row: committed before the next evaluation starts
            self.db.execute(
                f"{verb} INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
            )

    def _rows(self, query: str) -> list[dict]:
        out = []
        for r in self.db.execute(query):
            d = dict(r)
            for k in ("u_raw", "u", "counts"):
                if k in d and isinstance(d[k], str):
                    d[k] = json.loads(d[k])
            out.append(d)
        return out

    def add_eval(self, row: dict) -> None:
        self._insert("evals", {**row, "created": time.time()})

    def evals(self) -> list[dict]:
        return self._rows("SELECT * FROM evals ORDER BY i")

    def add_measurement(self, row: dict) -> None:
        self._insert("measurements", {**row, "created": time.time()}, replace=True)

    def measurements(self) -> list[dict]:
        return self._rows("SELECT * FROM measurements ORDER BY created")

    def get(self, key: str, default: Any = None) -> Any:
        r = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def set(self, key: str, value: Any) -> None:
        self._insert("state", {"key": key, "value": json.dumps(value)}, replace=True)


class RunDir:
    """A run folder, typed: what each stage wrote, read back by name.

    config.json      the prune run's inputs and settings      dense.pt       the dense model
    evals.sqlite     every evaluation and measurement (RunStore)
    plan.json, pruned.pt, results.json                        finetuned.pt, finetune.json
    export.json      where the export went (its manifest.json) validation.json, report.*
    pipeline.json    which stages of `edgeprune run` finished
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def read(self, name: str) -> dict | None:
        """A JSON file of the run (None where the stage has not written it)."""
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None

    def require(self, name: str, stage: str) -> dict:
        """A JSON file the next stage needs, or one line saying which command writes it."""
        got = self.read(name)
        if got is None:
            from edgeprune.errors import EdgepruneError

            raise EdgepruneError(f"{self.path} has no {name}: run `edgeprune {stage}` on it first")
        return got

    @property
    def config(self) -> dict:
        return self.require("config.json", f"prune --out {self.path}")

    @property
    def results(self) -> dict:
        return self.require("results.json", f"prune --out {self.path}")

    def dense(self):
        """The dense model's checkpoint: dense.pt, or (runs from before it was kept) the weights named
        in config.json."""
        from edgeprune.checkpoint import load_checkpoint
        from edgeprune.zoo import resolve_weights

        if (self.path / "dense.pt").is_file():
            return self.check_lineage("dense.pt", load_checkpoint(self.path / "dense.pt"))
        return self.check_lineage("dense.pt", load_checkpoint(resolve_weights(self.config["weights"])))

    def recorded_dense_accuracy(self, dense: Checkpoint) -> float | None:
        """The dense checkpoint's own test accuracy, where it was scored on this run's data set
        (a checkpoint trained on Fashion-MNIST and pruned on other images says nothing of those)."""
        if dense.dataset is None or dense.dataset != (self.read("config.json") or {}).get("data"):
            return None
        return dense.meta.get("test_accuracy")

    def pruned(self) -> Checkpoint:
        """The search's pruned model (pruned.pt), checked to be this run's."""
        from edgeprune.checkpoint import load_checkpoint

        if not (self.path / "pruned.pt").is_file():
            from edgeprune.errors import EdgepruneError

            raise EdgepruneError(f"{self.path} has no pruned.pt: run `edgeprune prune --out {self.path}` first")
        return self.check_lineage("pruned.pt", load_checkpoint(self.path / "pruned.pt"))

    def check_lineage(self, name: str, ckpt: Checkpoint) -> Checkpoint:
        """`ckpt` (this run's `name`), refused in one line where it is not this run's: the dense
        model config.json recorded (its architecture, and its weights' hash), or that model pruned
        by plan.json. A folder that mixes files of several runs would otherwise be finetuned,
        exported or validated against the wrong parent, and its figures look plausible."""
        from edgeprune.checkpoint import state_hash
        from edgeprune.errors import EdgepruneError
        from edgeprune.pruning.plan import Plan

        config, plan = self.read("config.json") or {}, self.read("plan.json")
        fix = "the folder mixes files of different runs: put the run's own file back, or prune again into a new --out"
        if (ckpt.plan is None) != (name == "dense.pt"):
            what, where = ("a dense", "pruned") if ckpt.plan is None else ("a pruned", "dense")
            raise EdgepruneError(f"{self.path / name} holds {what} model where this run keeps its {where} one; {fix}")
        if config.get("model") and ckpt.ref.to_dict() != config["model"]:
            raise EdgepruneError(
                f"{self.path / name} holds {ckpt.model}, but this run pruned {config.get('model_id')}; {fix}"
            )
        if ckpt.plan is None:
            if config.get("model_hash") and state_hash(ckpt.state_dict) != config["model_hash"]:
                raise EdgepruneError(
                    f"{self.path / name} holds other weights than the dense model this run pruned; {fix}"
                )
        elif plan is not None and Plan.from_dict(ckpt.plan).hash() != Plan.from_dict(plan).hash():
            raise EdgepruneError(f"{self.path / name} was pruned by another plan than this run's plan.json; {fix}")
        elif ckpt.meta.get("dense_hash") not in (None, config.get("model_hash")):
            raise EdgepruneError(f"{self.path / name} was pruned from other weights than this run's dense model; {fix}")
        return ckpt

    def shipped(self):
        """(path, checkpoint) of the model to ship: finetuned.pt once its finetune finished, else pruned.pt."""
        from edgeprune.checkpoint import load_checkpoint

        for name in ("finetuned.pt", "pruned.pt"):
            if (self.path / name).is_file():
                ckpt = self.check_lineage(name, load_checkpoint(self.path / name))
                if name == "pruned.pt" or ckpt.meta.get("finished"):
                    return self.path / name, ckpt
        from edgeprune.errors import EdgepruneError

        raise EdgepruneError(f"{self.path} has no pruned.pt: run `edgeprune prune --out {self.path}` first")

    @contextlib.contextmanager
    def writing(self, *, create: bool = True) -> Iterator[None]:
        """Hold the folder while this process writes it: a second writer (another prune on the same
        --out, a finetune during the search) is refused in one line naming the holder, instead of
        both corrupting each other's files. Nested holds in one process (`run` calling each
        stage) pass through; the OS drops the lock when the process dies, however it dies."""
        from edgeprune.errors import EdgepruneError

        if not create and not self.path.is_dir():
            yield  # nothing to guard: whoever reads it says it is missing
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = None
        except BlockingIOError:
            holder = _holder(f)
            f.close()
        if holder is not None:
            if holder.get("pid") != os.getpid():
                raise EdgepruneError(
                    f"{self.path} is being written by another edgeprune process (PID {holder.get('pid', '?')}: "
                    f"{holder.get('command', '?')}); wait for it to finish, or use another folder"
                )
            yield  # this process holds it already, further up the stack
            return
        try:
            f.seek(0)
            f.truncate()
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
            f.write(json.dumps({"pid": os.getpid(), "command": command}))
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def manifest_path(self) -> Path | None:
        export = self.read("export.json")
        return Path(export["manifest"]) if export else None

    def manifest(self) -> dict | None:
        path = self.manifest_path()
        return json.loads(path.read_text()) if path and path.is_file() else None
