"""Compared models are measured in turn, several rounds (edgeprune/latency/interleave.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edgeprune.devices import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.interleave import measure_interleaved, spread
from edgeprune.latency.layers import LayerConfig, unit_model
from edgeprune.latency.measurement import Protocol

QUICK = Protocol(warmup_runs=2, warmup_s=0.01, min_runs=10, min_s=0.02, max_cv=10, max_foreign_load=1.0)


def _onnx(tmp_path, cout: int):
    model, shape = unit_model(LayerConfig("conv", 4, cout, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu"))
    path = tmp_path / f"conv{cout}.onnx"
    path.write_bytes(model.SerializeToString())
    return path, shape


class SlowWindow(Device):
    """A real ONNX Runtime device on which one measurement (the `slow`-th) lands in a slow window."""

    def __init__(self, spec, slow: int) -> None:
        super().__init__(spec)
        self.slow, self.order = slow, []

    def _measure_local(self, onnx_path, input_shape, protocol):
        m = super()._measure_local(onnx_path, input_shape, protocol)
        self.order.append(Path(onnx_path).name)
        return replace(m, median_ms=m.median_ms * 5) if len(self.order) == self.slow else m


def test_models_are_measured_in_turn_and_one_slow_window_decides_nothing(tmp_path):
    spec = Device.load("cpu-onnxruntime").spec
    items = [_onnx(tmp_path, 8), _onnx(tmp_path, 64)]
    dev = SlowWindow(spec, slow=3)  # the second round's first model
    a, _ = measure_interleaved(dev, items, repeats=3, protocol=QUICK)
    assert dev.order == ["conv8.onnx", "conv64.onnx"] * 3
    assert len(a.extra["rounds_ms"]) == 3 and a.extra["rounds_ms"][1] == max(a.extra["rounds_ms"])
    assert a.median_ms in a.extra["rounds_ms"] and a.median_ms < max(a.extra["rounds_ms"])
    assert spread(a.extra["rounds_ms"]) > 1.0  # the slow round is kept on record
    # measured once, the slow window is the figure
    once = SlowWindow(spec, slow=1)
    (single,) = measure_interleaved(once, items[:1], repeats=1, protocol=QUICK)
    assert single.median_ms > 2 * a.median_ms and spread(single.extra["rounds_ms"]) == 0
    dev.close()
    once.close()


def test_repeats_must_be_positive(tmp_path):
    with pytest.raises(EdgepruneError, match="--repeats must be at least 1"):
        measure_interleaved(Device.load("cpu-onnxruntime"), [_onnx(tmp_path, 8)], repeats=0)
