"""The agent's doors, for real: TLS with a self-signed certificate on loopback (pinned, by CA,
refused), the token file's checks, failed attempts logged and backed off, and external-data
references refused alike whatever file they name."""

import base64
import os
import subprocess
import sys
import time

import httpx
import onnx
import pytest
import yaml

from edgeprune.agent.client import AgentClient
from edgeprune.agent.tls import certificate_fingerprint, shown
from edgeprune.agent.token import MIN_CHARS, load_or_create_token
from edgeprune.agent.validation import Rejected, check_model
from edgeprune.devices.spec import DeviceSpec
from edgeprune.errors import EdgepruneError

from .conftest import ROOT
from .test_agent import QUICK, AgentProcess, _model, _post


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made the way devices/README.md says."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-keyout", str(d / "agent.key"), "-out", str(d / "agent.crt"), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "agent.crt", d / "agent.key"


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory, certificate):
    a = AgentProcess(tmp_path_factory.mktemp("tls-agent"), tls=certificate).start()
    yield a
    a.stop()


def test_tls_with_a_self_signed_certificate(tls_agent, certificate, tmp_path):
    cert, _ = certificate
    pin = certificate_fingerprint(cert)
    data, shape = _model()
    pinned = AgentClient(tls_agent.url, tls_agent.token, tls_fingerprint=shown(pin), timeout_s=60)
    assert pinned.measure(data, shape, QUICK).median_ms > 0
    assert (
        AgentClient(tls_agent.url, tls_agent.token, tls_ca=str(cert), timeout_s=60).info()["backend"] == "onnxruntime"
    )
    # through a device profile, as a user sets it up
    spec = {"name": "remote-tls", "backend": "onnxruntime", "agent": tls_agent.url,
            "token_file": str(tls_agent.token_file), "tls_fingerprint": pin}  # fmt: skip
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(spec))
    assert AgentClient.from_spec(DeviceSpec.load(tmp_path / "remote.yaml")).measure(data, shape, QUICK).median_ms > 0

    with pytest.raises(EdgepruneError, match="not the .* pinned in the device profile"):
        AgentClient(tls_agent.url, tls_agent.token, tls_fingerprint="ab" * 32).info()
    with pytest.raises(EdgepruneError, match="TLS certificate is not trusted: set tls_ca or tls_fingerprint"):
        AgentClient(tls_agent.url, tls_agent.token).info()  # the system's CAs do not know it
    with pytest.raises(EdgepruneError, match="need an https:// agent URL"):
        AgentClient(tls_agent.url.replace("https", "http"), tls_agent.token, tls_ca=str(cert)).info()
    with pytest.raises(EdgepruneError, match="tls_fingerprint must be a SHA-256"):
        DeviceSpec.from_dict({**spec, "tls_fingerprint": "12:34"})


def test_tls_agent_prints_its_fingerprint_and_warns_without_tls_off_loopback(certificate, tmp_path):
    tls = AgentProcess(tmp_path / "tls", tls=certificate).start()
    AgentClient(tls.url, tls.token, tls_ca=str(certificate[0])).info()  # an idle TLS client holds no stop
    t0 = time.time()
    output = tls.stop()
    assert shown(certificate_fingerprint(certificate[0])) in output, output
    assert time.time() - t0 < 12
    plain = AgentProcess(tmp_path / "plain", extra=("--host", "0.0.0.0")).start()
    assert "WARNING: no TLS: the token and every model cross the network in cleartext" in plain.stop()


def test_the_token_is_not_printed_where_the_output_is_not_a_terminal(tmp_path):
    a = AgentProcess(tmp_path).start()
    output = a.stop()
    assert "not printed: the output is not a terminal" in output and a.token not in output
    assert oct(os.stat(a.token_file).st_mode & 0o777) == "0o600" and len(a.token) >= MIN_CHARS


def test_weak_or_exposed_token_files_are_refused(tmp_path):
    token, created = load_or_create_token(tmp_path / "new" / "token")
    assert created and len(token) >= MIN_CHARS and load_or_create_token(tmp_path / "new" / "token") == (token, False)
    exposed = tmp_path / "exposed"
    exposed.write_text("x" * 40)
    exposed.chmod(0o644)
    short = tmp_path / "short"
    short.write_text("secret")
    short.chmod(0o600)
    for path, why in ((exposed, r"readable by other users \(mode 0644\); run `chmod 600"),
                      (short, "has 6 characters, under the 32"), (tmp_path, "is a folder")):  # fmt: skip
        with pytest.raises(EdgepruneError, match=why):
            load_or_create_token(path)
    r = subprocess.run(
        [sys.executable, "-m", "edgeprune", "agent", "serve", "--device", "cpu-onnxruntime", "--port", "1",
         "--token-file", str(exposed)], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: token file") and "Traceback" not in r.stderr + r.stdout


def test_failed_attempts_are_logged_and_backed_off(tmp_path):
    a = AgentProcess(tmp_path).start()
    try:
        guesses = [_post(a, "/jobs", {}, token=f"guess-{i}") for i in range(5)]
        assert [r.status_code for r in guesses] == [401] * 5
        blocked = _post(a, "/jobs", {})  # the right token, but the address is waiting
        assert blocked.status_code == 429 and "too many failed token attempts" in blocked.json()["detail"]
        assert int(blocked.headers["retry-after"]) >= 1
        time.sleep(1.2)
        assert a.client().info()["measured"] == 0  # after the wait, the right token goes through
        assert httpx.get(f"{a.url}/v1/health", timeout=10).status_code == 200  # never behind the token
    finally:
        output = a.stop()
    assert "refused 127.0.0.1: wrong token (5 failed attempts in a row)" in output
    assert "guess-" not in output  # what was sent is never logged


def test_external_data_is_refused_alike_whatever_file_it_names(tls_agent, tmp_path):
    answers = set()
    for location in ("/etc/hostname", "/nonexistent/weights.bin", "token"):
        model = onnx.load_from_string(_model()[0])
        const = onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [0.0])
        const.data_location = onnx.TensorProto.EXTERNAL
        const.ClearField("float_data")
        const.external_data.add(key="location", value=location)
        model.graph.node.append(onnx.helper.make_node("Constant", [], ["c_out"], value_floats=[0.0]))
        model.graph.node[-1].attribute[0].tensors.append(const)  # in an attribute's tensor list
        body = {"model": base64.b64encode(model.SerializeToString()).decode(), "input_shape": [1, 4, 8, 8]}
        r = httpx.post(f"{tls_agent.url}/v1/measure", json=body, verify=False, timeout=30,
                       headers={"Authorization": f"Bearer {tls_agent.token}"})  # fmt: skip
        assert r.status_code == 400
        answers.add(r.json()["detail"])
    assert answers == {"the model references external data; send a self-contained model"}
    model = onnx.load_from_string(_model()[0])  # in a training graph, which no runtime reads: refused too
    model.training_info.add().initialization.initializer.append(const)
    with pytest.raises(Rejected, match="references external data"):
        check_model(model.SerializeToString(), [1, 4, 8, 8])
