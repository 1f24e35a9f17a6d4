"""`edgeprune agent serve`: measure ONNX models on this device for remote edgeprune clients.

Jobs are measured one at a time (the device is exclusive) by a worker process. Every result is
cached on disk by (model hash, input shape, protocol, fingerprint): a restarted agent answers
repeated requests without re-measuring, and nothing measured is lost. Requests need a bearer
token, have a size limit, and may only carry self-contained, standard-op ONNX models; nothing
received is written outside the cache folder or executed except by the inference runtime.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import queue
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from edgeprune import __version__
from edgeprune.agent.protocol import API, VERSION_HEADER, compatible
from edgeprune.agent.validation import Rejected, check_model
from edgeprune.backends.worker import JobTimeout, Worker, WorkerDied
from edgeprune.devices.spec import DeviceSpec
from edgeprune.latency.measurement import Protocol
from edgeprune.runs import write_text

DEFAULT_MAX_MB = 64


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The agent's token from `path`, created (owner-only) on first start; (token, created)."""
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token, True


@dataclass
class Job:
    id: str
    items: list[dict]  # {"hash", "input_shape", "key"}
    protocol: dict
    fresh: bool = False  # measure again even where a result is cached (a comparison, a drift check)
    status: str = "queued"  # queued, running, done
    results: list[dict | None] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def view(self) -> dict:
        done = sum(r is not None for r in self.results)
        return {"job": self.id, "status": self.status, "done": done, "total": len(self.items), "results": self.results}


class Agent:
    """State of one agent: cache, job queue, worker."""

    def __init__(self, spec: DeviceSpec, cache: Path, *, job_timeout_s: float = 300.0, keep_jobs: int = 500):
        self.spec = spec
        self.cache = cache
        (cache / "models").mkdir(parents=True, exist_ok=True)
        (cache / "results").mkdir(parents=True, exist_ok=True)
        self.job_timeout_s = job_timeout_s
        self.keep_jobs = keep_jobs
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[Job] = queue.Queue()
        self.pending = 0
        self.lock = threading.Lock()
        self.worker = Worker(spec.to_dict())
        self.fingerprint = spec.make_backend().fingerprint()
        self.measured = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def result_key(self, model_hash: str, shape: list[int], protocol: dict) -> str:
        blob = json.dumps([model_hash, list(shape), protocol, self.fingerprint], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def cached(self, key: str) -> dict | None:
        path = self.cache / "results" / f"{key}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
        return None

    def submit(self, items: list[dict], protocol: dict, *, fresh: bool = False) -> Job:
        job = Job(uuid.uuid4().hex, items, protocol, fresh=fresh, results=[None] * len(items))
        for i, item in enumerate(items):
            hit = None if fresh else self.cached(item["key"])
            if hit is not None:
                job.results[i] = {**hit, "cached": True}
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep_jobs:
                self.jobs.pop(next(iter(self.jobs)))
            todo = sum(r is None for r in job.results)
            self.pending += todo
        if todo:
            self.queue.put(job)
        else:
            job.status = "done"
        return job

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            job.status = "running"
            for i, item in enumerate(job.items):
                if job.results[i] is not None:
                    continue
                hit = None if job.fresh else self.cached(item["key"])  # an earlier job may have measured it
                if hit is None:
                    path = str(self.cache / "models" / f"{item['hash']}.onnx")
                    try:
                        status, payload = self.worker.run(path, item["input_shape"], job.protocol, self.job_timeout_s)
                    except (WorkerDied, JobTimeout) as e:
                        status, payload = "error", str(e)
                    if status == "ok":
                        result = {
                            "measurement": payload,
                            "fingerprint": self.fingerprint,
                            "protocol": job.protocol,
                            "measured_at": time.time(),
                        }
                        write_text(self.cache / "results" / f"{item['key']}.json", json.dumps(result))
                        self.measured += 1
                        hit = {**result, "cached": False}
                    else:
                        hit = {"error": payload}
                else:
                    hit = {**hit, "cached": True}
                job.results[i] = hit
                with self.lock:
                    self.pending -= 1
            job.status = "done"

    def info(self) -> dict:
        return {
            "agent_version": __version__,
            "api": API,
            "device": self.spec.name,
            "backend": self.spec.backend,
            "fingerprint": self.fingerprint,
            "queue_length": self.pending,
            "measured": self.measured,
            "worker_pid": self.worker.pid,
            "protocol": self.spec.protocol.to_dict(),
        }


def create_app(
    spec: DeviceSpec, *, token: str, cache: Path, max_bytes: int = DEFAULT_MAX_MB << 20, job_timeout_s: float = 300.0
) -> FastAPI:
    agent = Agent(spec, cache, job_timeout_s=job_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        agent.worker.stop()

    app = FastAPI(title="edgeprune agent", version=__version__, lifespan=lifespan)
    app.state.agent = agent

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path == f"/{API}/health":
            return await call_next(request)
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        client = request.headers.get(VERSION_HEADER)
        if client and not compatible(client):
            return JSONResponse(
                {
                    "detail": f"client edgeprune {client} and agent {__version__} are incompatible; "
                    "install the same version on both"
                },
                status_code=409,
            )
        length = request.headers.get("content-length")
        if length and int(length) > max_bytes:
            return JSONResponse(
                {"detail": f"request of {int(length)} bytes is over the agent's limit of {max_bytes}"}, status_code=413
            )
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        body = await request.body()
        if len(body) > max_bytes:
            raise HTTPException(413, f"request of {len(body)} bytes is over the agent's limit of {max_bytes}")
        try:
            data = json.loads(body)
        except ValueError:
            raise HTTPException(400, "request body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "request body must be a JSON object")
        return data

    def prepare(item: dict, protocol: dict) -> dict:
        try:
            data = base64.b64decode(item["model"], validate=True)
            shape = [int(v) for v in item["input_shape"]]
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise HTTPException(
                400, "each item needs 'model' (base64 ONNX bytes) and 'input_shape' (integers)"
            ) from None
        try:
            check_model(data, shape)
        except Rejected as e:
            raise HTTPException(400, str(e)) from None
        digest = hashlib.sha256(data).hexdigest()
        path = cache / "models" / f"{digest}.onnx"
        if not path.exists():
            tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return {"hash": digest, "input_shape": shape, "key": agent.result_key(digest, shape, protocol)}

    def parse_fresh(data: dict) -> bool:
        fresh = data.get("fresh", False)
        if not isinstance(fresh, bool):
            raise HTTPException(400, "'fresh' must be true or false")
        return fresh

    def parse_protocol(data: dict) -> dict:
        try:
            return Protocol.from_dict(data.get("protocol") or spec.protocol.to_dict()).to_dict()
        except Exception as e:
            raise HTTPException(400, f"bad protocol: {e}") from None

    @app.get(f"/{API}/health")
    def health() -> dict:
        return {"status": "ok", "agent_version": __version__}

    @app.get(f"/{API}/info")
    def info() -> dict:
        return agent.info()

    @app.post(f"/{API}/measure")
    async def measure(request: Request):
        data = await read_json(request)
        protocol = parse_protocol(data)
        job = agent.submit([prepare(data, protocol)], protocol, fresh=parse_fresh(data))
        deadline = time.monotonic() + agent.job_timeout_s + 30
        while job.status != "done" and time.monotonic() < deadline:
            await _sleep(0.005)
        result = job.results[0]
        if result is None:
            raise HTTPException(503, f"device busy: the measurement did not start within {agent.job_timeout_s:.0f} s")
        if "error" in result:
            raise HTTPException(422, result["error"])
        return {"job": job.id, **result}

    @app.post(f"/{API}/jobs", status_code=202)
    async def submit(request: Request):
        data = await read_json(request)
        protocol = parse_protocol(data)
        items = data.get("items")
        if not isinstance(items, list) or not items:
            raise HTTPException(
                400, "'items' must be a non-empty list of {model, input_shape} (or {same_as, input_shape})"
            )
        prepared: list[dict] = []
        for item in items:  # models measured in turn come once, later items refer to them
            if isinstance(item, dict) and "same_as" in item:
                j = item["same_as"]
                if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < len(prepared):
                    raise HTTPException(400, f"'same_as' must be the index of an earlier item, got {j!r}")
                try:
                    shape = [int(v) for v in item["input_shape"]]
                except (KeyError, TypeError, ValueError):
                    raise HTTPException(400, "each item needs 'input_shape' (integers)") from None
                if shape != prepared[j]["input_shape"]:
                    raise HTTPException(
                        400, f"an item 'same_as' {j} must have its input shape {prepared[j]['input_shape']}"
                    )
                prepared.append(prepared[j])
            else:
                prepared.append(prepare(item, protocol))
        job = agent.submit(prepared, protocol, fresh=parse_fresh(data))
        return {"job": job.id, "total": len(items), "status": job.status}

    @app.get(f"/{API}/jobs/{{job_id}}")
    def job_result(job_id: str):
        job = agent.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for the last {agent.keep_jobs})")
        return job.view()

    return app


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def serve(
    *,
    device: str,
    host: str = "127.0.0.1",
    port: int = 8470,
    token_file: str | None = None,
    cache: str | None = None,
    max_mb: int = DEFAULT_MAX_MB,
    job_timeout_s: float = 300.0,
    log=print,
) -> None:
    """Run the agent until interrupted."""
    import uvicorn

    from edgeprune.checks import POSITIVE, Rule, check_values

    checks = {"port": Rule(int, lo=1, hi=65535), "max_mb": POSITIVE, "job_timeout": Rule(float, lo=0, lo_open=True)}
    check_values({"port": port, "max_mb": max_mb, "job_timeout": job_timeout_s}, checks, where="agent serve")
    spec = DeviceSpec.load(device)
    cache_dir = Path(cache or Path.home() / ".cache" / "edgeprune" / "agent" / spec.name).expanduser()
    token_path = Path(token_file).expanduser() if token_file else cache_dir / "token"
    token, created = load_or_create_token(token_path)
    app = create_app(spec, token=token, cache=cache_dir, max_bytes=max_mb << 20, job_timeout_s=job_timeout_s)
    if created:
        log(f"new agent token (shown once, stored owner-only in {token_path}): {token}")
    else:
        log(f"agent token: in {token_path}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"listening on {host}: reachable from other machines; keep the token secret")
    log(f"edgeprune agent {__version__} for {spec.name} ({spec.backend}) on http://{host}:{port}, cache {cache_dir}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
