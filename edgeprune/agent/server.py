"""`edgeprune agent serve`: measure ONNX models on this device for remote edgeprune clients.

Jobs are measured one at a time (the device is exclusive) by a worker process. Every result is
cached on disk by (model hash, input shape, protocol, fingerprint): a restarted agent answers
repeated requests without re-measuring, and nothing measured is lost. Requests need a bearer
token, are bounded (`Limits`), and may only carry self-contained, standard-op ONNX models;
nothing received is written outside the cache folder or executed except by the inference runtime.
Parsing and vetting a model runs off the event loop, so health checks and polls stay quick while
a large model arrives.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from edgeprune import __version__
from edgeprune.agent import wire
from edgeprune.agent.cache import AgentCache
from edgeprune.agent.guard import AuthGuard
from edgeprune.agent.jobs import CANCELLED, DONE, QUEUED, QueueFull
from edgeprune.agent.limits import Limits, from_options
from edgeprune.agent.protocol import API, VERSION_HEADER, compatible
from edgeprune.agent.service import Agent
from edgeprune.agent.token import load_or_create_token
from edgeprune.agent.vetting import Vetter, VettingPool
from edgeprune.devices.spec import DeviceSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACEFUL_STOP_S = 3.0
log = logging.getLogger("edgeprune.agent")


def _busy(message: str) -> HTTPException:
    return HTTPException(503, message, headers={"Retry-After": "2"})


def _guard(guard: AuthGuard, max_bytes: int):
    """The check in front of every endpoint but health: back-off, token, version, declared size.
    A dependency rather than a middleware: the endpoints then see the client's own connection
    (a middleware's copy never reports that the client left)."""

    async def guarded(request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        wait = guard.wait_s(client)
        if wait > 0:
            raise HTTPException(429, f"too many failed token attempts from {client}; wait {wait:.0f} s",
                                headers={"Retry-After": str(int(wait) + 1)})  # fmt: skip
        if not guard.check(client, request.headers.get("authorization", "")):
            raise HTTPException(401, "missing or wrong bearer token")
        version = request.headers.get(VERSION_HEADER)
        if version and not compatible(version):
            raise HTTPException(
                409,
                f"client edgeprune {version} and agent {__version__} are incompatible; "
                "install the same version on both",
            )
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise HTTPException(400, "bad Content-Length header", headers={"Connection": "close"})
        if length is not None and int(length) > max_bytes:
            raise HTTPException(413, wire.too_large(int(length), max_bytes), headers={"Connection": "close"})

    return guarded


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes `max_bytes`: a body without a Content-Length
    (chunked) cannot grow past the limit in memory either."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > max_bytes:
                raise wire.BadRequest(413, wire.too_large(len(body) + len(chunk), max_bytes))
            body += chunk
    except ClientDisconnect:
        raise wire.BadRequest(400, "the client left before its request was read") from None
    return bytes(body)


class Uploads:
    """At most `limit` requests read and vetted at once: each holds its body in memory, and they
    all wait for the one vetting process. The next ones wait their turn before their body is read
    (it stays with the client meanwhile); one that waits `wait_s` is refused (503: nothing was queued)."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit, self.wait_s = limit, wait_s
        self.free = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def slot(self):
        try:
            await asyncio.wait_for(self.free.acquire(), self.wait_s)
        except TimeoutError:
            raise _busy(f"{self.limit} requests were being received and vetted (the limit) for {self.wait_s:.0f} s; "
                        "nothing was queued") from None  # fmt: skip
        try:
            yield
        finally:
            self.free.release()


async def _wait(agent: Agent, job, request: Request) -> None:
    """Until `job` ends. One that has not started within the job limit is cancelled and refused
    (503: nothing stays queued, so the client's retry is right); one whose client left is cancelled."""
    start_by = time.monotonic() + agent.limits.job_timeout_s
    checked = 0.0
    while job.status not in (DONE, CANCELLED):
        now = time.monotonic()
        if job.status == QUEUED and now > start_by and agent.cancel(job, only_queued=True) == QUEUED:
            raise _busy(f"device busy: the measurement did not start within {agent.limits.job_timeout_s:.0f} s; "
                        "nothing was queued, retry later")  # fmt: skip
        if now - checked > 0.5:
            checked = now
            if await request.is_disconnected():
                agent.cancel(job)
                raise HTTPException(499, "client gone")
        await asyncio.sleep(0.02)


def create_app(spec: DeviceSpec, *, token: str, cache: Path, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    agent = Agent(spec, AgentCache(cache), limits)
    vetting = VettingPool(Vetter(cache, agent.fingerprint, spec.protocol.to_dict(), limits.max_items,
                                 limits.max_input_elements))  # fmt: skip
    uploads = Uploads(limits.max_uploads, wait_s=limits.job_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        vetting.stop()
        agent.worker.stop()

    app = FastAPI(title="edgeprune agent", version=__version__, lifespan=lifespan)
    app.state.agent = agent
    router = APIRouter(prefix=f"/{API}", dependencies=[Depends(_guard(AuthGuard(token), limits.max_bytes))])

    @app.exception_handler(wire.BadRequest)
    async def refused(request: Request, e: wire.BadRequest):
        close = {"Connection": "close"} if e.status == 413 else None  # rather than read the rest of the body
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=close)

    @app.get(f"/{API}/health")
    def health() -> dict:
        return {"status": "ok", "agent_version": __version__}

    @router.get("/info")
    def info() -> dict:
        return agent.info()

    async def accept(request: Request, what: str):
        """A request's models read, vetted (`Vetter.one` or `.many`) and queued as one job (503
        where the queue is full: nothing was queued)."""
        async with uploads.slot():
            items, protocol, fresh = await vetting.run(what, await read_body(request, limits.max_bytes))
        try:
            return agent.submit(items if what == "many" else [items], protocol, fresh=fresh)
        except QueueFull as e:
            raise _busy(str(e)) from None

    @router.post("/measure")
    async def measure(request: Request):
        job = await accept(request, "one")
        await _wait(agent, job, request)
        result = job.results[0]
        if result.get("resend"):  # the copy was damaged after it was stored: the client sends it again
            return JSONResponse({"detail": result["error"], "resend": True}, status_code=422)
        if "error" in result:
            raise HTTPException(422, result["error"])
        return {"job": job.id, **result}

    @router.post("/jobs", status_code=202)
    async def submit(request: Request):
        job = await accept(request, "many")
        return {"job": job.id, "total": len(job.items), "status": job.status}

    def find(job_id: str):
        job = agent.board.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for {limits.keep_s:.0f} s, "
                                     f"the last {limits.keep_jobs})")  # fmt: skip
        return job

    @router.get("/jobs/{job_id}")
    def job_result(job_id: str):
        return find(job_id).view()

    @router.delete("/jobs/{job_id}")
    def cancel(job_id: str):
        job = find(job_id)
        before = agent.cancel(job)
        return {**job.view(), "was": before}

    app.include_router(router)
    return app


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s agent: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def serve(
    *,
    device: str,
    host: str = "127.0.0.1",
    port: int = 8470,
    token_file: str | None = None,
    cache: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log=print,
    **limits,
) -> None:
    """Run the agent until interrupted. `limits`: `from_options`' keywords (max_mb, job_timeout, ...)."""
    import uvicorn

    from edgeprune.agent.tls import certificate_fingerprint, server_context, shown
    from edgeprune.checks import Rule, check_values
    from edgeprune.errors import EdgepruneError

    check_values({"port": port}, {"port": Rule(int, lo=1, hi=65535)}, where="agent serve")
    bounds = from_options(**limits)
    if bool(tls_cert) != bool(tls_key):
        raise EdgepruneError("TLS needs both --tls-cert and --tls-key")
    if tls_cert:
        server_context(tls_cert, tls_key)  # a bad pair is one line now, not a traceback from uvicorn
    spec = DeviceSpec.load(device)
    cache_dir = Path(cache or Path.home() / ".cache" / "edgeprune" / "agent" / spec.name).expanduser()
    token_path = Path(token_file).expanduser() if token_file else cache_dir / "token"
    token, created = load_or_create_token(token_path)
    app = create_app(spec, token=token, cache=cache_dir, limits=bounds)
    _log_to_stderr()
    if created and sys.stdout.isatty():
        log(f"new agent token (shown once, stored owner-only in {token_path}): {token}")
    elif created:  # a log (journald, a file) would keep it: only where to find it
        log(f"new agent token stored owner-only in {token_path} (not printed: the output is not a terminal)")
    else:
        log(f"agent token: in {token_path}")
    scheme = "https" if tls_cert else "http"
    if tls_cert:
        log(f"TLS certificate SHA-256 (pin it as tls_fingerprint in the device profile): "
            f"{shown(certificate_fingerprint(tls_cert))}")  # fmt: skip
    if host not in LOOPBACK:
        log(f"listening on {host}: reachable from other machines; keep the token secret")
        if not tls_cert:
            log(f"WARNING: no TLS: the token and every model cross the network in cleartext to {host}:{port}; "
                "serve with --tls-cert/--tls-key (devices/README.md, 'TLS')")  # fmt: skip
    removed = app.state.agent.cache.removed_tmp
    if removed:
        log(f"removed {removed} half-written cache file(s) left by an earlier agent")
    log(
        f"edgeprune agent {__version__} for {spec.name} ({spec.backend}) on {scheme}://{host}:{port}, cache {cache_dir}"
    )
    # a bounded graceful stop: an idle TLS client that never answers the close would hold it ~30 s
    uvicorn.run(app, host=host, port=port, log_level="warning", ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                timeout_graceful_shutdown=GRACEFUL_STOP_S, limit_concurrency=bounds.max_connections)  # fmt: skip
