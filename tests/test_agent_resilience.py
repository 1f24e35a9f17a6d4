"""What survives a crash, for real: the agent's processes end with it, the worker keeps its own
time limit, damaged cache files are never measured, half-written ones are cleaned up."""

import hashlib
import signal
import threading
import time

import psutil

from edgeprune.backends.worker import EXIT_TIMEOUT, Worker
from edgeprune.devices.spec import DeviceSpec

from .test_agent import QUICK, SLOW, AgentProcess, _model


def _gone(pids, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_the_agents_processes_end_when_it_is_killed(tmp_path):
    a = AgentProcess(tmp_path).start()
    c = a.client()
    job = c.submit([_model(48)], SLOW)  # a long measurement, in progress when the agent dies
    deadline = time.time() + 30
    while c.job(job)["status"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    children = [p.pid for p in psutil.Process(a.proc.pid).children(recursive=True)]
    assert c.info()["worker_pid"] in children and len(children) >= 2  # the worker and the vetting process
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert _gone(children), [psutil.Process(p).cmdline() for p in children if psutil.pid_exists(p)]
    a.stop()


def test_the_worker_keeps_its_own_time_limit(tmp_path):
    data, shape = _model(48)
    (tmp_path / "m.onnx").write_bytes(data)
    worker = Worker(DeviceSpec.load("cpu-onnxruntime").to_dict())
    worker.start()
    try:  # the request carries a 1 s limit; nobody on this side keeps time
        worker._send([str(tmp_path / "m.onnx"), list(shape), SLOW.to_dict(), 1.0])
        t0 = time.time()
        code = worker.proc.wait(30)
        assert code == EXIT_TIMEOUT and time.time() - t0 < 10
    finally:
        worker.kill()


def test_damaged_cached_models_are_replaced_or_asked_for_again(tmp_path):
    a = AgentProcess(tmp_path).start()
    try:
        c = a.client()
        (data, shape), (other, _) = _model(8), _model(16)
        digest = hashlib.sha256(data).hexdigest()
        stored = a.cache / "models" / f"{digest}.onnx"
        c.measure(data, shape, QUICK)
        for damage in (b"", other):  # truncated by a crash; another model's bytes under its name
            stored.write_bytes(damage)
            assert c.measure(data, shape, QUICK, fresh=True).median_ms > 0  # replaced from the request
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
        for result in (a.cache / "results").glob("*.json"):
            result.write_text("[1]")  # valid JSON, but no result: measured again, never a 500
        before = c.info()["measured"]
        assert c.measure(data, shape, QUICK).median_ms > 0 and c.info()["measured"] == before + 1
        measured = c.info()["measured"]

        # damaged while it waits in the queue: dropped, not measured, and the client sends it again
        blocker = c.submit([_model(48)], SLOW)
        results = []
        thread = threading.Thread(
            target=lambda: results.extend(a.client().measure_many([(data, shape)], QUICK, fresh=True))
        )
        thread.start()
        deadline = time.time() + 30
        while c.info()["queue_length"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        stored.write_bytes(other)
        c.cancel(blocker)
        thread.join(60)
        assert len(results) == 1 and results[0].median_ms > 0
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
        assert c.info()["measured"] == measured + 1  # the damaged copy was never measured
    finally:
        a.stop()


def test_half_written_cache_files_are_removed_at_start(tmp_path):
    a = AgentProcess(tmp_path)
    for name in ("models/abc.onnx.1f2e.tmp", "results/def.json.9a8b.tmp"):
        (a.cache / name).parent.mkdir(parents=True, exist_ok=True)
        (a.cache / name).write_bytes(b"half")
    a.start()
    output = a.stop()
    assert not list(a.cache.rglob("*.tmp")) and "removed 2 half-written cache file(s)" in output
