"""The measuring process of an agent: receives (model path, shape, protocol), answers a Measurement.

It runs in its own process so that a runtime that crashes (or hangs past the job's time limit)
takes down only this process; the server starts a fresh one and keeps serving.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback


def _serve(conn, spec_dict: dict) -> None:
    from edgeprune.devices.spec import DeviceSpec
    from edgeprune.latency.measurement import Protocol

    spec = DeviceSpec.from_dict(spec_dict)
    backend = spec.make_backend()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        path, shape, protocol = msg
        try:
            m = backend.measure(path, tuple(shape), Protocol.from_dict(protocol))
            conn.send(("ok", m.to_dict()))
        except Exception as e:  # report, keep the worker alive
            from edgeprune.errors import EdgepruneError

            text = str(e) if isinstance(e, EdgepruneError) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            conn.send(("error", text or traceback.format_exc(limit=1)))


class WorkerDied(RuntimeError):
    pass


class JobTimeout(RuntimeError):
    pass


class Worker:
    """One measuring process, restarted after a crash or a time-out."""

    def __init__(self, spec_dict: dict) -> None:
        self.spec_dict = spec_dict
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child, self.spec_dict), daemon=True)
        self.proc.start()
        self.conn = parent

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def run(self, path: str, shape, protocol: dict, timeout_s: float) -> tuple[str, object]:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send((path, list(shape), protocol))
        if not self.conn.poll(timeout_s):
            self.kill()
            raise JobTimeout(f"the measurement took longer than the job limit ({timeout_s:.0f} s)")
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            code = self.proc.exitcode if self.proc else None
            self.kill()
            raise WorkerDied(
                f"the inference runtime crashed during the measurement (worker exit code {code})"
            ) from None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        self.kill()
