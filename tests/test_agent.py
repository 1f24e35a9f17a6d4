"""The device agent, for real: a server subprocess on loopback, a client, the profiler through it."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import onnx
import pytest
import yaml

from edgeprune.agent.client import AgentClient
from edgeprune.devices import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.interleave import measure_interleaved
from edgeprune.latency.layers import LayerConfig, unit_model
from edgeprune.latency.measurement import Protocol

from .conftest import ROOT

QUICK = Protocol(warmup_runs=2, warmup_s=0.01, min_runs=10, min_s=0.02, max_cv=10, max_foreign_load=1.0)
SLOW = Protocol(warmup_runs=1, warmup_s=0, min_runs=10, min_s=30, max_runs=10**9, max_cv=10, max_foreign_load=1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """A real `edgeprune agent serve` on a free loopback port; `extra`: more serve options;
    `tls`: (certificate, key) to serve https."""

    def __init__(self, tmp, max_mb: int = 64, extra: tuple[str, ...] = (), tls: tuple | None = None):
        self.tmp, self.max_mb, self.extra, self.tls = tmp, max_mb, tuple(extra), tls
        self.port = _free_port()
        self.cache = tmp / "cache"
        self.token_file = tmp / "token"
        self.proc = None
        self.output = ""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeprune", "agent", "serve", "--device", "cpu-onnxruntime", "--port",
             str(self.port), "--cache", str(self.cache), "--token-file", str(self.token_file), "--max-mb",
             str(self.max_mb), "--job-timeout", "60", *self.extra,
             *(["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])] if self.tls else [])],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.time() + 90
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1, verify=False).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("agent did not start: " + self.output)

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def client(self) -> AgentClient:
        return AgentClient(self.url, self.token, timeout_s=60)

    def stop(self) -> str:
        """Stop it; its output so far (also kept in `output`)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout:
            self.output += self.proc.stdout.read()
            self.proc.stdout.close()
        return self.output


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("agent")).start()
    yield a
    a.stop()


def _model(cout: int = 8, cin: int = 4, hw: int = 8) -> tuple[bytes, tuple[int, ...]]:
    model, shape = unit_model(LayerConfig("conv", cin, cout, hw, hw, (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu"))
    return model.SerializeToString(), shape


def _post(agent, path, body=None, token="ok", **kw):
    headers = {} if token is None else {"Authorization": f"Bearer {agent.token if token == 'ok' else token}"}
    kw.setdefault("timeout", 60)
    return httpx.post(f"{agent.url}/v1{path}", json=body, headers=headers, **kw)


def test_token_is_owner_only_and_required(agent):
    assert oct(os.stat(agent.token_file).st_mode & 0o777) == "0o600"
    data, shape = _model()
    body = {"model": base64.b64encode(data).decode(), "input_shape": list(shape)}
    assert _post(agent, "/measure", body, token=None).status_code == 401
    assert _post(agent, "/measure", body, token="wrong").status_code == 401
    assert httpx.get(f"{agent.url}/v1/info", timeout=10).status_code == 401
    with pytest.raises(EdgepruneError, match="refused the token"):
        AgentClient(agent.url, "wrong").info()


def test_measure_and_batch(agent):
    c = agent.client()
    info = c.info()
    assert info["fingerprint"]["runtime"] == "onnxruntime" and info["queue_length"] == 0
    data, shape = _model(8)
    m = c.measure(data, shape, QUICK)
    assert m.median_ms > 0 and m.n >= 10
    items = [_model(c_out) for c_out in (8, 16, 24, 32, 40)]
    seen = []
    results = c.measure_many(items, QUICK, on_result=lambda i, r: seen.append(i))
    assert len(results) == 5 and sorted(seen) == list(range(5)) and all(r.median_ms > 0 for r in results)


@pytest.mark.parametrize(
    "case,expect",
    [("garbage", "not a valid ONNX model"), ("external", "external data"), ("shape", "does not match"),
     ("custom", "custom-op domain"), ("fields", "needs 'model'"), ("fresh", "'fresh' must be true or false")],
)  # fmt: skip
def test_bad_requests_get_400_and_agent_keeps_serving(agent, case, expect, tmp_path):
    data, shape = _model()
    if case == "garbage":
        data = b"\x08\x07garbage" * 10
    elif case == "external":
        model = onnx.load_from_string(data)
        onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)  # fmt: skip
        data = (tmp_path / "m.onnx").read_bytes()
    elif case == "shape":
        shape = (1, 4, 16, 16)
    elif case == "custom":
        model = onnx.load_from_string(data)
        model.graph.node[0].domain = "my.ops"
        model.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
        data = model.SerializeToString()
    body = {"model": base64.b64encode(data).decode(), "input_shape": list(shape)}
    if case == "fields":
        body = {"model": "!!", "input_shape": list(shape)}
    elif case == "fresh":
        body["fresh"] = "yes"
    r = _post(agent, "/measure", body)
    assert r.status_code == 400 and expect in r.json()["detail"]
    good, good_shape = _model()
    assert agent.client().measure(good, good_shape, QUICK).median_ms > 0


def test_request_over_size_limit(tmp_path):
    a = AgentProcess(tmp_path, max_mb=1).start()
    try:
        data, shape = _model(cout=512, cin=512)  # ~9.4 MB of weights
        body = {"model": base64.b64encode(data).decode(), "input_shape": list(shape)}
        assert _post(a, "/measure", body).status_code == 413
        with pytest.raises(EdgepruneError, match="over the agent's limit"):
            a.client().measure(data, shape, QUICK)
        small, small_shape = _model()
        assert a.client().measure(small, small_shape, QUICK).median_ms > 0
        # models measured in turn, many rounds: each is sent once, later rounds refer to it
        mid, mid_shape = _model(cout=128, cin=128)  # ~0.6 MB: 15 rounds of it would be 9 MB
        rounds = a.client().measure_many([(mid, mid_shape), (small, small_shape)] * 15, QUICK, fresh=True)
        assert len(rounds) == 30 and a.client().info()["measured"] == 31 and len({m.median_ms for m in rounds}) > 2
        for bad, why in (({"same_as": 1, "input_shape": list(small_shape)}, "index of an earlier item"),
                         ({"same_as": 0, "input_shape": [1, 4, 9, 9]}, "must have its input shape")):  # fmt: skip
            body = {"items": [{"model": base64.b64encode(small).decode(), "input_shape": list(small_shape)}, bad]}
            r = _post(a, "/jobs", body)
            assert r.status_code == 400 and why in r.json()["detail"], r.text
    finally:
        a.stop()


def test_version_mismatch(agent):
    r = httpx.get(f"{agent.url}/v1/info", headers={"Authorization": f"Bearer {agent.token}",
                                                    "X-Edgeprune-Version": "9.9.0"}, timeout=10)  # fmt: skip
    assert r.status_code == 409 and "incompatible" in r.json()["detail"]


def test_unreachable_agent():
    c = AgentClient(f"http://127.0.0.1:{_free_port()}", "t", retries=1)
    with pytest.raises(EdgepruneError, match="unreachable.*agent serve"):
        c.info()


def test_runtime_crash_returns_error_and_agent_keeps_serving(agent):
    c = agent.client()
    data, shape = _model(48)
    c.measure(*_model(8), QUICK)  # the worker is up
    job = c.submit([(data, shape)], SLOW)
    time.sleep(1.0)
    os.kill(c.info()["worker_pid"], signal.SIGKILL)  # the runtime dies mid-measurement
    deadline = time.time() + 30
    while (view := c.job(job))["status"] != "done" and time.time() < deadline:
        time.sleep(0.1)
    assert "crashed" in view["results"][0]["error"]
    assert c.measure(*_model(16), QUICK).median_ms > 0


def test_restarted_agent_answers_from_cache(tmp_path):
    a = AgentProcess(tmp_path).start()
    items = [_model(c_out) for c_out in (8, 16, 24)]
    try:
        first = a.client().measure_many(items, QUICK)
    finally:
        a.stop()
    a.start()
    try:
        again = a.client().measure_many(items, QUICK)
        assert [m.median_ms for m in again] == [m.median_ms for m in first]
        assert a.client().info()["measured"] == 0  # nothing was measured again
        # fresh (a comparison, a drift check): measured again, and through a Device and interleaved
        # rounds too, rather than the cached result repeated
        fresh = a.client().measure_many(items[:1], QUICK, fresh=True)
        assert a.client().info()["measured"] == 1 and fresh[0].median_ms > 0
        spec = {"name": "remote", "backend": "onnxruntime", "agent": a.url, "token_file": str(a.token_file)}
        (tmp_path / "remote.yaml").write_text(yaml.safe_dump(spec))
        path = tmp_path / "m.onnx"
        path.write_bytes(items[0][0])
        (m,) = measure_interleaved(
            Device.load(tmp_path / "remote.yaml"), [(path, items[0][1])], repeats=3, protocol=QUICK
        )
        assert a.client().info()["measured"] == 4 and len(set(m.extra["rounds_ms"])) >= 2  # not one result x3
    finally:
        a.stop()


def test_profile_through_agent_matches_local(agent, tmp_path):
    from edgeprune.latency.profiler import profile
    from edgeprune.models import build_model

    spec = {"name": "remote-cpu", "backend": "onnxruntime", "options": {"threads": 1}, "agent": agent.url,
            "token_file": str(agent.token_file), "channel_step": 32}  # fmt: skip
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(spec))
    remote = Device.load(tmp_path / "remote.yaml")
    local = Device.load("cpu-onnxruntime")
    model = build_model("resnet20", in_channels=1)
    kw = {"model": model, "model_id": "resnet20", "example_input": (1, 1, 28, 28), "step": 32, "calibrate": 0,
          "progress": False, "log": lambda s: None}  # fmt: skip
    t_remote = profile(device=remote, out=tmp_path / "remote.json", **kw)
    t_local = profile(device=local, out=tmp_path / "local.json", **kw)
    assert set(t_remote.entries) == set(t_local.entries)
    assert t_remote.fingerprint["runtime"] == t_local.fingerprint["runtime"] == "onnxruntime"
    ratios = sorted(t_remote.entries[k]["median_ms"] / t_local.entries[k]["median_ms"] for k in t_local.entries)
    assert 0.7 < ratios[len(ratios) // 2] < 1.4  # same device, same protocol: the same latencies within noise


def table_dense(model) -> list[int]:
    """The dense model's keep-counts in the space the check builds (step 32)."""
    import torch

    from edgeprune.pruning import space

    return space(model, torch.randn(1, 1, 28, 28), step=32).full_counts()


def test_measure_and_predict_check_through_the_agent(agent, tmp_path, cli_here):
    """`edgeprune measure` and `predict --check` (CLI and function) on a device reached through the
    agent: the same figures' shape as on this machine, measured there, each timing told apart."""
    from edgeprune.latency.check import check_predictor
    from edgeprune.latency.profiler import profile
    from edgeprune.models import build_model

    quick = {"warmup_runs": 2, "warmup_s": 0.01, "min_runs": 10, "min_s": 0.05, "max_cv": 10}
    spec = {"name": "remote-cpu", "backend": "onnxruntime", "agent": agent.url, "token_file": str(agent.token_file),
            "channel_step": 32, "protocol": quick}  # fmt: skip
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(spec))
    remote = Device.load(tmp_path / "remote.yaml")
    model = build_model("resnet20", in_channels=1)
    table = profile(model=model, model_id="resnet20", example_input=(1, 1, 28, 28), device=remote, step=32,
                    calibrate=2, out=tmp_path / "remote.json", progress=False, log=lambda s: None)  # fmt: skip
    assert table.fingerprint["timing"] == "native" and table.protocol["timing"] == "native"
    c = check_predictor(model=model, input_shape=(1, 1, 28, 28), table=table, device=remote, n=3, progress=False,
                        log=lambda s: None)  # fmt: skip
    assert c["device"] == "remote-cpu" and len(c["plans"]) == 3 and c["dense_ms"] > 0
    for row in c["plans"]:
        assert row["measured_ms"] > 0 and row["predicted_ms"] > 0 and row["flops_ms"] < c["dense_ms"]
        assert row["steady"]["quietest_ms"] == row["measured_ms"] and row["steady"]["windows"] >= 15
    # the anchor is the drift of the dense model since the profile measured it (its calibration point)
    from edgeprune.latency.table import calibration_key

    then = table.meta["calibration_points"][calibration_key(table_dense(model))]
    assert c["anchor"] == pytest.approx(c["dense_ms"] / then["measured_ms"], rel=1e-6)
    assert c["table"]["n"] == c["table_anchored"]["n"] == c["flops_baseline"]["n"] == 3
    within = sum(abs(r["predicted_ms"] * c["anchor"] / r["measured_ms"] - 1) <= 0.10 for r in c["plans"])
    assert c["table_anchored"]["within_10"] == pytest.approx(within / 3)
    r = cli_here("predict", "--model", "resnet20", "--table", tmp_path / "remote.json", "--check", "2", "--device",
                 tmp_path / "remote.yaml", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)["check"]
    assert check["device"] == "remote-cpu" and len(check["plans"]) == 2
    onnx_file = tmp_path / "conv.onnx"
    onnx_file.write_bytes(_model(16)[0])
    r = cli_here("measure", onnx_file, "--device", tmp_path / "remote.yaml", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["median_ms"] > 0 and m["protocol"]["timing"] == "native" and m["fingerprint"]["timing"] == "native"
    r = cli_here("measure", onnx_file, "--device", tmp_path / "remote.yaml")
    assert r.returncode == 0 and "(native timing)" in r.stdout, r.stderr
    # the agent times the way the protocol it is sent says, and refuses a timing it does not know
    assert agent.client().measure(_model(16)[0], _model(16)[1], replace(QUICK, timing="python-call")).median_ms > 0
    body = {"model": base64.b64encode(_model(16)[0]).decode(), "input_shape": list(_model(16)[1]),
            "protocol": {"timing": "wall"}}  # fmt: skip
    bad = _post(agent, "/measure", body)
    assert bad.status_code == 400 and "timing" in bad.json()["detail"]
