"""Load on one agent: concurrent clients on loopback, every answer checked against what was sent.

    python bench/agent_load.py [--clients 8] [--requests 25] [--rounds 2]

Starts a real agent (subprocess, free port, temporary cache) and measures a pool of known models
once. Then each client thread sends its requests: more than half are new models (each one sent by
two clients at the same moment, so the agent sees duplicates in flight), the rest are known models
(answered from the cache), and every tenth is malformed (refused with 400). Every answer must name
the model (SHA-256) and input shape it was asked for. Prints answered / cached / refused, lost
(no answer), duplicated (a model measured more than once), mismatched (an answer for another
model), request latency p50/p99, the agent's memory, and /v1/health latency while a 42 MB model
uploads (the vetting of a large model runs outside the agent's event loop).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgeprune.latency.measurement import Protocol  # noqa: E402
from tests.test_agent import AgentProcess, _model  # noqa: E402  (the same real agent the tests start)

PROTOCOL = {"warmup_runs": 2, "warmup_s": 0.0, "min_runs": 10, "min_s": 0.01, "max_cv": 10.0, "max_foreign_load": 1.0}
KNOWN = 20  # models measured before the load: the cached share


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Load:
    """One round of requests; what came back, checked."""

    def __init__(self, agent: AgentProcess, clients: int, requests: int, round_: int) -> None:
        self.agent, self.clients, self.requests, self.round = agent, clients, requests, round_
        self.counts: Counter = Counter()
        self.latencies: list[float] = []
        self.new_models: set[str] = set()
        self.lock = threading.Lock()

    def request(self, cid: int, r: int) -> tuple[dict, bytes | None]:
        if r % 10 == 9:  # malformed: refused, and nothing breaks
            return {"model": base64.b64encode(b"junk").decode(), "input_shape": [1, 4, 8, 8]}, None
        if r % 2 == 0:  # new: clients cid and cid + clients/2 send the same one at the same step
            pair = cid % max(1, self.clients // 2)  # (the same sizes each round, another input width)
            data, shape = _model(8 * (KNOWN + 1 + pair * self.requests + r), cin=5 + self.round)
        else:
            data, shape = _model(8 * (1 + (cid + r) % KNOWN))
        return {"model": base64.b64encode(data).decode(), "input_shape": list(shape), "protocol": PROTOCOL}, data

    def client(self, cid: int) -> None:
        http = httpx.Client(base_url=f"{self.agent.url}/v1", timeout=300,
                            headers={"Authorization": f"Bearer {self.agent.token}"})  # fmt: skip
        for r in range(self.requests):
            body, data = self.request(cid, r)
            t0 = time.monotonic()
            try:
                resp = http.post("/measure", json=body)
            except httpx.HTTPError as e:
                with self.lock:
                    self.counts[f"lost ({type(e).__name__})"] += 1
                continue
            with self.lock:
                self.record(resp, body, data, time.monotonic() - t0, new=r % 2 == 0)

    def record(self, resp: httpx.Response, body: dict, data: bytes | None, seconds: float, *, new: bool) -> None:
        if data is None:
            self.counts["refused as expected" if resp.status_code == 400 else f"malformed got {resp.status_code}"] += 1
            return
        if resp.status_code != 200:
            self.counts[f"lost ({resp.status_code})"] += 1
            return
        answer = resp.json()
        digest = hashlib.sha256(data).hexdigest()
        ok = answer.get("model") == digest and answer.get("input_shape") == body["input_shape"]
        self.counts["answered"] += 1
        self.counts["cached" if answer.get("cached") else "measured"] += 1
        self.counts["mismatched"] += not ok
        self.latencies.append(seconds)
        if new:
            self.new_models.add(digest)

    def run(self) -> float:
        threads = [threading.Thread(target=self.client, args=(i,)) for i in range(self.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0


def health_under_upload(agent: AgentProcess) -> list[float]:
    """/v1/health round trips (s) while a 42 MB model is uploaded, vetted and measured."""
    data, shape = _model(cout=1024, cin=1152, hw=4)
    raw = json.dumps({"model": base64.b64encode(data).decode(), "input_shape": list(shape), "protocol": PROTOCOL})
    done, seen = threading.Event(), []

    def upload() -> None:
        httpx.post(f"{agent.url}/v1/measure", content=raw.encode(), timeout=300,
                   headers={"Authorization": f"Bearer {agent.token}", "Content-Type": "application/json"})  # fmt: skip
        done.set()

    thread = threading.Thread(target=upload)
    thread.start()
    with httpx.Client() as http:
        while not done.is_set():
            t0 = time.perf_counter()
            http.get(f"{agent.url}/v1/health", timeout=30)
            seen.append(time.perf_counter() - t0)
            time.sleep(0.01)
    thread.join()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2, help="repeat the load to see whether memory keeps growing")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        agent = AgentProcess(Path(d), max_mb=128).start()
        proc = psutil.Process(agent.proc.pid)

        def rss() -> float:
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20

        client = agent.client()
        known = [_model(8 * (1 + k)) for k in range(KNOWN)]
        client.measure_many(known, Protocol.from_dict(PROTOCOL))  # the cached share
        start_mb, measured0 = rss(), client.info()["measured"]
        rounds, after = [], []
        for round_ in range(args.rounds):
            load = Load(agent, args.clients, args.requests, round_)
            wall = load.run()
            measured = client.info()["measured"]
            rounds.append((load, wall, measured - measured0))
            measured0 = measured
            after.append(rss())
        health = health_under_upload(agent)
        agent.stop()
    report(args, rounds, start_mb, after, health)


def report(args, rounds, start_mb: float, after: list[float], health: list[float]) -> None:
    total = args.clients * args.requests
    for i, (load, wall, measured) in enumerate(rounds):
        c = load.counts
        lost = total - c["answered"] - c["refused as expected"]
        print(f"round {i + 1}: {args.clients} clients x {args.requests} requests = {total} in {wall:.1f} s "
              f"({len(load.new_models)} new models, {c['answered'] - c['measured']} cached answers)")  # fmt: skip
        for k, v in sorted(c.items()):
            print(f"  {k:<24}{v:>6}")
        print(f"  {'lost (no answer)':<24}{lost:>6}")
        print(f"  {'duplicated':<24}{measured - len(load.new_models):>6}   (agent measured {measured} for "
              f"{len(load.new_models)} new models)")  # fmt: skip
        ms = [s * 1e3 for s in load.latencies]
        print(f"  request latency ms      p50 {percentile(ms, 0.5):.0f}, p99 {percentile(ms, 0.99):.0f}")
    print(f"agent memory (RSS incl. worker and vetting, MiB): before {start_mb:.0f}, after each round "
          f"{', '.join(f'{m:.0f}' for m in after)}")  # fmt: skip
    ms = [s * 1e3 for s in health]
    print(f"/v1/health during a 42 MB upload: {len(ms)} checks, median {statistics.median(ms):.0f} ms, "
          f"max {max(ms):.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
