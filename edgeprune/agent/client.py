"""Client side of the agent: a remote device's `measure` / `measure_many`, with retries and time-outs."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from edgeprune import __version__
from edgeprune.agent.protocol import API, VERSION_HEADER
from edgeprune.devices.spec import DeviceSpec
from edgeprune.errors import EdgepruneError
from edgeprune.latency.measurement import Measurement, Protocol


def read_token(spec: DeviceSpec) -> str:
    if spec.token_env:
        token = os.environ.get(spec.token_env, "").strip()
        if token:
            return token
    if spec.token_file:
        path = Path(spec.token_file).expanduser()
        if path.is_file():
            return path.read_text().strip()
    where = " or ".join(filter(None, [spec.token_env and f"${spec.token_env}", spec.token_file]))
    raise EdgepruneError(
        f"no token for the agent of {spec.name}: put the token the agent printed in {where or 'token_env/token_file'}"
    )


class AgentClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 600.0, retries: int = 3, name: str = "agent"):
        self.url = url.rstrip("/")
        self.name = name
        self.timeout_s = timeout_s
        self.retries = retries
        self.http = httpx.Client(
            base_url=f"{self.url}/{API}",
            headers={"Authorization": f"Bearer {token}", VERSION_HEADER: __version__},
            timeout=httpx.Timeout(30.0, read=timeout_s + 60),
        )

    @classmethod
    def from_spec(cls, spec: DeviceSpec) -> AgentClient:
        return cls(spec.agent, read_token(spec), timeout_s=spec.timeout_s, name=spec.name)

    def _request(self, method: str, path: str, **kw) -> dict:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.RemoteProtocolError) as e:
                last = e
                time.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            except httpx.TimeoutException:
                raise EdgepruneError(
                    f"agent {self.url} did not answer within {self.timeout_s:.0f} s (device busy?)"
                ) from None
            if r.status_code in (502, 503) and attempt < self.retries:
                time.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            return self._check(r)
        raise EdgepruneError(
            f"agent {self.url} is unreachable ({type(last).__name__}); is `edgeprune agent serve` "
            "running there, and is the address in the device profile right?"
        )

    def _check(self, r: httpx.Response) -> dict:
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text[:200]}
        detail = body.get("detail", "") if isinstance(body, dict) else ""
        if r.status_code == 401:
            raise EdgepruneError(f"agent {self.url} refused the token: use the one it printed on first start")
        if r.status_code == 409:
            raise EdgepruneError(f"agent {self.url}: {detail}")
        if r.status_code == 413:
            raise EdgepruneError(f"agent {self.url} refused the request: {detail}")
        if r.status_code >= 400:
            raise EdgepruneError(f"agent {self.url} ({r.status_code}): {detail}")
        return body

    def info(self) -> dict:
        return self._request("GET", "/info")

    def measure(
        self, onnx_bytes: bytes, input_shape: Sequence[int], protocol: Protocol | None = None, *, fresh: bool = False
    ) -> Measurement:
        """One measurement; the agent answers from its cache unless `fresh`."""
        body = {
            "model": base64.b64encode(onnx_bytes).decode(),
            "input_shape": list(input_shape),
            "protocol": protocol.to_dict() if protocol else None,
            "fresh": fresh,
        }
        return Measurement.from_dict(self._request("POST", "/measure", json=body)["measurement"])

    def submit(
        self, items: Sequence[tuple[bytes, Sequence[int]]], protocol: Protocol | None = None, *, fresh: bool = False
    ) -> str:
        sent: dict[bytes, int] = {}  # a model already in this request is referred to, not sent again
        wire = []
        for i, (b, s) in enumerate(items):
            if b in sent:
                wire.append({"same_as": sent[b], "input_shape": list(s)})
            else:
                sent[b] = i
                wire.append({"model": base64.b64encode(b).decode(), "input_shape": list(s)})
        body = {
            "items": wire,
            "protocol": protocol.to_dict() if protocol else None,
            "fresh": fresh,
        }
        return self._request("POST", "/jobs", json=body)["job"]

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/jobs/{job_id}")

    def measure_many(
        self,
        items: Sequence[tuple[bytes, Sequence[int]]],
        protocol: Protocol | None = None,
        *,
        on_result: Callable[[int, Measurement], None] | None = None,
        poll_s: float = 0.2,
        fresh: bool = False,
    ) -> list[Measurement]:
        """Measure several models as one job; cached results are reused unless `fresh`."""
        job_id = self.submit(items, protocol, fresh=fresh)
        reported: set[int] = set()
        deadline = time.monotonic() + self.timeout_s * max(1, len(items))
        while True:
            view = self.job(job_id)
            for i, r in enumerate(view["results"]):
                if r is not None and i not in reported:
                    if "error" in r:
                        raise EdgepruneError(f"agent {self.url}: item {i} failed: {r['error']}")
                    reported.add(i)
                    if on_result:
                        on_result(i, Measurement.from_dict(r["measurement"]))
            if view["status"] == "done":
                return [Measurement.from_dict(r["measurement"]) for r in view["results"]]
            if time.monotonic() > deadline:
                raise EdgepruneError(
                    f"agent {self.url}: job {job_id} still not done after {self.timeout_s:.0f} s per item"
                )
            time.sleep(poll_s)
