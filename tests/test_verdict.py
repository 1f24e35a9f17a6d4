"""What one timed run is (runtime-native or the Python call) and what a budget verdict is decided
on (edgeprune/latency/verdict.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeprune.devices import Device
from edgeprune.devices.spec import DeviceSpec
from edgeprune.errors import EdgepruneError
from edgeprune.latency.interleave import measure_interleaved
from edgeprune.latency.layers import LayerConfig, unit_model
from edgeprune.latency.measurement import Measurement, Protocol
from edgeprune.latency.table import fingerprint_diff, setup_name
from edgeprune.latency.verdict import decide, least_noisy, pooled_quantile, steady, verdict_line, window_quantiles

QUICK = Protocol(warmup_runs=2, warmup_s=0.01, min_runs=20, min_s=0.02, max_cv=10, max_foreign_load=1.0)


def _window(samples) -> Measurement:
    s = sorted(samples)
    return Measurement(
        median_ms=float(np.median(s)),
        p90_ms=s[int(0.9 * len(s))],
        mean_ms=float(np.mean(s)),
        cv=0.0,
        n=len(s),
        foreign_load=0.0,
        extra={"quantiles_ms": window_quantiles(s)},
    )


def _conv(tmp_path, cout: int = 16) -> tuple[Path, tuple]:
    model, shape = unit_model(LayerConfig("conv", 8, cout, 16, 16, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu"))
    path = tmp_path / f"conv{cout}.onnx"
    path.write_bytes(model.SerializeToString())
    return path, shape


def test_pooled_quantiles_are_those_of_every_run_together():
    rng = np.random.default_rng(0)
    # a quiet window, a slow one, and a long quiet one: the pooled figures weigh each by its runs
    windows = [rng.normal(1.0, 0.02, 400), rng.normal(1.6, 0.05, 100), rng.normal(1.02, 0.02, 900)]
    together = np.concatenate(windows)
    measured = [_window(w) for w in windows]
    for level in (0.5, 0.9):
        exact = float(np.quantile(together, level))
        assert pooled_quantile(measured, level) == pytest.approx(exact, rel=0.01)
    s = steady(measured)
    assert s["runs"] == 1400 and s["windows"] == 3
    assert s["quietest_ms"] == pytest.approx(min(m.median_ms for m in measured))
    assert s["spread"] == pytest.approx(measured[2].median_ms / measured[0].median_ms - 1)
    # windows from an older agent (no percentiles): their medians' and p90s' medians
    bare = [replace(m, extra={}) for m in measured]
    assert steady(bare)["median_ms"] == measured[2].median_ms and steady(bare)["p90_ms"] == measured[2].p90_ms


def test_the_verdict_is_meets_misses_or_undecided():
    assert decide(0.9, 0.8, 1.0, spread=0.5, tolerance=0.1) == "meets"  # noise only adds time: a pass stands
    assert decide(1.1, 1.05, 1.0, spread=0.5, tolerance=0.1) == "misses"  # even the quietest window is over
    assert decide(1.1, 0.95, 1.0, spread=0.02, tolerance=0.1) == "misses"  # windows agree: it is over
    assert decide(1.1, 0.95, 1.0, spread=0.3, tolerance=0.1) == "undecided"  # the host decided, not the model
    v = {
        "outcome": "undecided",
        "statistic": "median",
        "held_ms": 1.1,
        "budget_ms": 1.0,
        "quietest_held_ms": 0.95,
        "tolerance": 0.1,
        "steady": {"median_ms": 1.1, "p90_ms": 1.3, "quietest_ms": 0.95, "spread": 0.3},
    }
    line = verdict_line(v)
    assert line.startswith("undecided against the 1 ms budget: the host was too noisy to decide (median 1.1 ms")
    assert "windows 30% apart, tolerance 10%" in line and "p90 1.3 ms" in line and "\n" not in line


def _measured(spread: float) -> Measurement:
    """A model measured in two windows, the second `spread` over the first."""
    a, b = _window([1.0] * 20), _window([1.0 + spread] * 20)
    return replace(a, extra={**a.extra, "steady": steady([a, b])})


def test_a_reference_figure_measured_in_a_noisy_stretch_is_measured_again():
    calls = []

    def measure(spreads):
        def call():
            calls.append(len(calls))
            return [_measured(0.02), _measured(spreads[len(calls) - 1])]

        return call

    said = []
    quiet_first = least_noisy(measure([0.05, 0.0]), tolerance=0.1, on_noisy=said.append)
    assert len(calls) == 1 and not said and quiet_first[1].extra["steady"]["spread"] == pytest.approx(0.025)
    calls.clear()
    # noisy, then quiet: measured again once, the quiet call kept
    kept = least_noisy(measure([0.4, 0.04, 0.0]), tolerance=0.1, on_noisy=said.append)
    assert len(calls) == 2 and said == [pytest.approx(0.2)] and kept[1].extra["steady"]["spread"] == pytest.approx(0.02)
    calls.clear()
    # noisy every time: three calls, the least noisy kept, no retry announced after the last
    said.clear()
    kept = least_noisy(measure([0.6, 0.3, 0.5]), tolerance=0.1, on_noisy=said.append)
    assert len(calls) == 3 and len(said) == 2 and kept[1].extra["steady"]["spread"] == pytest.approx(0.15)


@pytest.mark.parametrize("profile", ["cpu-onnxruntime", "cpu-openvino"])
def test_native_timing_and_the_python_call_both_measure_and_are_told_apart(tmp_path, profile):
    path, shape = _conv(tmp_path)
    dev = Device.load(profile)
    native = dev.measure(path, shape, replace(QUICK, timing="native"))
    call = dev.measure(path, shape, replace(QUICK, timing="python-call"))
    for m in (native, call):
        assert m.median_ms > 0 and m.n >= 20 and len(m.extra["quantiles_ms"]) == 21
        assert m.extra["quantiles_ms"] == sorted(m.extra["quantiles_ms"])
    # what one run is belongs to the setup: a table timed one way is another setup for the other
    assert dev.fingerprint()["timing"] == "native"
    other = Device(replace(dev.spec, protocol=replace(dev.spec.protocol, timing="python-call")))
    assert fingerprint_diff(dev.fingerprint(), other.fingerprint()) == "timing: native != python-call"
    with pytest.raises(EdgepruneError, match="timing"):
        Protocol.from_dict({"timing": "wall"})


def test_tables_from_before_timing_was_named_keep_their_setup():
    # this VM's ONNX Runtime tables before the fingerprint said how a run is timed (the Python call):
    # read as such, and their setup folder keeps the name it had then
    fp = {"runtime": "onnxruntime", "version": "1.32.0", "cpu": "AMD EPYC", "threads": 1,
          "providers": ["CPUExecutionProvider"], "precision": "fp32", "graph_optimization": "all"}  # fmt: skip
    assert setup_name(fp) == "amd-epyc-071a4c" == setup_name({**fp, "timing": "python-call"})
    assert not fingerprint_diff(fp, {**fp, "timing": "python-call"})
    assert fingerprint_diff(fp, {**fp, "timing": "native"}) == "timing: python-call != native"
    assert setup_name({**fp, "timing": "native"}) != "amd-epyc-071a4c"


def test_interleaved_windows_carry_the_steady_figures(tmp_path):
    items = [_conv(tmp_path, 8), _conv(tmp_path, 32)]
    dev = Device.load("cpu-onnxruntime")
    a, b = measure_interleaved(dev, items, repeats=4, protocol=QUICK)
    for m in (a, b):
        s = m.extra["steady"]
        assert s["windows"] == 4 and s["quietest_ms"] == m.median_ms == min(m.extra["rounds_ms"])
        assert s["median_ms"] <= s["p90_ms"] and s["runs"] >= 4 * 20 and s["spread"] >= 0


def test_the_verdict_statistic_is_a_device_profile_field():
    spec = DeviceSpec.from_dict({"name": "x", "backend": "onnxruntime", "verdict_statistic": "p90"})
    assert spec.verdict_statistic == "p90"
    assert DeviceSpec.from_dict({"name": "x", "backend": "onnxruntime"}).verdict_statistic == "median"
    with pytest.raises(EdgepruneError, match="verdict_statistic"):
        DeviceSpec.from_dict({"name": "x", "backend": "onnxruntime", "verdict_statistic": "mean"})


def test_validate_decides_on_the_named_statistic(tmp_path):
    from edgeprune.pipeline.validate import Measured, verdict

    rng = np.random.default_rng(1)

    def model(windows_ms):  # a model measured in windows, as measure_interleaved returns it
        ws = [_window(rng.normal(ms, ms * 0.01, 200)) for ms in windows_ms]
        quiet = min(ws, key=lambda m: m.median_ms)
        return replace(quiet, extra={**quiet.extra, "rounds_ms": [w.median_ms for w in ws], "steady": steady(ws)})

    # the quietest window (1.0 ms) is within a 1.1 ms budget; the typical one (1.4 ms) is not
    noisy = Measured(model([1.0, 1.4, 1.4, 1.5, 1.4]), model([2.0, 2.6, 2.8, 2.7, 2.6]), None)
    v = verdict(noisy, budget="1.1ms", statistic="median", tolerance=0.1)
    assert v["verdict"]["outcome"] == "undecided" and v["meets_budget"] is False
    assert v["held_ms"] == pytest.approx(1.4, rel=0.02)
    assert v["verdict"]["quietest_held_ms"] == pytest.approx(1.0, rel=0.02)
    assert v["speedup"] == pytest.approx(2.0, rel=0.03)  # ratios stay on the quietest windows
    # windows that agree: the model is over
    steady_over = Measured(model([1.2, 1.21, 1.2, 1.22, 1.2]), model([2.0] * 5), None)
    assert verdict(steady_over, budget="1.1ms")["verdict"]["outcome"] == "misses"
    # p90 for hard real time: over where the median meets
    tight = Measured(model([1.0, 1.0, 1.0, 1.05, 1.0]), model([2.0] * 5), None)
    assert verdict(tight, budget="1.025ms", statistic="median")["verdict"]["outcome"] == "meets"
    p90 = verdict(tight, budget="1.025ms", statistic="p90", tolerance=0.1)
    assert p90["verdict"]["statistic"] == "p90" and p90["verdict"]["outcome"] == "misses"
    # a share of dense refers the statistic to the dense model at the search, like for like
    share = verdict(steady_over, budget="50%", dense_then_ms=2.0, budget_ms=1.0, statistic="median")
    runs, dense_runs = steady_over.shipped.extra["steady"], steady_over.dense.extra["steady"]
    assert share["held_ms"] == pytest.approx(runs["median_ms"] * 2.0 / dense_runs["median_ms"])


class ScriptedDevice:
    """The dense model (the meter's first export, m0) runs 1 ms in every window; a pruned plan 0.5 ms in
    one window of three and 0.7 ms in the other two (a host slow most of the time). Nothing is run."""

    name = "scripted"
    remote = False

    def __init__(self) -> None:
        self.spec = DeviceSpec(name="scripted", backend="onnxruntime", protocol=Protocol(min_s=0.0))
        self.windows = 0

    def measure_many(self, items, protocol=None, *, on_result=None, fresh=False):
        out = []
        for j, (path, _) in enumerate(items):
            if Path(path).name == "m0.onnx":
                ms = 1.0
            else:
                ms, self.windows = (0.5 if self.windows % 3 == 0 else 0.7), self.windows + 1
            out.append(_window([ms * (1 + k / 1000) for k in range(20)]))
            if on_result is not None:
                on_result(j, out[-1])
        return out


@pytest.mark.parametrize("statistic, held", [("median", 0.7), ("p90", 0.7), ("quietest", 0.5)])
def test_the_measured_check_holds_plans_to_the_named_statistic(statistic, held):
    """prune keeps a plan only if validation will pass it: the candidate's figure is the device
    profile's statistic of its steady runs (referred to the dense model beside it), not its quietest
    window; `quietest` is what a run started before that rule keeps."""
    import torch

    from edgeprune.models import build_model
    from edgeprune.pruning import space
    from edgeprune.search.measured import PlanMeter

    s = space(build_model("resnet20", in_channels=1).eval(), torch.randn(1, 1, 8, 8), step=8)
    meter = PlanMeter(s, ScriptedDevice(), criterion="l2", relative=True, statistic=statistic, progress=False)
    try:
        meter.dense_ms, meter.dense_quietest_ms = meter.measure_dense()
        r = meter.referred([s.min_counts()])
    finally:
        meter.close()
    assert meter.dense_quietest_ms == pytest.approx(1.01, rel=0.01)
    assert meter.held(r.raw[0]) * r.refer / meter.dense_ms == pytest.approx(held, rel=0.03)
    with pytest.raises(EdgepruneError, match="unknown statistic 'mean'"):
        PlanMeter(s, ScriptedDevice(), criterion="l2", relative=True, statistic="mean")
