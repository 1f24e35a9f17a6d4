"""The measuring process: one inference runtime, alone in a fresh Python, timing the models it is sent.

Every measurement runs here, for a local device as for an agent, for two reasons:

- What else a process has loaded changes what it measures. In the same process as
  `import onnxruntime`, an OpenVINO resnet20 at 28x28 measured ~9 % slower (0.50 vs 0.46 ms,
  pruned ones ~15 %) on the development machine; torch's thread pools and a search's memory are
  further guests. A deployed model runs beside its own runtime only, and so does this process.
- A runtime that crashes (or hangs past a time limit) takes down only this process; the caller
  starts a fresh one and carries on.

The worker keeps its own watch (`Watchdog`): it ends itself when its caller is gone (a killed
agent must not leave a process measuring, and skewing the next agent's figures) and when a
measurement passes its time limit, which travels with the request.

It is started with `python -m edgeprune.backends.worker` (not multiprocessing's spawn, which
re-imports the caller's main script) and speaks JSON lines: the device profile first, then one
request per line, one answer per line (marked, so that a stray print cannot pass for one). The
runtime's own prints are sent to stderr.

Sessions stay open between requests (the last `SESSIONS`, keyed by the file's bytes and the input
shape): models compared in turn (edgeprune/latency/interleave.py) come back every round, and a
round can then be a short window instead of a session build plus a long warm-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

MARK = "edgeprune-worker: "  # answers start with it; any other line on stdout is a guest's, passed to stderr
SESSIONS = 64  # open sessions kept: a profile batch's units (16 configurations, 2 models each) with room
PARENT_ENV = "EDGEPRUNE_WORKER_PARENT"  # the caller's PID: the worker ends when it is no longer its parent
EXIT_TIMEOUT = 124  # the worker's exit code when a measurement passed its time limit
GRACE_S = 1.0  # the worker's own limit trails the caller's, which reports it first while it lives


class SessionCache:
    """The runtime's sessions of recently measured models, least recently used dropped first.

    Keyed by content, not path: a caller may write another model to the same file name (an
    OpenVINO IR's weights file beside its .xml included)."""

    def __init__(self, backend, size: int = SESSIONS) -> None:
        self.backend, self.size = backend, size
        self.sessions: OrderedDict[tuple[str, tuple[int, ...]], object] = OrderedDict()

    def get(self, path: str, shape: tuple[int, ...]):
        files = [Path(path)] + ([Path(path).with_suffix(".bin")] if path.endswith(".xml") else [])
        digest = hashlib.sha256()
        for f in files:
            if f.is_file():
                digest.update(f.read_bytes())
        key = (digest.hexdigest(), shape)
        if key in self.sessions:
            self.sessions.move_to_end(key)
        else:
            self.sessions[key] = self.backend.session(path, shape)
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
        return self.sessions[key]


class Watchdog(threading.Thread):
    """Ends the worker (hard: the runtime may be inside a long native call) when its parent changes
    or the current measurement passes its deadline."""

    def __init__(self, parent: int, poll_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.parent, self.poll_s = parent, poll_s
        self.deadline: float | None = None

    def run(self) -> None:
        while True:
            if os.getppid() != self.parent:
                os._exit(1)
            if self.deadline is not None and time.monotonic() > self.deadline:
                os._exit(EXIT_TIMEOUT)
            time.sleep(self.poll_s)


def _serve() -> None:
    watchdog = Watchdog(int(os.environ.get(PARENT_ENV) or os.getppid()))
    watchdog.start()
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the runtime prints goes to stderr, never into the answers
    from edgeprune.devices.spec import DeviceSpec
    from edgeprune.errors import EdgepruneError
    from edgeprune.latency.measurement import Protocol

    def one_line(e: Exception) -> str:
        text = (
            str(e) if isinstance(e, EdgepruneError) else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        )
        return text or type(e).__name__

    backend, sessions, failure = None, None, None
    try:  # a runtime that cannot start (not installed, bad options) answers every request with why
        backend = DeviceSpec.from_dict(json.loads(sys.stdin.readline())).make_backend()
        sessions = SessionCache(backend)
    except Exception as e:
        failure = one_line(e)
    for line in sys.stdin:
        path, shape, protocol, *limit = json.loads(line)
        watchdog.deadline = time.monotonic() + limit[0] + GRACE_S if limit and limit[0] else None
        try:
            if failure:
                raise EdgepruneError(failure)
            shape = tuple(shape)
            run = sessions.get(path, shape)
            answer = ["ok", backend.measure(path, shape, Protocol.from_dict(protocol), run=run).to_dict()]
        except Exception as e:  # report, keep serving
            answer = ["error", one_line(e)]
        watchdog.deadline = None
        try:
            protocol_out.write(MARK + json.dumps(answer) + "\n")
        except BrokenPipeError:  # the caller is gone (killed): nobody to answer, nothing to say
            return


class WorkerDied(RuntimeError):
    pass


class JobTimeout(RuntimeError):
    pass


class Worker:
    """One measuring process for one device profile, started on first use and again after a crash
    or a time-out."""

    def __init__(self, spec_dict: dict) -> None:
        self.spec_dict = spec_dict
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import edgeprune

        env = dict(os.environ)
        root = str(Path(edgeprune.__file__).resolve().parents[1])  # importable however the caller found it
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env[PARENT_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeprune.backends.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            # its own process group: a Ctrl-C at the terminal reaches the caller, which stops it
            # (closing its input) and says what was kept, instead of a traceback from the worker
            start_new_session=True,
        )
        self._send(self.spec_dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _send(self, message) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def _died(self):
        try:
            code = self.proc.wait(2) if self.proc else None
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        if code == EXIT_TIMEOUT:
            raise JobTimeout("the measurement took longer than the job limit (ended by the worker's own watch)")
        raise WorkerDied(f"the inference runtime crashed during the measurement (worker exit code {code})")

    def run(self, path: str, shape, protocol: dict, timeout_s: float | None = None) -> tuple[str, object]:
        """('ok', Measurement dict) or ('error', one line); raises WorkerDied or JobTimeout."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self._send([str(path), list(shape), protocol, timeout_s])
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                self.kill()
                raise JobTimeout(f"the measurement took longer than the job limit ({timeout_s:.0f} s)")
            line = self.proc.stdout.readline()
            if not line:
                self._died()
            if line.startswith(MARK):
                status, payload = json.loads(line[len(MARK) :])
                return status, payload
            sys.stderr.write(line)  # printed to stdout before the worker could redirect it

    def interrupt(self) -> None:
        """Stop the measurement in progress from another thread (the one in `run` sees WorkerDied)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of requests: the worker leaves its loop
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


if __name__ == "__main__":
    _serve()
