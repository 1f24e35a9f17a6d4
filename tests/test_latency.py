"""Backends, measurement protocol, latency tables, layer configurations, profiler and predictor."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import yaml

from edgeprune.backends import OnnxRuntimeBackend, OpenVinoBackend, TensorRtBackend, make_backend
from edgeprune.devices import Device, DeviceSpec
from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import LayerConfig, ModelLayers, unit_model
from edgeprune.latency.measurement import Measurement, Protocol, measure_callable
from edgeprune.latency.predictor import Predictor
from edgeprune.latency.profiler import detect_step, measure_configs, profile
from edgeprune.latency.table import LatencyTable
from edgeprune.models import build_model
from edgeprune.pruning import random_counts, space

from .conftest import ROOT

FAST = Protocol(warmup_runs=3, warmup_s=0.01, min_runs=20, min_s=0.05)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import onnx

    cfg = LayerConfig("conv", 8, 16, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu")
    model, shape = unit_model(cfg)
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, str(path))
    return path, shape


@pytest.mark.parametrize("backend", [OnnxRuntimeBackend(threads=1), OpenVinoBackend(threads=1, precision="f32")])
def test_backend_measures_tiny_model(backend, tiny_onnx):
    path, shape = tiny_onnx
    m = backend.measure(path, shape, FAST)
    assert m.median_ms > 0 and m.p90_ms >= m.median_ms and m.n >= 20 and 0 <= m.foreign_load <= 1
    fp = backend.fingerprint()
    assert fp["runtime"] == backend.name and fp["threads"] == 1 and fp["precision"] in ("fp32", "f32") and fp["cpu"]


def test_backends_agree_on_outputs(tiny_onnx):
    path, shape = tiny_onnx
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    a = OnnxRuntimeBackend().session(path, shape)(x)
    b = OpenVinoBackend(precision="f32").session(path, shape)(x)
    assert np.abs(a - b).max() < 1e-4


def test_openvino_precision_is_explicit():
    assert OpenVinoBackend(precision="bf16").config()["INFERENCE_PRECISION_HINT"] == "bf16"
    with pytest.raises(EdgepruneError, match="precision"):
        OpenVinoBackend(precision="int4")


@pytest.mark.skipif(TensorRtBackend.available(), reason="TensorRT is installed here")
def test_tensorrt_absence_is_explained(tiny_onnx):
    backend = make_backend("tensorrt", precision="fp16")
    with pytest.raises(EdgepruneError, match="TensorRT is not available here.*NVIDIA GPU.*agent serve"):
        backend.measure(*tiny_onnx)
    with pytest.raises(EdgepruneError, match="TensorRT is not available"):
        backend.fingerprint()


@pytest.mark.skipif(not TensorRtBackend.available(), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_measures_where_it_imports(tiny_onnx):
    m = TensorRtBackend(precision="fp16").measure(*tiny_onnx, FAST)
    assert m.median_ms > 0


def test_unknown_backend_option():
    with pytest.raises(EdgepruneError, match="does not take option.*'thread'"):
        make_backend("onnxruntime", thread=1)


def test_noisy_run_is_measured_again():
    rng = np.random.default_rng(0)
    noisy = measure_callable(
        lambda: time.sleep(float(rng.choice([0.0001, 0.003]))),
        Protocol(warmup_runs=1, warmup_s=0, min_runs=20, min_s=0, max_cv=0.05, retries=2),
    )
    assert noisy.attempts == 3 and noisy.cv > 0.05

    def spin():  # 1 ms of work: this VM's timer slack gives sleep(0.001) a cv up to ~0.5 (2 of 15 retried)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.001:
            pass

    # one preemption of a shared VM inside the ~25 ms a measurement takes makes its cv several
    # times 0.5: a quiet callable is measured once in at least one of three tries
    quiet = Protocol(warmup_runs=1, warmup_s=0, min_runs=20, min_s=0, max_cv=0.5, max_foreign_load=1.0)
    assert min(measure_callable(spin, quiet).attempts for _ in range(3)) == 1


def test_precision_stops_timing_once_the_median_is_known():
    from edgeprune.latency.measurement import median_ci_halfwidth

    assert median_ci_halfwidth([1.0] * 5) == float("inf")  # too few samples to say
    assert median_ci_halfwidth(sorted([1.0] * 50 + [1.1] * 50)) == pytest.approx(0.05 / 1.05, rel=0.3)
    steady = measure_callable(
        lambda: time.sleep(0.0005), Protocol(warmup_runs=1, warmup_s=0, min_runs=10, min_s=0, precision=0.05, max_s=5)
    )
    assert steady.n < 200  # stopped on precision, long before max_s
    rng = np.random.default_rng(1)
    t0 = time.monotonic()
    noisy = measure_callable(
        lambda: time.sleep(float(rng.choice([0.0001, 0.002]))),
        Protocol(warmup_runs=1, warmup_s=0, min_runs=10, min_s=0, precision=0.001, max_s=0.3, max_cv=10, retries=0),
    )
    assert 0.3 <= time.monotonic() - t0 < 2.0 and noisy.n < 5000  # never precise enough: stopped by max_s


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_cpu_pinning_is_applied_and_restored():
    before = os.sched_getaffinity(0)
    seen = []
    measure_callable(
        lambda: seen.append(os.sched_getaffinity(0)),
        Protocol(warmup_runs=1, warmup_s=0, min_runs=3, min_s=0, pin_cpus=(0,)),
    )
    assert seen[-1] == {0} and os.sched_getaffinity(0) == before


def _table(entries=None) -> LatencyTable:
    fp = {"runtime": "onnxruntime", "version": "1", "cpu": "X", "threads": 1, "precision": "fp32"}
    return LatencyTable(
        "cpu-onnxruntime",
        fp,
        Protocol().to_dict(),
        16,
        "resnet20",
        [1, 1, 28, 28],
        entries or {"conv|a": {"median_ms": 0.1, "p90_ms": 0.2, "n": 30, "cv": 0.01}},
    )


def test_table_round_trip(tmp_path):
    t = _table()
    t.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back.entries == t.entries and back.fingerprint == t.fingerprint and back.step == 16


def test_table_fingerprint_mismatch(tmp_path):
    _table().save(tmp_path / "t.json")
    other = {**_table().fingerprint, "cpu": "Y"}
    with pytest.warns(UserWarning, match="another device setup.*cpu: X != Y"):
        LatencyTable.load(tmp_path / "t.json", fingerprint=other)
    with pytest.raises(EdgepruneError, match="another device setup"):
        LatencyTable.load(tmp_path / "t.json", fingerprint=other, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatencyTable.load(tmp_path / "t.json", fingerprint=_table().fingerprint)


def test_each_device_setup_finds_its_own_table(tmp_path):
    from edgeprune.latency.table import default_table, setup_name

    mine = {"runtime": "onnxruntime", "version": "1.32.0", "cpu": "AMD EPYC", "threads": 1}
    other = {**mine, "cpu": "Intel(R) Xeon(R) Processor"}
    base = tmp_path / "dev" / "m.json"
    assert default_table("dev", "m", mine, root=tmp_path) == base  # nothing profiled yet: the profile's path
    base.parent.mkdir()
    base.write_text(json.dumps({"fingerprint": other}))
    # the profile's table is another setup's: read, it is the fallback (prune warns); a new one goes beside it
    assert default_table("dev", "m", mine, root=tmp_path) == base
    own = default_table("dev", "m", mine, root=tmp_path, writing=True)
    assert own == tmp_path / "dev" / setup_name(mine) / "m.json" and own.parent.name.startswith("amd-epyc-")
    own.parent.mkdir()
    own.write_text(json.dumps({"fingerprint": mine}))
    assert default_table("dev", "m", mine, root=tmp_path) == own
    assert default_table("dev", "m", other, root=tmp_path) == base  # the setup it was profiled on keeps it
    assert default_table("dev", "m", other, root=tmp_path, writing=True) == base
    assert setup_name({**mine, "version": "1.33.0"}) != setup_name(mine)  # another runtime: another table
    # the device is asked only where the profile's table exists; out of reach, the profile's table it is
    asked = []
    assert default_table("dev", "none", lambda: asked.append(1) or mine, root=tmp_path).name == "none.json"
    assert not asked and default_table("dev", "m", lambda: mine, root=tmp_path) == own

    def unreachable():
        raise EdgepruneError("no token for the agent")

    assert default_table("dev", "m", unreachable, root=tmp_path) == base
    for bad in ("[1, 2]", '{"fingerprint": "abc"}', "{", '{"entries": {}}'):  # LatencyTable.load says what is wrong
        base.write_text(bad)
        assert default_table("dev", "m", mine, root=tmp_path) == base


def test_profiling_a_second_machine_neither_overwrites_nor_is_refused(tiny_run, tmp_path):
    """What prune's warning tells a user on another machine: `edgeprune profile --weights W --device D`.
    It writes this setup's own table beside the shipped one, and prune/predict then use it."""
    dev = yaml.safe_load(open(tiny_run["device"]).read())
    theirs = json.loads(open(tiny_run["table"]).read())
    theirs["fingerprint"]["cpu"] = "another CPU"
    shipped = tmp_path / "latency_tables" / dev["name"] / "resnet20.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps(theirs))

    def cli(*args):  # in tmp_path: its latency_tables/ is the default root
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)  # fmt: skip

    r = cli("profile", "--weights", tiny_run["weights"], "--device", tiny_run["device"], "--step", "32",
            "--calibrate", "0", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    own = list((shipped.parent).glob("*/resnet20.json"))
    assert len(own) == 1 and json.loads(shipped.read_text()) == theirs  # beside it; the shipped one untouched
    r = cli("predict", "--weights", tiny_run["weights"], "--device", tiny_run["device"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["table"] == str(own[0].relative_to(tmp_path))


@pytest.mark.parametrize("content", ["", "{", '{"schema": 1}', "[1, 2]", '{"entries": {}}'])
def test_corrupt_table_one_line(tmp_path, content):
    (tmp_path / "t.json").write_text(content)
    with pytest.raises(EdgepruneError, match="corrupt or truncated") as e:
        LatencyTable.load(tmp_path / "t.json")
    assert "\n" not in str(e.value)


def test_killed_write_leaves_old_table(tmp_path):
    path = tmp_path / "t.json"
    _table().save(path)
    big = {f"conv|{i}": {"median_ms": 0.1, "p90_ms": 0.2, "n": 30, "cv": 0.01} for i in range(200_000)}
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_latency import _table\n"
        f"t = _table({big!r})\nwhile True: t.save({str(path)!r})\n"
    )
    (tmp_path / "w.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "w.py")])
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith("t.json.") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t = LatencyTable.load(path)  # the old table or a complete new one, never half a file
    assert len(t.entries) in (1, 200_000)


def test_layer_configs_follow_the_plan():
    """The units predicted for a plan are the units of that plan's own ONNX export."""
    model = build_model("mobilenet_v2_cifar", in_channels=1).eval()
    s = space(model, torch.randn(1, 1, 28, 28), step=16)
    layers = ModelLayers.from_model(s)
    counts = random_counts(s, np.random.default_rng(3))
    pruned = s.plan(counts).apply(model)
    s_pruned = space(pruned, torch.randn(1, 1, 28, 28), step=16)
    assert [c.key for c in layers.configs(counts)] == [c.key for c in ModelLayers.from_model(s_pruned).configs()]
    keys = {c.key for c in layers.reachable()}
    assert {c.key for c in layers.configs(counts)} <= keys


def test_calibration_takes_a_weights_term_only_where_it_clearly_predicts_better():
    """Whole models that slow down once their weights pass a knee (a cache they outgrow, as ORT
    mobilenet_v2_cifar does here) get the weights term, its knee near the true one; a device where
    time follows the unit sum alone keeps the line, as does a profile with too few points."""
    from edgeprune.latency.calibration import WEIGHTS_MIN_POINTS, fit_calibration, value

    rng = np.random.default_rng(0)
    w = rng.uniform(0.1, 2.2, 25)  # millions of weights
    x = 0.1 * w + rng.uniform(0.0, 0.08, 25)  # unit sums grow with the weights, loosely
    noise = rng.normal(1.0, 0.005, 25)
    cached = (0.6 * x + 0.2 * np.maximum(0.0, w - 0.6) + 0.01) * noise
    cal = fit_calibration(x, cached, w)
    assert cal["c"] > 0 and cal["left_out_err"]["weights"] <= 0.5 * cal["left_out_err"]["line"], cal
    assert 0.3 <= cal["knee_mparams"] <= 0.9 and cal["fit_median_abs_err"] < 0.02  # knees on a grid
    dense = value(cal, [0.1 * 2.2 + 0.04], [2.2])[0]
    assert dense == pytest.approx(0.6 * 0.26 + 0.2 * 1.6 + 0.01, rel=0.05)
    plain = fit_calibration(x, (0.6 * x + 0.03) * noise, w)
    assert "c" not in plain and plain["a"] == pytest.approx(0.6, rel=0.05)
    few = fit_calibration(x[: WEIGHTS_MIN_POINTS - 1], cached[: WEIGHTS_MIN_POINTS - 1], w[: WEIGHTS_MIN_POINTS - 1])
    assert "c" not in few and "left_out_err" not in few
    assert "c" not in fit_calibration(x, cached)  # no weights given: the line


def test_predictor_is_calibrated_table_sum():
    model = build_model("resnet20", in_channels=1)
    s = space(model, torch.randn(1, 1, 28, 28), step=16)
    layers = ModelLayers.from_model(s)
    entries = {c.key: {"median_ms": 0.01 * (i + 1)} for i, c in enumerate(layers.reachable())}
    table = _table(entries)
    table.calibration = {"a": 2.0, "b": 0.5, "n": 3}
    p = Predictor(layers, table)
    counts = random_counts(s, np.random.default_rng(0))
    by_hand = sum(entries[c.key]["median_ms"] for c in layers.configs(counts))
    assert p.predict(counts) == pytest.approx(2.0 * by_hand + 0.5)
    cal = p.fit_calibration([1.0, 2.0, 3.0, 4.0, 5.0], [2.5, 4.5, 6.5, 8.5, 40.0])  # one disturbed measurement
    assert cal["a"] == pytest.approx(2.0) and cal["b"] == pytest.approx(0.5)
    # an isolated table's entries each pay the per-call overhead once; an in-context one's do not
    table.meta["unit_overhead_ms"] = 0.004
    assert p.predict(counts) == pytest.approx(2.0 * (by_hand - 0.004 * len(layers.configs(counts))) + 0.5)
    assert p.compiled().predict(np.array([counts]))[0] == pytest.approx(p.predict(counts))
    table.meta["unit_copies"] = 4
    assert p.predict(counts) == pytest.approx(2.0 * by_hand + 0.5)
    assert p.compiled().predict(np.array([counts]))[0] == pytest.approx(p.predict(counts))
    # a weights term adds c ms per million weights over the knee, in both predictors
    plans = np.array([counts, s.full_counts(), random_counts(s, np.random.default_rng(1))])
    mparams = [s.params(c) / 1e6 for c in plans]
    knee = float(np.median(mparams))
    table.calibration = {"a": 2.0, "b": 0.5, "c": 3.0, "knee_mparams": knee, "n": 25}
    dense = s.full_counts()
    assert p.predict(dense) == pytest.approx(2.0 * p.unit_sum(dense) + 0.5 + 3.0 * (mparams[1] - knee))
    expected = [2.0 * p.unit_sum(c) + 0.5 + 3.0 * max(0.0, m - knee) for c, m in zip(plans, mparams)]
    assert p.compiled().predict(plans) == pytest.approx(expected)
    assert [p.predict(c) for c in plans] == pytest.approx(expected)
    del table.entries[layers.configs(counts)[0].key]
    with pytest.raises(EdgepruneError, match="lacks 1 of"):
        p.predict(counts)


@pytest.mark.parametrize(
    "cfg",
    [
        LayerConfig("conv", 8, 16, 14, 14, (3, 3), (2, 2), (1, 1, 1, 1), 1, "relu"),
        LayerConfig("conv", 16, 16, 7, 7, (3, 3), (1, 1), (1, 1, 1, 1), 16, "relu6"),
        LayerConfig("add", 16, 16, 7, 7, act="relu"),
        LayerConfig("gemm", 32, 10),
    ],
    ids=lambda c: c.op,
)
def test_unit_copies_read_one_input_and_sum(cfg):
    """K copies of a unit: each its own weights, all reading the model's one input, outputs summed."""
    import onnxruntime as ort
    from onnx import numpy_helper

    one, shape = unit_model(cfg, seed=5)
    many, shape_k = unit_model(cfg, seed=5, copies=3)
    assert shape_k == shape and [i.name for i in many.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    # each copy alone: keep its nodes, rename its output "y"
    weights = {i.name: i for i in many.graph.initializer}
    total = 0
    for j in range(3):
        copy = onnx.ModelProto()
        copy.CopyFrom(one)
        for init in copy.graph.initializer:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights[f"c{j}_{init.name}"]), init.name))
        total = total + run(copy)
    assert run(many) == pytest.approx(total, rel=1e-4, abs=1e-4)
    assert not np.allclose(run(many), 3 * run(one))  # the copies' weights differ
    # in context (reduced): each copy's output summed to a scalar as it is written, the scalars added
    reduced, shape_r = unit_model(cfg, seed=5, copies=3, reduced=True)
    assert shape_r == shape and run(reduced).shape == ()
    assert float(run(reduced)) == pytest.approx(float(np.sum(total)), rel=1e-4, abs=1e-3)
    assert [n.op_type for n in reduced.graph.node].count("ReduceSum") == 3
    single, _ = unit_model(cfg, seed=5, reduced=True)
    assert float(run(single)) == pytest.approx(float(np.sum(run(one))), rel=1e-4, abs=1e-3)
    # pooled (an int8 device's units): each copy's map averaged (GlobalAveragePool) before the sum
    pooled, _ = unit_model(cfg, seed=5, copies=3, reduced=True, pooled=True)
    means = float(np.sum(np.mean(total, axis=(2, 3)))) if total.ndim == 4 else float(np.sum(total))
    assert float(run(pooled)) == pytest.approx(means, rel=1e-4, abs=1e-3)
    with pytest.raises(EdgepruneError, match="at least 1"):
        unit_model(cfg, copies=0)


class CountingDevice(Device):
    """Latency = 0.03 ms per call + 0.01 ms per conv or add node: the arithmetic of in-context units."""

    def __init__(self):
        super().__init__(DeviceSpec("counting", "onnxruntime", unit_copies=4))

    def fingerprint(self):
        return {"runtime": "counting"}

    def measure_many(self, items, protocol=None, *, on_result=None, fresh=False):
        out = []
        for i, (path, _) in enumerate(items):
            nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
            ms = 0.03 + 0.01 * sum(op in ("Conv", "Add") for op in nodes)
            out.append(Measurement(ms, ms, ms, 0.0, 20, 0.0))
            if on_result:
                on_result(i, out[-1])
        return out

    def measure(self, onnx_path, input_shape, protocol=None):
        return self.measure_many([(onnx_path, input_shape)])[0]


def test_in_context_profile_records_the_per_copy_cost(tmp_path):
    """With unit_copies K the profiler measures one copy and K, and the entry is their per-copy
    difference (the call's overhead cancels); the predictor then adds no overhead term."""
    cfgs = [LayerConfig("conv", 8, 16, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu"), LayerConfig("act:relu", 8, 8)]
    ms = measure_configs(CountingDevice(), cfgs, FAST, copies=4)
    assert ms[0].median_ms == pytest.approx(0.01) and ms[0].extra["single_ms"] == pytest.approx(0.04)
    assert ms[0].extra["copies_ms"] == pytest.approx(0.07) and ms[1].median_ms == 0.0
    model = build_model("resnet20", in_channels=1)
    table = profile(
        model=model, model_id="resnet20", example_input=(1, 1, 8, 8), device=CountingDevice(),
        out=tmp_path / "t.json", step=16, calibrate=2, progress=False, log=lambda s: None,
    )  # fmt: skip
    assert table.unit_copies == 4 and table.overhead_ms == 0.0 and table.meta["unit_context"] == "reduced"
    conv = next(e for k, e in table.entries.items() if k.startswith("conv"))
    assert conv["median_ms"] == pytest.approx(0.01) and conv["single_ms"] == pytest.approx(0.04)
    assert conv["copies_ms"] == pytest.approx(0.07)
    # the dense model: 0.03 + 0.01 per conv and add; the in-context table sums to exactly that less 0.03
    points = table.meta["calibration_points"]
    dense = points[",".join(map(str, space(model, torch.randn(1, 1, 8, 8), step=16).full_counts()))]
    assert dense["measured_ms"] == pytest.approx(dense["sum_ms"] + 0.03)
    with pytest.raises(EdgepruneError, match="units measured with 4 copies, not 1"):
        profile(
            model=model, model_id="resnet20", example_input=(1, 1, 8, 8), device=CountingDevice(),
            out=tmp_path / "t.json", step=16, copies=1, progress=False, log=lambda s: None,
        )  # fmt: skip
    # more calibration plans on the same table: only the new ones are measured (the first 3 stay)
    seen: list[str] = []

    class Watched(CountingDevice):
        def measure_many(self, items, protocol=None, **kw):
            seen.extend(os.path.basename(p) for p, _ in items)
            return super().measure_many(items, protocol, **kw)

    again = profile(
        model=model, model_id="resnet20", example_input=(1, 1, 8, 8), device=Watched(),
        out=tmp_path / "t.json", step=16, calibrate=4, progress=False, log=lambda s: None,
    )  # fmt: skip
    more = again.meta["calibration_points"]
    assert len(more) == 5 and list(more)[:3] == list(points) and again.calibration["n"] == 5
    assert len(set(seen)) == 2 and again.entries == table.entries  # two new whole models, no unit again
    # a table whose units were measured in context the earlier way (whole outputs summed) is not extended
    old = LatencyTable.load(tmp_path / "t.json")
    del old.meta["unit_context"]
    old.save(tmp_path / "summed.json")
    with pytest.raises(EdgepruneError, match="another way .* profile into another --out"):
        profile(
            model=model, model_id="resnet20", example_input=(1, 1, 8, 8), device=CountingDevice(),
            out=tmp_path / "summed.json", step=16, progress=False, log=lambda s: None,
        )  # fmt: skip


def test_recalibrate_fits_a_new_line_on_the_kept_units(tmp_path):
    """`recalibrate`: on a device that drifted (here 20 % slower) the dense model and the plans are
    all measured anew and the line is fitted on them alone; no unit is measured again and the line
    it replaces is kept. A table that does not exist is refused rather than profiled."""
    model = build_model("resnet20", in_channels=1)
    common = dict(
        model=model, model_id="resnet20", example_input=(1, 1, 8, 8), step=16, progress=False, log=lambda s: None
    )
    with pytest.raises(EdgepruneError, match="t.json does not exist: profile it first"):
        profile(device=CountingDevice(), out=tmp_path / "t.json", calibrate=2, recalibrate=True, **common)
    first = profile(device=CountingDevice(), out=tmp_path / "t.json", calibrate=2, **common)
    old_points = dict(first.meta["calibration_points"])
    seen: list[str] = []

    class Drifted(CountingDevice):
        def measure_many(self, items, protocol=None, **kw):
            seen.extend(os.path.basename(p) for p, _ in items)
            return [replace(m, median_ms=1.2 * m.median_ms) for m in super().measure_many(items, protocol, **kw)]

    again = profile(device=Drifted(), out=tmp_path / "t.json", calibrate=3, recalibrate=True, **common)
    points = again.meta["calibration_points"]
    assert len(points) == 4 and len(set(seen)) == 4 and again.entries == first.entries  # whole models only
    assert list(points)[:3] == list(old_points)  # the same plans first (same seed), measured now
    for key, old in old_points.items():
        assert points[key]["measured_ms"] == pytest.approx(1.2 * old["measured_ms"])
    assert again.calibration["n"] == 4 and again.calibration["a"] == pytest.approx(1.2 * first.calibration["a"])
    [previous] = again.meta["previous_calibrations"]
    assert previous["points"] == old_points and previous["calibration"] == first.calibration


def test_profile_warns_when_the_calibration_points_scatter(tmp_path):
    """A line that misses its own whole-model points by more than CALIBRATION_SCATTER was fitted on
    a busy device: the profile says so and how to refit it. Points on their line: no warning."""
    from edgeprune.latency.profiler import CALIBRATION_SCATTER

    class Busy(CountingDevice):
        """Every other whole model lands in a slow phase (1.3x)."""

        def measure_many(self, items, protocol=None, **kw):
            out = super().measure_many(items, protocol, **kw)
            slow = [os.path.basename(p) in ("m1.onnx", "m3.onnx") for p, _ in items]
            return [replace(m, median_ms=m.median_ms * (1.3 if s else 1)) for m, s in zip(out, slow)]

    model = build_model("resnet20", in_channels=1)
    common = dict(model=model, model_id="resnet20", example_input=(1, 1, 8, 8), step=16, calibrate=3, progress=False)
    quiet: list[str] = []
    profile(device=CountingDevice(), out=tmp_path / "quiet.json", log=quiet.append, **common)
    assert not any("warning" in line for line in quiet)
    busy: list[str] = []
    table = profile(device=Busy(), out=tmp_path / "busy.json", log=busy.append, **common)
    assert table.calibration["fit_median_abs_err"] > CALIBRATION_SCATTER
    [warning] = [line for line in busy if line.startswith("warning:") and "misses its own" in line]
    assert "misses its own 4 whole-model measurements" in warning and "--recalibrate" in warning
    assert "--copies 4" not in warning and "other kernels or layouts" in warning  # its units are in context


def test_profile_warns_when_the_line_misses_the_dense_model(tmp_path):
    """The line fits three plans and the dense model caught in a slow phase (1.4x) lies off it: the
    median miss hides one outlier, but prune refers every prediction to that one point, so the
    profile names it. The quiet profile above it gave no such warning."""
    from edgeprune.latency.profiler import DENSE_MISS

    class SlowDense(CountingDevice):
        def measure_many(self, items, protocol=None, **kw):
            out = super().measure_many(items, protocol, **kw)
            dense = [os.path.basename(p) == "m0.onnx" for p, _ in items]
            return [replace(m, median_ms=m.median_ms * (1.4 if d else 1)) for m, d in zip(out, dense)]

    lines: list[str] = []
    table = profile(
        device=SlowDense(),
        model=build_model("resnet20", in_channels=1),
        model_id="resnet20",
        example_input=(1, 1, 8, 8),
        out=tmp_path / "t.json",
        step=16,
        calibrate=3,
        progress=False,
        log=lines.append,
    )
    assert table.calibration["fit_median_abs_err"] < 0.01  # three of the four points are on the line
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert f"{1 - 1 / 1.4:.0%} under its own measurement" in warning and "--recalibrate" in warning
    assert 1 - 1 / 1.4 > DENSE_MISS


def test_in_context_units_on_openvino():
    """On the real runtime: a conv costs something in context, and a residual add next to nothing
    compared with what it costs alone (OpenVINO fuses it; alone it pays the call and reorders).
    The conv is big enough (~0.1 ms) that four of them outweigh one even when a slow phase of the
    host lands on the single one: at 16 channels and 14x14 the gap was within the VM's noise."""
    cfgs = [
        LayerConfig("conv", 32, 32, 28, 28, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu"),
        LayerConfig("add", 16, 16, 14, 14, act="relu"),
    ]
    dev = Device.load("cpu-openvino")
    conv, add = measure_configs(dev, cfgs, FAST, copies=4)
    for m in (conv, add):
        assert m.median_ms == pytest.approx(max(0.0, (m.extra["copies_ms"] - m.extra["single_ms"]) / 3))
    assert conv.extra["copies_ms"] > conv.extra["single_ms"] and conv.median_ms > 0
    assert add.median_ms < add.extra["single_ms"] / 2


class SyntheticStepDevice(Device):
    """A device whose conv latency steps every 16 output channels (to test the step finder);
    `tail`: the extra share a width off a multiple of 16 costs (OpenVINO's shape on x86)."""

    def __init__(self, tail: float = 0.0, spike: dict[int, float] | None = None):
        super().__init__(DeviceSpec("synthetic", "onnxruntime"))
        self.tail, self.spike = tail, spike or {}

    def measure_many(self, items, protocol=None, *, on_result=None, fresh=False):
        import onnx

        out = []
        for i, (path, _) in enumerate(items):
            cout = onnx.load(str(path)).graph.initializer[0].dims[0]
            ms = 0.1 * (1 + -(-cout // 16)) * (1 + self.tail * bool(cout % 16)) * (1 + self.spike.get(cout, 0.0))
            out.append(Measurement(ms, 0, 0, 0, 1, 0))
            if on_result:
                on_result(i, out[-1])
        return out


def test_detect_step_finds_the_plateaus():
    step, info = detect_step(SyntheticStepDevice(), progress=False)
    assert step == 16 and info["quantisation_error"][32] > 0.3


def test_detect_step_keeps_a_step_whose_multiples_are_faster_than_the_widths_between():
    """Widths off the block cost more than the block's top: the block is the step (not 4, whose
    widths it would offer the search are slower than wider ones)."""
    step, info = detect_step(SyntheticStepDevice(tail=0.1), progress=False)
    assert step == 16 and info["quantisation_error"][16] == 0.0 and info["quantisation_error"][32] > 0.3
    # one noisy window at a block's top (32 channels 6 % slow) does not put the block off its plateau
    step, info = detect_step(SyntheticStepDevice(tail=0.1, spike={32: 0.06}), progress=False)
    assert step == 16 and info["quantisation_error"][16] == 0.0


def test_device_profiles_load_and_errors(tmp_path):
    spec = DeviceSpec.load("cpu-onnxruntime")
    assert spec.backend == "onnxruntime" and spec.options["threads"] == 1 and spec.protocol.min_runs >= 50
    assert DeviceSpec.load("cpu-openvino-bf16").options["precision"] == "bf16"
    assert DeviceSpec.load("jetson-orin-tensorrt-fp16").agent.startswith("https://")
    with pytest.raises(EdgepruneError, match="unknown device 'gpu'.*cpu-onnxruntime"):
        DeviceSpec.load("gpu")
    (tmp_path / "bad.yaml").write_text("backend: onnxruntime\nthreads: 2\n")
    with pytest.raises(EdgepruneError, match="unknown field.*threads"):
        DeviceSpec.load(tmp_path / "bad.yaml")
    assert DeviceSpec.load("cpu-openvino").unit_copies == 4 and DeviceSpec.load("cpu-onnxruntime").unit_copies == 1
    (tmp_path / "bad.yaml").write_text("backend: onnxruntime\nunit_copies: 0\n")
    with pytest.raises(EdgepruneError, match="unit_copies must be a whole number >= 1"):
        DeviceSpec.load(tmp_path / "bad.yaml")


def test_cli_devices_and_measure(cli, tiny_onnx):
    r = cli("devices", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {p["name"] for p in d["profiles"]} >= {"cpu-onnxruntime", "cpu-openvino", "cpu-openvino-bf16"}
    assert d["runtimes_here"]["onnxruntime"] is True
    r = cli("measure", str(tiny_onnx[0]), "--device", "cpu-openvino", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["median_ms"] > 0 and m["input_shape"] == [1, 8, 14, 14] and m["fingerprint"]["precision"] == "f32"


def test_profile_resumes_after_interruption(cli, tmp_path):
    out = tmp_path / "t.json"
    # the shipped device with a short protocol: this test is about the resume, not the figures
    fast = yaml.safe_load((ROOT / "devices" / "cpu-onnxruntime.yaml").read_text())
    fast["protocol"] = {"warmup_runs": 3, "warmup_s": 0.01, "min_runs": 20, "min_s": 0.05, "max_cv": 0.5}
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast))
    args = [
        "profile",
        "--model",
        "resnet20",
        "--device",
        str(tmp_path / "fast.yaml"),
        "--out",
        str(out),
        "--calibrate",
        "2",
        "--step",
        "32",  # 27 configurations: the kill lands after the first batch of 16, the resume measures the rest
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeprune", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 300
    while time.time() < deadline and not out.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(LatencyTable.load(out).entries)
    assert 0 < first < 27
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert f"{first} already in" in r.stderr
    summary = json.loads(r.stdout)
    table = LatencyTable.load(out)
    assert summary["entries"] == len(table.entries) == table.meta["configurations"]
    points = len(table.meta["calibration_points"])  # the dense model and 2 plans, fewer where they coincide
    assert table.calibration["n"] == points >= 2 and table.calibration["a"] > 0
    r = cli("predict", "--model", "resnet20", "--table", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["predicted_ms"] > 0
    r = cli(*args, "--copies", "4")
    assert r.returncode == 2 and "units measured with 1 copy, not 4: add --copies 1 to extend it" in r.stderr
    # refit on the dense model and the same plans measured anew, together; the old line is kept
    r = cli(*args, "--recalibrate", "--json")
    assert r.returncode == 0, r.stderr
    refit = LatencyTable.load(out)
    assert refit.calibration["n"] == points and refit.entries == table.entries
    assert refit.meta["previous_calibrations"][0]["calibration"] == table.calibration
    r = cli("profile", "--model", "resnet20", "--out", str(tmp_path / "none.json"), "--recalibrate")
    assert r.returncode == 2 and "none.json does not exist: profile it first" in r.stderr


def test_anchor_carries_only_the_drift_since_the_profile():
    """The table measured the dense model itself when it was profiled: the anchor is dense now /
    dense then, whatever the calibration line predicts for it. Without that point it falls back on
    measured / predicted."""
    from edgeprune.latency.predictor import anchor_scale

    dense, plan = [64, 32, 16], [32, 16, 8]
    table = LatencyTable(device="d", fingerprint={}, protocol={})
    table.meta["calibration_points"] = {
        ",".join(map(str, dense)): {"sum_ms": 1.0, "measured_ms": 0.8},
        ",".join(map(str, plan)): {"sum_ms": 0.5, "measured_ms": 0.45},
    }
    # the line predicts dense at 0.9 ms (10 % over what was measured): the anchor ignores that miss
    assert anchor_scale(table, dense, dense_ms=0.88, dense_predicted_ms=0.9) == pytest.approx(1.1)
    table.meta["calibration_points"].pop(",".join(map(str, dense)))
    assert anchor_scale(table, dense, dense_ms=0.88, dense_predicted_ms=0.9) == pytest.approx(0.88 / 0.9)
    assert anchor_scale(LatencyTable(device="d", fingerprint={}, protocol={}), dense, 1.0, 2.0) == 0.5
