"""INT8: devices that run a model quantized, int8 latency tables, and the int8 export held to the fp32 model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeprune.backends import OnnxRuntimeBackend, OpenVinoBackend, TensorRtBackend
from edgeprune.checkpoint import load_checkpoint
from edgeprune.devices import Device, DeviceSpec
from edgeprune.errors import EdgepruneError
from edgeprune.formats.quantize import is_quantized, quantize_int8, random_inputs
from edgeprune.latency.layers import LayerConfig
from edgeprune.latency.units import unit_model

from .conftest import FAST_DEVICE

CONV = LayerConfig("conv", 32, 32, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu")


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    model, shape = unit_model(CONV)
    path = tmp_path_factory.mktemp("int8") / "conv.onnx"
    onnx.save(model, path)
    return path, shape


@pytest.mark.parametrize("backend", [OnnxRuntimeBackend, OpenVinoBackend])
def test_an_int8_device_runs_the_model_quantized(conv_onnx, backend):
    """An fp32 file on an int8 device is quantized first: close to fp32, not equal to it."""
    path, shape = conv_onnx
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    fp32 = backend(**({} if backend is OnnxRuntimeBackend else {"precision": "f32"})).session(path, shape)(x)
    b = backend(precision="int8")
    got = b.session(path, shape)(x)
    diff = np.abs(got - fp32).max() / np.abs(fp32).max()
    assert 0 < diff < 0.1, diff
    assert b.fingerprint()["precision"] == "int8"
    assert not is_quantized(path)  # the user's file is left as it is
    assert b.measure(path, shape).median_ms > 0


def test_int8_device_profiles_load_and_refuse_unknown_precisions(tmp_path):
    for name in ("cpu-onnxruntime-int8", "cpu-openvino-int8"):
        assert DeviceSpec.load(name).options["precision"] == "int8"
    (tmp_path / "bad.yaml").write_text("backend: onnxruntime\noptions: {precision: int4}\n")
    with pytest.raises(EdgepruneError, match="precision.*int4"):
        DeviceSpec.load(tmp_path / "bad.yaml")


def test_a_quantized_file_is_run_as_it_is(conv_onnx, tmp_path):
    """An exported int8 file (its own calibration) is not quantized again by an int8 device."""
    path, shape = conv_onnx
    q = quantize_int8(path, tmp_path / "q.onnx", calibration=random_inputs(shape, seed=3))
    assert is_quantized(q) and not is_quantized(path)
    x = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    as_is = OnnxRuntimeBackend().session(q, shape)(x)
    assert np.array_equal(OnnxRuntimeBackend(precision="int8").session(q, shape)(x), as_is)
    with pytest.raises(EdgepruneError, match="cannot quantize .* to int8"):
        quantize_int8(path, tmp_path / "bad.onnx", calibration=[np.zeros((1, 3, 5, 5), np.float32)])


@pytest.mark.skipif(TensorRtBackend.available(), reason="TensorRT is installed here")
def test_tensorrt_int8_says_what_is_missing(conv_onnx):
    path, shape = conv_onnx
    with pytest.raises(EdgepruneError, match="TensorRT is not available here") as e:
        TensorRtBackend(precision="int8").session(path, shape)
    assert len(str(e.value).splitlines()) == 1


def test_an_int8_table_round_trips_and_is_its_own_setup(tmp_path, tinynet_28):
    """Profiled on an int8 device: a table of the quantized units, which an fp32 device does not take for its own."""
    import torch

    import edgeprune
    from edgeprune.latency.table import LatencyTable, fingerprint_diff
    from edgeprune.models.reference import ModelRef

    from .conftest import EXAMPLES

    device = tmp_path / "fast-ort-int8.yaml"
    device.write_text(FAST_DEVICE.replace("options: {threads: 1}", "options: {threads: 1, precision: int8}"))
    model = ModelRef.parse(f"{EXAMPLES / 'tinynet.py'}:tinynet", kwargs={"width": 16}).build()
    model.load_state_dict(torch.load(tinynet_28["weights"], weights_only=True))
    out = tmp_path / "tinynet-int8.json"
    table = edgeprune.profile(model, (1, 1, 28, 28), device=str(device), out=out, step=16, calibrate=3,
                              progress=False, log=lambda s: None)  # fmt: skip
    again = LatencyTable.load(out)
    assert again.fingerprint["precision"] == "int8" and again.entries == table.entries and len(again.entries) > 5
    fp32 = LatencyTable.load(tinynet_28["table"])
    assert "precision" in fingerprint_diff(fp32.fingerprint, again.fingerprint)
    assert edgeprune.predict(model, (1, 1, 28, 28), out) > 0
    # pruned against it: the search's measured check times int8 candidates, the budget holds measured
    pruned, result = edgeprune.prune(model, (1, 1, 28, 28), device=str(device), budget="85%", data="digits:28",
                                     table=out, search="random", evals=6, measure_top=2, heldout_images=300,
                                     run_dir=tmp_path / "run", progress=False, log=lambda s: None)  # fmt: skip
    record = result.record
    assert record["table"]["fingerprint"]["precision"] == "int8"
    assert record["chosen"]["measured_ms"] <= record["budget_ms"] < record["dense"]["measured_ms"]


def _int8_export(net, task, out, **kw):
    from edgeprune.formats import export_model

    said: list[str] = []
    formats = ["onnx", "onnx-int8", "openvino-int8"]
    artifacts = export_model(net, input_shape=(1, 1, 16, 16), out_dir=out, formats=formats, task=task,
                             accuracy_images=100, log=said.append, **kw)  # fmt: skip
    return artifacts, said


def test_int8_export_passes_parity_and_a_broken_calibration_fails_it(tiny_run, digits16, tmp_path):
    from edgeprune.formats import calibration_inputs, parity_failures
    from edgeprune.task import Task

    net = load_checkpoint(tiny_run["weights"]).build().eval()
    task = Task.classification_on(digits16)
    artifacts, said = _int8_export(net, task, tmp_path / "ok")
    assert not parity_failures(artifacts), said
    for fmt in ("onnx-int8", "openvino-int8"):
        a = artifacts[fmt]
        assert a["precision"] == "int8" and a["parity"]["passed"] and a["parity"]["top1_agreement"] >= 0.9
        assert abs(a["parity"]["test_accuracy"] - artifacts["onnx"]["parity"]["test_accuracy"]) < 0.05
    assert is_quantized(artifacts["onnx-int8"]["path"]) and artifacts["onnx-int8"]["calibration_inputs"] == 256
    # calibrated on inputs 1000 times too large: every real activation rounds to a few levels
    good = calibration_inputs(task, (1, 1, 16, 16))
    broken, said = _int8_export(net, task, tmp_path / "broken", calibration=[x * 1000 for x in good])
    fails = parity_failures(broken)
    assert [f.split(":")[0] for f in fails] == ["onnx-int8", "openvino-int8"], fails
    assert "top-1 agrees on" in broken["onnx-int8"]["parity"]["failed"]
    assert any(line.startswith("onnx-int8: FAILS parity with PyTorch") for line in said)


def test_validation_runs_the_int8_file_on_an_int8_device(tmp_path):
    from edgeprune.pipeline.validate import _artifact_for

    formats = {f: {"path": str(tmp_path / p)} for f, p in [
        ("onnx", "model.onnx"), ("openvino", "openvino/model.xml"),
        ("onnx-int8", "model.int8.onnx"), ("openvino-int8", "openvino-int8/model.xml")]}  # fmt: skip
    pick = {name: _artifact_for(Device.load(name), {"formats": formats}).relative_to(tmp_path).as_posix()
            for name in ("cpu-onnxruntime", "cpu-openvino", "cpu-onnxruntime-int8", "cpu-openvino-int8")}  # fmt: skip
    assert pick == {"cpu-onnxruntime": "model.onnx", "cpu-openvino": "openvino/model.xml",
                    "cpu-onnxruntime-int8": "model.int8.onnx",
                    "cpu-openvino-int8": "openvino-int8/model.xml"}  # fmt: skip
    said: list[str] = []
    fp32_only = {"formats": {f: formats[f] for f in ("onnx", "openvino")}}
    assert _artifact_for(Device.load("cpu-openvino-int8"), fp32_only, said.append).name == "model.onnx"
    assert "no int8 file" in said[0] and "--formats onnx-int8" in said[0]
