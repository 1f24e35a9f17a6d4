"""The agent's bounds, for real: a streaming body over the limit, caps on items, queue and input
size, cancelling, jobs never evicted while they run, and strict parsing (one agent on loopback)."""

import base64
import json
import socket
import threading
import time

import httpx
import onnx
import psutil
import pytest

from edgeprune.agent.jobs import Job, JobBoard
from edgeprune.errors import EdgepruneError
from edgeprune.latency.measurement import Protocol

from .test_agent import QUICK, SLOW, AgentProcess, _model, _post

LIMITS = ("--max-items", "5", "--max-queued", "6", "--keep-jobs", "3", "--max-input-elements", "100000",
          "--max-uploads", "1")  # fmt: skip


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("limited"), max_mb=1, extra=LIMITS).start()
    yield a
    a.stop()


def _wait_status(client, job_id, status, timeout=30):
    deadline = time.time() + timeout
    while (view := client.job(job_id))["status"] != status and time.time() < deadline:
        time.sleep(0.05)
    return view


def _slow_job(client, n=1):
    """A job that holds the worker until cancelled: n distinct models, each 30 s."""
    job = client.submit([_model(100 + i) for i in range(n)], SLOW)
    _wait_status(client, job, "running")
    return job


def test_chunked_body_over_the_limit_is_refused_while_it_streams(agent):
    rss = psutil.Process(agent.proc.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", agent.port)) as s:
        s.sendall(
            f"POST /v1/measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )  # no Content-Length: the size is only known while the body streams
        s.settimeout(3)
        block, sent = b"a" * (1 << 20), 0
        try:
            while sent < 300 << 20:
                s.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                sent += len(block)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the agent stopped reading
        s.settimeout(10)
        answer = s.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413") and "over the agent's limit" in answer, answer[:200]
    assert sent < 100 << 20  # refused early, not after 300 MiB
    assert psutil.Process(agent.proc.pid).memory_info().rss - rss < 64 << 20
    assert agent.client().measure(*_model(8), QUICK).median_ms > 0


def test_items_per_request_are_capped_and_the_client_splits(agent):
    items = [{"model": base64.b64encode(_model(8)[0]).decode(), "input_shape": [1, 4, 8, 8]}]
    items += [{"same_as": 0, "input_shape": [1, 4, 8, 8]}] * 5
    r = _post(agent, "/jobs", {"items": items})
    assert r.status_code == 400 and "6 items in one request, over the agent's limit of 5" in r.json()["detail"]
    c = agent.client()
    results = c.measure_many([_model(8 + k) for k in range(12)], QUICK)  # three jobs of at most 5
    assert len(results) == 12 and all(m.median_ms > 0 for m in results)


def test_a_full_queue_refuses_whole_and_the_client_retry_measures_once(agent):
    c = agent.client()
    slow = _slow_job(c)
    queued = c.submit([_model(200 + i) for i in range(5)], SLOW)  # with the one running, all 6 places
    before = c.info()
    two = [{"model": base64.b64encode(_model(300 + k)[0]).decode(), "input_shape": [1, 4, 8, 8]} for k in (0, 1)]
    r = _post(agent, "/jobs", {"items": two})
    assert r.status_code == 503 and "nothing was queued" in r.json()["detail"] and r.headers["retry-after"]
    assert c.info()["queue_length"] == before["queue_length"] == 6  # the one in progress and 5 waiting: full

    threading.Timer(1.5, lambda: (c.cancel(queued), c.cancel(slow))).start()  # the queue drains meanwhile
    retried = agent.client().measure(*_model(302), QUICK)  # 503 while full, then retried
    assert retried.median_ms > 0
    assert c.info()["measured"] == before["measured"] + 1  # measured once, not once per try


def test_input_elements_are_capped_before_any_work(agent):
    model = onnx.load_from_string(_model(8)[0])
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"  # dynamic: any size would do, were it not for the cap
    body = {"model": base64.b64encode(model.SerializeToString()).decode(), "input_shape": [1, 3, 100000, 100000]}
    r = _post(agent, "/measure", body)
    assert r.status_code == 400 and "30,000,000,000 elements, over the agent's limit of 100,000" in r.json()["detail"]


def test_cancel_stops_queued_and_running_jobs(agent):
    c = agent.client()
    running = _slow_job(c)
    waiting = c.submit([_model(400)], SLOW)
    worker = c.info()["worker_pid"]
    assert c.cancel(waiting)["status"] == "cancelled"  # at once: it never started
    assert c.cancel(running)["was"] == "running"
    t0 = time.time()
    view = _wait_status(c, running, "cancelled", timeout=10)
    assert view["status"] == "cancelled" and time.time() - t0 < 10
    assert view["results"][0]["cancelled"]
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE  # stopped
    assert c.info()["queue_length"] == 0
    assert c.measure(*_model(8), QUICK).median_ms > 0  # a fresh worker takes over
    r = httpx.delete(f"{agent.url}/v1/jobs/nope", headers={"Authorization": f"Bearer {agent.token}"}, timeout=10)
    assert r.status_code == 404


def test_a_running_job_is_never_evicted(agent):
    c = agent.client()
    c.measure(*_model(8), QUICK)  # cached from now on
    running = _slow_job(c)
    quick = [c.submit([_model(8)], QUICK) for _ in range(6)]  # answered from the cache: finished at once
    assert c.job(running)["status"] == "running"  # 6 finished jobs later, with room for 3
    with pytest.raises(EdgepruneError, match="no job"):
        c.job(quick[0])  # the oldest finished ones went
    assert c.job(quick[-1])["status"] == "done"
    c.cancel(running)


@pytest.mark.parametrize(
    "body,expect",
    [('{"model": "AA==", "input_shape": [1, 4, Infinity, 8]}', "Infinity, which is not JSON"),
     ('{"model": "AA==", "input_shape": []}', "non-empty list of sizes"),
     ('{"model": "AA==", "input_shape": [1, 4, 8.0, 8]}', "whole number >= 1, got 8.0"),
     ('{"model": "AA==", "input_shape": [1, "4", 8, 8]}', 'whole number >= 1, got "4"'),
     ('{"model": "AA==", "input_shape": [true, 4, 8, 8]}', "whole number >= 1, got true"),
     ('{"model": "AA==", "input_shape": [1, 4, 8, 8], "protocol": "fast"}', "bad protocol: must be an object"),
     ('{"model": "AA==", "input_shape": [1, 4, 8, 8], "protocol": {"min_runs": 1.9}}', "min_runs"),
     ('{"model": "AA==", "input_shape": [1, 4, 8, 8], "protocol": {"pin_cpus": [4096]}}', "not all usable CPUs"),
     ('{"model": "AA==", "input_shape": [1, 4, 8, 8], "protocol": {"pin_cpus": [true]}}', "list of CPU numbers"),
     ('[1, 2]', "must be a JSON object")],
)  # fmt: skip
def test_malformed_requests_are_one_line_400s(agent, body, expect):
    r = httpx.post(f"{agent.url}/v1/measure", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {agent.token}", "Content-Type": "application/json"})  # fmt: skip
    detail = r.json()["detail"]
    assert r.status_code == 400 and expect in detail and "\n" not in detail, (r.status_code, detail)
    assert json.loads(r.text) == {"detail": detail}


def test_a_measure_that_cannot_start_in_time_is_refused_and_not_left_queued(tmp_path):
    a = AgentProcess(tmp_path, extra=("--job-timeout", "3")).start()
    try:
        c = a.client()
        busy = Protocol(warmup_runs=1, warmup_s=0, min_runs=10, min_s=2, max_runs=10**9, max_cv=10,
                        max_foreign_load=1.0)  # fmt: skip
        blocker = c.submit([_model(100 + i) for i in range(3)], busy)  # ~6 s of the device, 2 s per item
        data, shape = _model(8)
        r = _post(a, "/measure", {"model": base64.b64encode(data).decode(), "input_shape": list(shape),
                                  "protocol": QUICK.to_dict()})  # fmt: skip
        assert r.status_code == 503 and "did not start within 3 s; nothing was queued" in r.json()["detail"]
        view = _wait_status(c, blocker, "done")
        assert all("measurement" in x for x in view["results"]), view
        assert c.info()["measured"] == 3 and c.info()["queue_length"] == 0  # the refused one never ran
    finally:
        a.stop()


def test_finished_jobs_expire_by_age_and_count_but_unfinished_ones_stay():
    board = JobBoard(max_queued=10, keep_jobs=2, keep_s=0.2)
    waiting = Job([{"key": "k"}], {})
    board.add(waiting)
    done = [Job([{"key": "k"}], {}, results=[{"cached": True}]) for _ in range(3)]
    for job in done:
        board.add(job)  # answered at once: finished on arrival
    assert board.get(done[0].id) is None and board.get(done[2].id) is not None  # room for 2 finished
    time.sleep(0.3)
    board.add(Job([{"key": "k"}], {}, results=[{"cached": True}]))
    assert board.get(done[2].id) is None  # older than keep_s
    assert board.get(waiting.id) is waiting and waiting.status == "queued"  # never dropped


def test_a_measure_whose_client_leaves_is_cancelled(agent):
    c = agent.client()
    worker = c.info()["worker_pid"]
    data, shape = _model(500)
    body = {"model": base64.b64encode(data).decode(), "input_shape": list(shape), "protocol": SLOW.to_dict()}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s of a 30 s measurement
        _post(agent, "/measure", body, timeout=2)
    deadline = time.time() + 15
    while c.info()["queue_length"] and time.time() < deadline:
        time.sleep(0.1)
    assert c.info()["queue_length"] == 0  # not left measuring for nobody
    assert c.info()["worker_pid"] != worker or c.info()["worker_pid"] is None  # the measurement was stopped


def test_uploads_at_once_are_capped(agent):
    answers = []
    with socket.create_connection(("127.0.0.1", agent.port)) as slow:  # holds the one upload slot
        head = f"POST /v1/measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
        slow.sendall((head + 'Content-Length: 100000\r\n\r\n{"model": ').encode())  # and no more, for now
        time.sleep(0.5)
        waiting = threading.Thread(target=lambda: answers.append(agent.client().measure(*_model(8), QUICK)))
        waiting.start()
        time.sleep(1.5)
        assert not answers  # it waits its turn (its body not yet read)
    waiting.join(30)  # the slow one left: its slot is free
    assert len(answers) == 1 and answers[0].median_ms > 0


def test_serve_options_that_cannot_work_together_are_refused():
    from edgeprune.agent.limits import from_options

    with pytest.raises(EdgepruneError, match=r"--max-queued \(10\) must be at least --max-items \(20\)"):
        from_options(max_items=20, max_queued=10)
    assert from_options(max_mb=2, keep_hours=0.5).max_bytes == 2 << 20
