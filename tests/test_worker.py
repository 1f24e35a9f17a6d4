"""Local devices measure in a worker process of their own (edgeprune/backends/worker.py)."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import psutil
import pytest

from edgeprune.devices import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import LayerConfig, unit_model
from edgeprune.latency.measurement import Protocol

QUICK = Protocol(warmup_runs=2, warmup_s=0.01, min_runs=10, min_s=0.02, max_cv=10, max_foreign_load=1.0)


def _onnx(tmp_path, cout: int = 8):
    model, shape = unit_model(LayerConfig("conv", 4, cout, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu"))
    path = tmp_path / f"conv{cout}.onnx"
    path.write_bytes(model.SerializeToString())
    return path, shape


@pytest.mark.parametrize("name", ["cpu-onnxruntime", "cpu-openvino"])
def test_local_device_measures_in_a_process_with_only_its_runtime(tmp_path, name):
    import onnxruntime  # noqa: F401 - loaded here, the caller; it must not be where OpenVINO measures

    dev = Device.load(name)
    path, shape = _onnx(tmp_path)
    m = dev.measure(path, shape, QUICK)
    assert m.median_ms > 0 and m.n >= 10
    worker = psutil.Process(dev._worker.pid)
    assert worker.pid != os.getpid() and "edgeprune.backends.worker" in " ".join(worker.cmdline())
    libs = " ".join(p.path for p in worker.memory_maps())
    runtime, other = ("onnxruntime", "openvino") if name == "cpu-onnxruntime" else ("openvino", "onnxruntime")
    assert runtime in libs and other not in libs and "libtorch" not in libs
    # the same process serves the next measurement (a runtime is loaded once per device)
    dev.measure_many([(path, shape), _onnx(tmp_path, 16)], QUICK)
    assert dev._worker.pid == worker.pid
    dev.close()
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


def test_a_model_the_runtime_rejects_is_one_line_and_the_worker_serves_on(tmp_path):
    dev = Device.load("cpu-onnxruntime")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(EdgepruneError, match=r"measuring broken.onnx on cpu-onnxruntime: ") as e:
        dev.measure(bad, (1, 4, 8, 8), QUICK)
    assert "\n" not in str(e.value)
    pid = dev._worker.pid
    assert dev.measure(*_onnx(tmp_path), QUICK).median_ms > 0
    assert dev._worker.pid == pid
    dev.close()


def test_a_runtime_crash_mid_measurement_is_an_error_and_the_next_measurement_works(tmp_path):
    dev = Device.load("cpu-onnxruntime")
    path, shape = _onnx(tmp_path)
    dev.measure(path, shape, QUICK)  # the worker is up
    slow = Protocol(warmup_runs=1, warmup_s=0, min_runs=10, min_s=30, max_runs=10**9, max_cv=10, max_foreign_load=1.0)
    caught: list[Exception] = []

    def measure_slowly():
        try:
            dev.measure(path, shape, slow)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            caught.append(e)

    t = threading.Thread(target=measure_slowly)
    t.start()
    time.sleep(1.0)
    os.kill(dev._worker.pid, signal.SIGKILL)  # the runtime dies mid-measurement
    t.join(30)
    assert caught and isinstance(caught[0], EdgepruneError) and "crashed" in str(caught[0])
    assert dev.measure(path, shape, QUICK).median_ms > 0  # a fresh worker
    dev.close()


def test_the_worker_ends_with_its_device(tmp_path):
    dev = Device.load("cpu-onnxruntime")
    dev.measure(*_onnx(tmp_path), QUICK)
    worker = psutil.Process(dev._worker.pid)
    del dev
    gc.collect()
    worker.wait(10)
    assert not worker.is_running()


def test_output_on_the_workers_stdout_cannot_pass_for_an_answer(tmp_path, monkeypatch, capfd):
    """The worker's stdout carries the answers: a line printed there by anything else (here at the
    worker's start, before it can redirect its stdout) goes to stderr and the answer still arrives."""
    (tmp_path / "sitecustomize.py").write_text("print('[1.0, 2.0] a guest chatting on stdout')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    dev = Device.load("cpu-onnxruntime")
    assert dev.measure(*_onnx(tmp_path), QUICK).median_ms > 0
    dev.close()
    assert "a guest chatting on stdout" in capfd.readouterr().err


def test_a_runtime_that_cannot_start_says_why_in_one_line(tmp_path):
    """Options the runtime rejects are reported as such, not as a crash, and nothing is measured."""
    from edgeprune.devices import DeviceSpec

    spec = DeviceSpec.load("cpu-onnxruntime")
    spec.options = {**spec.options, "bogus": 1}
    dev = Device(spec)
    with pytest.raises(EdgepruneError, match=r"unknown onnxruntime setting\(s\) \['bogus'\]") as e:
        dev.measure(*_onnx(tmp_path), QUICK)
    assert "crashed" not in str(e.value) and "\n" not in str(e.value)
    dev.close()
