"""Load on one agent: 8 concurrent clients x 25 requests on loopback.

    python bench/agent_load.py [--clients 8] [--requests 25]

Starts a real agent (subprocess, free port, temporary cache), then each client thread sends
its requests: distinct models (so most are measured, not cached), some repeats (cached), and a
few bad ones (refused with 400). Prints how many were answered, cached, refused, failed, any
lost or duplicated result, and the agent's resident memory before, during and after.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_agent import AgentProcess, _model  # noqa: E402  (the same real agent the tests start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3, help="repeat the load to see whether memory keeps growing")
    args = ap.parse_args()
    protocol = {"warmup_runs": 2, "warmup_s": 0.0, "min_runs": 10, "min_s": 0.01, "max_cv": 10.0,
                "max_foreign_load": 1.0}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        agent = AgentProcess(Path(d)).start()
        proc = psutil.Process(agent.proc.pid)

        def rss() -> float:
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20

        mem = {"start": rss()}
        counts: Counter = Counter()
        answers: dict[tuple[int, int], str] = {}
        lock = threading.Lock()

        def client(cid: int) -> None:
            http = httpx.Client(base_url=f"{agent.url}/v1", headers={"Authorization": f"Bearer {agent.token}"},
                                timeout=300)  # fmt: skip
            for r in range(args.requests):
                if r % 10 == 9:  # a malformed request: must be refused, not crash anything
                    body = {"model": base64.b64encode(b"junk").decode(), "input_shape": [1, 4, 8, 8]}
                else:
                    cout = 8 + 8 * ((cid * args.requests + r) % 40)  # 40 distinct models, repeats across clients
                    data, shape = _model(cout)
                    body = {"model": base64.b64encode(data).decode(), "input_shape": list(shape), "protocol": protocol}
                try:
                    resp = http.post("/measure", json=body)
                except httpx.HTTPError as e:
                    with lock:
                        counts[f"transport error {type(e).__name__}"] += 1
                    continue
                with lock:
                    if resp.status_code == 200:
                        j = resp.json()
                        counts["answered"] += 1
                        counts["cached" if j.get("cached") else "measured"] += 1
                        if (cid, r) in answers:
                            counts["duplicated"] += 1
                        answers[(cid, r)] = j["job"]
                    elif resp.status_code in (400, 413, 503):
                        counts[f"refused {resp.status_code}"] += 1
                    else:
                        counts[f"failed {resp.status_code}"] += 1

        after_round = []
        peak = mem["start"]
        t0 = time.monotonic()
        for round_ in range(args.rounds):
            answers.clear()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, rss())
                time.sleep(0.2)
            after_round.append(rss())
            counts["job ids, round 1"] += len(set(answers.values())) if round_ == 0 else 0
        mem["peak"] = peak
        wall = time.monotonic() - t0
        agent.stop()
    total = args.clients * args.requests * args.rounds
    bad = args.rounds * sum(1 for c in range(args.clients) for r in range(args.requests) if r % 10 == 9)
    accounted = sum(v for k, v in counts.items() if k == "answered" or k.startswith(("refused", "failed", "transport")))
    print(f"{args.rounds} rounds of {args.clients} clients x {args.requests} requests = {total} in {wall:.1f} s")
    for k, v in sorted(counts.items()):
        print(f"  {k:<22}{v:>6}")
    print(f"  {'expected refusals':<22}{bad:>6}")
    print(f"  {'lost (no answer)':<22}{total - accounted:>6}")
    print(f"  {'duplicated':<22}{counts['duplicated']:>6}")
    print(
        f"agent memory (RSS incl. worker, MiB): before {mem['start']:.0f}, after each round "
        f"{', '.join(f'{m:.0f}' for m in after_round)}, peak {mem['peak']:.0f}"
    )


if __name__ == "__main__":
    main()
