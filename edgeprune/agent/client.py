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


class Resend(Exception):
    """The agent dropped its damaged copy of a model; sending it again is right."""


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never reached the agent
# a POST that failed after it was sent may have been queued: retrying it could measure twice
RETRYABLE = {"GET": NOT_SENT + (httpx.ReadError, httpx.RemoteProtocolError), "POST": NOT_SENT}


def _tls_problem(e: Exception) -> str | None:
    text = str(e)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            "its TLS certificate is not trusted: set tls_ca or tls_fingerprint in the device profile "
            "(devices/README.md, TLS)"
        )
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return "it does not speak TLS there: use its http:// URL, or serve it with --tls-cert/--tls-key"
    return None


class AgentClient:
    """Talks to one agent. Over https it trusts the agent as the device profile says (`tls_ca`, or
    `tls_fingerprint`, checked before the token is ever sent), else as the system's CAs do."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 600.0,
        retries: int = 3,
        name: str = "agent",
        tls_ca: str | None = None,
        tls_fingerprint: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.name = name
        self.timeout_s = timeout_s
        self.retries = retries
        self.token = token
        self.tls_ca, self.tls_fingerprint = tls_ca, tls_fingerprint
        self._http: httpx.Client | None = None
        self._max_items: int | None = None

    @classmethod
    def from_spec(cls, spec: DeviceSpec) -> AgentClient:
        return cls(spec.agent, read_token(spec), timeout_s=spec.timeout_s, name=spec.name, tls_ca=spec.tls_ca,
                   tls_fingerprint=spec.tls_fingerprint)  # fmt: skip

    @property
    def http(self) -> httpx.Client:
        """Made on first use: a pinned certificate is fetched and compared before any request."""
        if self._http is None:
            from edgeprune.agent.tls import client_verify

            verify = client_verify(self.url, ca=self.tls_ca, fingerprint=self.tls_fingerprint)
            self._http = httpx.Client(
                base_url=f"{self.url}/{API}",
                headers={"Authorization": f"Bearer {self.token}", VERSION_HEADER: __version__},
                timeout=httpx.Timeout(30.0, read=self.timeout_s + 60),
                verify=verify,
            )
        return self._http

    def _request(self, method: str, path: str, **kw) -> dict:
        last: Exception | None = None
        retry_on, busy = RETRYABLE.get(method, RETRYABLE["GET"]), (503,) if method == "POST" else (502, 503)
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if problem := _tls_problem(e):
                    raise EdgepruneError(f"agent {self.url}: {problem}") from None
                if isinstance(e, retry_on):
                    last = e
                    time.sleep(min(2.0, 0.2 * 2**attempt))
                    continue
                if isinstance(e, httpx.TimeoutException):
                    raise EdgepruneError(
                        f"agent {self.url} did not answer within {self.timeout_s:.0f} s (device busy?)"
                    ) from None
                raise EdgepruneError(
                    f"agent {self.url} dropped the connection after the request was sent ({type(e).__name__}); "
                    "it may have been queued there, so it is not sent again: run the command again"
                ) from None
            if r.status_code in busy and attempt < self.retries:  # 503: nothing was queued, so retrying is right
                time.sleep(min(10.0, float(r.headers.get("retry-after") or 0.2 * 2**attempt)))
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
        if r.status_code == 422 and body.get("resend"):
            raise Resend(detail)
        if r.status_code in (409, 413, 429):
            raise EdgepruneError(f"agent {self.url} refused the request: {detail}")
        if r.status_code >= 400:
            raise EdgepruneError(f"agent {self.url} ({r.status_code}): {detail}")
        return body

    def info(self) -> dict:
        return self._request("GET", "/info")

    def max_items(self) -> int:
        """How many models the agent takes in one request (asked once)."""
        if self._max_items is None:
            self._max_items = int(self.info().get("limits", {}).get("max_items", 1000))
        return self._max_items

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
        try:
            answer = self._request("POST", "/measure", json=body)
        except Resend:
            try:
                answer = self._request("POST", "/measure", json=body)
            except Resend as e:
                raise EdgepruneError(f"agent {self.url}: {e} (twice: check the agent's disk)") from None
        return Measurement.from_dict(answer["measurement"])

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

    def cancel(self, job_id: str) -> dict:
        """Stop a job: its waiting items are dropped and a measurement in progress is stopped."""
        return self._request("DELETE", f"/jobs/{job_id}")

    def measure_many(
        self,
        items: Sequence[tuple[bytes, Sequence[int]]],
        protocol: Protocol | None = None,
        *,
        on_result: Callable[[int, Measurement], None] | None = None,
        poll_s: float = 0.2,
        fresh: bool = False,
    ) -> list[Measurement]:
        """Measure several models as jobs of at most the agent's `max_items`; cached results are
        reused unless `fresh`. A model whose copy on the agent was damaged is sent once more."""
        results: list[Measurement | None] = [None] * len(items)
        todo, resent = list(range(len(items))), False
        while todo:
            chunk, again = self.max_items(), []
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                again += self._run_job(items, batch, protocol, fresh, results, on_result, poll_s)
            if again and resent:
                raise EdgepruneError(
                    f"agent {self.url}: models {again} were damaged on the agent twice; check its disk"
                )
            todo, resent = again, True
        return results

    def _run_job(self, items, batch, protocol, fresh, results, on_result, poll_s) -> list[int]:
        """One job of `batch` (indices into `items`), followed to its end; the indices to send again.
        Interrupted (Ctrl-C, an error), the job is cancelled on the agent: nobody would read it."""
        job_id = self.submit([items[i] for i in batch], protocol, fresh=fresh)
        deadline = time.monotonic() + self.timeout_s * max(1, len(batch))
        again: list[int] = []
        try:
            while True:
                view = self.job(job_id)
                for k, r in enumerate(view["results"]):
                    i = batch[k]
                    if r is None or results[i] is not None or i in again:
                        continue
                    if r.get("resend"):
                        again.append(i)
                    elif "error" in r:
                        raise EdgepruneError(f"agent {self.url}: item {i} failed: {r['error']}")
                    else:
                        results[i] = Measurement.from_dict(r["measurement"])
                        if on_result:
                            on_result(i, results[i])
                if view["status"] in ("done", "cancelled"):
                    return again
                if time.monotonic() > deadline:
                    raise EdgepruneError(
                        f"agent {self.url}: job {job_id} still not done after {self.timeout_s:.0f} s per item"
                    )
                time.sleep(poll_s)
        except BaseException:
            self._cancel_quietly(job_id)
            raise

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.http.delete(f"/jobs/{job_id}", timeout=5)
        except httpx.HTTPError:
            pass
