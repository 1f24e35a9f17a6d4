"""INT8: devices that run a model quantized, int8 latency tables, and the int8 export held to the fp32 model."""

from __future__ import annotations

import json

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


def test_the_int8_proxy_scores_the_quantized_file(tiny_run, digits16):
    """A candidate scored in int8 is its quantized file run by the runtime: close to fp32, not
    equal, and a calibration that wrecks the file wrecks the score (fp32 scoring would not see it)."""
    import torch

    from edgeprune.formats import calibration_inputs
    from edgeprune.formats.quantized import Int8Runner, QuantizedModel
    from edgeprune.pruning import space
    from edgeprune.search import ProxyEvaluator
    from edgeprune.task import Task

    net = load_checkpoint(tiny_run["weights"]).build().eval()
    task = Task.classification_on(digits16, heldout_images=300)
    s = space(net, torch.randn(1, 1, 16, 16), step=8, min_keep_ratio=0.25)
    good = calibration_inputs(task, (1, 1, 16, 16))
    fp32, int8 = ProxyEvaluator(s, task), ProxyEvaluator(s, task, as_run=Int8Runner(good))
    half = [g.allowed[len(g.allowed) // 2] for g in s.groups]
    assert abs(int8(half) - fp32(half)) < 0.1 and int8.seconds  # scored, and near the fp32 score
    x = torch.cat([x for x, _ in digits16.batches("heldout", 100, limit=1)])
    ref, got = net(x), QuantizedModel(net, good)(x)
    assert 0 < (got - ref).abs().max() / ref.abs().max() < 0.25
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    int8.as_run = Int8Runner([g * 1000 for g in good])
    assert int8.score(net) < fp32.score(net) - 0.3


def test_prune_at_int8_holds_a_share_of_the_dense_model_as_the_device_runs_it(tmp_path, tinynet_28, monkeypatch):
    """`precision="int8"` on an fp32 device: searched on the int8 sibling's table, candidates timed
    quantized, a share-of-dense budget of the dense fp32 model measured beside its int8 self; the
    export writes the int8 file and validation times that file beside the dense fp32 model. Then
    `precision="auto"`: both precisions pruned, the better plan kept, both reported."""
    import re
    import shutil

    import torch

    import edgeprune
    from edgeprune.models.reference import ModelRef

    from .conftest import EXAMPLES

    base = FAST_DEVICE.replace("channel_step: 8", "channel_step: 16")
    (tmp_path / "fast-ort.yaml").write_text(base)
    (tmp_path / "fast-ort-int8.yaml").write_text(
        base.replace("name: fast-ort", "name: fast-ort-int8").replace("{threads: 1}", "{threads: 1, precision: int8}")
    )
    ref = ModelRef.parse(f"{EXAMPLES / 'tinynet.py'}:tinynet", kwargs={"width": 16})
    model = ref.build()
    model.load_state_dict(torch.load(tinynet_28["weights"], weights_only=True))
    table = tmp_path / "int8.json"
    edgeprune.profile(model, (1, 1, 28, 28), device=str(tmp_path / "fast-ort-int8.yaml"), out=table, step=16,
                      calibrate=3, progress=False, log=lambda s: None)  # fmt: skip
    said: list[str] = []
    common = {"data": "digits:28", "search": "random", "evals": 4, "measure_top": 1, "heldout_images": 200,
              "progress": False, "log": said.append, "model_ref": ref}  # fmt: skip
    _, result = edgeprune.prune(model, (1, 1, 28, 28), device=str(tmp_path / "fast-ort.yaml"), budget="80%",
                                precision="int8", table=table, run_dir=tmp_path / "run", **common)  # fmt: skip
    r = result.record
    assert r["device"] == "fast-ort-int8" and r["precision"]["searched"] == "int8"
    assert r["precision"]["reference_precision"] == "fp32" and r["precision"]["reference_device"] == "fast-ort"
    pair = next(line for line in said if line.startswith("the dense model in fp32 and in int8 on fast-ort"))
    fp32_ms, int8_ms = map(float, re.search(r": (\S+) against (\S+) ms", pair).groups())
    # the budget is of the dense fp32 model on this run's clock: the ratio measured in turn, times the
    # int8 dense figure every round is referred to
    reference = r["dense"]["measured_ms"] * fp32_ms / int8_ms
    assert r["budget_ms"] == pytest.approx(0.8 * reference, rel=0.002) == 0.8 * r["precision"]["reference_ms"]
    assert r["met_budget"] and r["chosen"]["measured_ms"] <= r["budget_ms"]
    manifest = edgeprune.export_run(tmp_path / "run", formats="onnx", out=tmp_path / "export", log=said.append)
    assert "onnx-int8" in manifest["formats"] and is_quantized(manifest["formats"]["onnx-int8"]["path"])
    v = edgeprune.validate_run(tmp_path / "run", repeats=5, sparse=False, report=False, progress=False,
                               log=said.append)  # fmt: skip
    assert v["device"] == "fast-ort" and v["artifact"].endswith("model.int8.onnx")
    assert v["dense_at_search_ms"] == r["precision"]["reference_ms"]

    # auto, each precision's table found where prune looks (this folder's latency_tables/)
    monkeypatch.chdir(tmp_path)
    for name, src in (("fast-ort", tinynet_28["table"]), ("fast-ort-int8", table)):
        (tmp_path / "latency_tables" / name).mkdir(parents=True)
        shutil.copy(src, tmp_path / "latency_tables" / name / f"{ref.id}.json")
    said.clear()
    _, result = edgeprune.prune(model, (1, 1, 28, 28), device=str(tmp_path / "fast-ort.yaml"), budget="80%",
                                precision="auto", run_dir=tmp_path / "auto", **common)  # fmt: skip
    choice = result.record["precision_choice"]
    met = [p for p in ("device", "int8") if choice[p].get("met_budget")]
    assert choice["kept"] == max(met, key=lambda p: choice[p]["proxy_accuracy"])
    assert choice["device"]["precision"] == "fp32" and choice["int8"]["precision"] == "int8"
    assert any(line.startswith("precision auto:\n") and f"kept: {choice['kept']}" in line for line in said), said
    top = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert top["precision_choice"] == choice and (tmp_path / "auto" / "pruned.pt").is_file()
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["precision"] == choice["kept"]


def test_precision_auto_keeps_the_plan_that_meets_the_budget():
    """Where one precision cannot reach the budget, the other's plan is kept, and the reason said."""
    from edgeprune.pipeline.precision import _keep_better
    from edgeprune.pipeline.prune import PruneResult

    def outcome(precision, met, score, ms):
        record = {"precision": {"searched": precision}, "device": "d", "met_budget": met, "budget_ms": 1.0,
                  "chosen": {"measured_ms": ms, "proxy_accuracy": score}}  # fmt: skip
        return "model", PruneResult(None, record)

    said: list[str] = []
    unreachable = EdgepruneError("budget 1 ms is out of reach on d-int8: ...")
    _, kept = _keep_better({"device": outcome("fp32", True, 0.8, 0.9), "int8": unreachable}, None, said.append)
    assert kept.record["precision_choice"]["kept"] == "device" and "out of reach" in said[0]
    both = {"device": outcome("fp32", True, 0.8, 0.9), "int8": outcome("int8", True, 0.85, 0.7)}
    assert _keep_better(both, None, said.append)[1].record["precision_choice"]["kept"] == "int8"
    missed = {"device": outcome("fp32", True, 0.8, 0.9), "int8": outcome("int8", False, 0.9, 1.1)}
    assert _keep_better(missed, None, said.append)[1].record["precision_choice"]["kept"] == "device"
    with pytest.raises(EdgepruneError, match="neither precision reaches the budget"):
        _keep_better({"device": unreachable, "int8": unreachable}, None, said.append)


def test_a_speedup_claim_is_held_beside_the_same_structure_in_int8(tiny_run, tmp_path):
    """validate --claim-speedup also measures the shipped structure at the other precision; which
    file that is follows the export's formats."""
    import edgeprune
    from edgeprune.pipeline.validate import twin_of

    net = load_checkpoint(tiny_run["weights"]).build().eval()
    v = edgeprune.validate(net, dense=net, example_input=(1, 1, 16, 16), device=tiny_run["device"], budget="95%",
                           claim_speedup=2.0, sparse=False, repeats=3, progress=False, log=lambda s: None)  # fmt: skip
    assert v["precision_twin"]["precision"] == "int8" and v["precision_twin"]["speedup"] > 0
    assert v["claim"]["int8_structured_speedup"] == v["precision_twin"]["speedup"]
    formats = {f: {"path": str(tmp_path / p)} for f, p in [
        ("onnx", "model.onnx"), ("openvino", "openvino/model.xml"),
        ("onnx-int8", "model.int8.onnx"), ("openvino-int8", "openvino-int8/model.xml")]}  # fmt: skip
    manifest, fp32, ir, ir8 = {"formats": formats}, Device.load("cpu-openvino"), "openvino", "openvino-int8"
    assert twin_of(tmp_path / ir / "model.xml", manifest, fp32) == ("int8", tmp_path / ir8 / "model.xml", False)
    assert twin_of(tmp_path / ir8 / "model.xml", manifest, fp32) == ("fp32", tmp_path / ir / "model.xml", False)
    assert twin_of(tmp_path / "openvino/model.xml", {"formats": {"onnx": formats["onnx"]}}, fp32) == (
        "int8", tmp_path / "model.onnx", True)  # fmt: skip
    assert twin_of(tmp_path / "model.onnx", manifest, Device.load("cpu-onnxruntime-int8")) is None


def test_a_device_at_int8_is_its_int8_sibling_or_itself_marked(tmp_path):
    """`at_precision("int8")`: the shipped -int8 profile where one exists (its tables, its step), else
    the profile with the runtime's precision set and its name marked, so its tables stay apart."""
    assert Device.load("cpu-onnxruntime").at_precision("int8").spec.path.endswith("cpu-onnxruntime-int8.yaml")
    assert Device.load("cpu-openvino-bf16").at_precision("int8").name == "cpu-openvino-int8"
    own = Device.load("cpu-openvino-int8")
    assert own.at_precision("int8") is own and own.at_precision(None) is own
    fp16 = DeviceSpec.load("jetson-orin-tensorrt-fp16")
    jetson = fp16.at_precision("int8")
    assert (jetson.name, jetson.options["precision"], jetson.agent) == ("jetson-orin-tensorrt-int8", "int8", fp16.agent)
    (tmp_path / "mine.yaml").write_text(FAST_DEVICE.replace("name: fast-ort", "name: mine"))
    mine = DeviceSpec.load(tmp_path / "mine.yaml")
    assert mine.precision == "fp32" and mine.at_precision("int8").name == "mine-int8"
    assert mine.at_precision("int8").make_backend().precision == "int8"
