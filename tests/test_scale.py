"""Scale-out on Ray: candidates scored on a local Ray and on a cluster of two nodes, a worker killed
mid-evaluation, batches of candidates (BO's joint choice, PSO's swarm), devices profiled at once
(each a queue), finetune seeds as tasks. Each test that needs Ray starts and stops its own."""

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import edgeprune
from edgeprune.cluster import ClusterOptions, RaySession
from edgeprune.errors import EdgepruneError
from edgeprune.models.reference import ModelRef
from edgeprune.runs import RunStore
from edgeprune.search import BudgetProblem, FlopsCost, SearchLoop, make_searcher

from .conftest import EXAMPLES

TINYNET = f"{EXAMPLES / 'tinynet.py'}:tinynet"

sys.path.insert(0, str(EXAMPLES))
from tinynet import tinynet  # noqa: E402


def _tinynet(weights) -> torch.nn.Module:
    model = tinynet(width=16)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def _ray_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


PRUNE = {"budget": "85%", "evals": 6, "measure_top": 2, "heldout_images": 300, "margin": 0.1, "progress": False}


@pytest.fixture(scope="module")
def ray_run(tinynet_28, tmp_path_factory):
    """The user's TinyNet pruned with its candidates scored on a local Ray of two workers, two at a time."""
    from edgeprune.data import load_dataset

    run, logs = tmp_path_factory.mktemp("ray") / "run", []
    model = _tinynet(tinynet_28["weights"])
    data = load_dataset("digits:28")
    _, result = edgeprune.prune(
        model, (1, 1, 28, 28), device=tinynet_28["device"], table=tinynet_28["table"], data=data, search="bo",
        workers=2, run_dir=run, log=logs.append, model_ref=ModelRef.parse(TINYNET, kwargs={"width": 16}), **PRUNE,
    )  # fmt: skip
    return {"run": run, "result": result, "logs": logs, "model": model, "data": data}


def test_a_search_scores_its_candidates_on_a_local_two_worker_ray(ray_run, tinynet_28):
    """The workers score what this process would (same space, same batches), two at a time; the
    driver alone wrote the store; Ray is gone after the call."""
    import ray

    from edgeprune.pruning import space
    from edgeprune.search import ProxyEvaluator
    from edgeprune.task import make_task

    record = ray_run["result"].record
    assert record["scoring"] == {
        "where": "a local Ray of 2 workers (1 CPU a task)", "workers": 2, "nodes": 1, "requeued": 0, "batch": 2,
    }  # fmt: skip
    assert any(
        "scoring candidates on a local Ray of 2 workers" in line and "2 at a time" in line for line in ray_run["logs"]
    )
    rows = RunStore(ray_run["run"]).evals()
    distinct = [r for r in rows if not r["duplicate"]]
    assert len(distinct) == record["evals"] >= 6 and len({r["plan_hash"] for r in distinct}) == len(distinct)
    s = space(ray_run["model"], torch.randn(1, 1, 28, 28), step=16, min_keep_ratio=0.1)
    local = ProxyEvaluator(s, make_task(data=ray_run["data"], heldout_images=300), criterion="l2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        for r in distinct[:3]:
            assert r["plan_hash"] == local.plan(r["counts"]).hash()
            assert abs(local(r["counts"]) - r["score"]) <= 1 / 300 + 1e-9  # at most one image apart (float sums)
    finally:
        torch.set_num_threads(threads)
    assert not ray.is_initialized() and not [p for p in _ray_processes() if "raylet" in p.name()]


LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def test_a_local_ray_listens_on_loopback_only_and_runs_no_dashboard():
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone since it was listed
            return ""

    with RaySession(ClusterOptions(workers=1)) as session:
        processes = _ray_processes()
        pids = {p.pid for p in processes}
        listening = [
            c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]
        commands = [cmdline(p) for p in processes]
        assert session.slots == 1
    loopback = [ipaddress.ip_address(ip) for ip in listening]
    assert listening and all(a.is_loopback or getattr(a, "ipv4_mapped", None) in LOOPBACK for a in loopback), listening
    # Ray keeps a minimal head for its own bookkeeping (no frontend, no port); no dashboard is served
    dashboards = [c for c in commands if "dashboard.py" in c]
    assert all("--minimal" in c and "--disable-frontend" in c for c in dashboards), dashboards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster():
    """A Ray cluster of two one-CPU nodes, each a `ray start` process (the head, then a node joining it)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a multi-node cluster, as a user starts one
    port = _free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    start = [ray_cli, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        join = [ray_cli, "start", "--address", f"127.0.0.1:{port}", *common]
        subprocess.run(join, env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_search_through_ray_address_uses_both_nodes_of_a_cluster(two_node_cluster, tinynet_28, tmp_path, cli):
    address, env = two_node_cluster
    run = tmp_path / "run"
    r = cli("prune", "--model", TINYNET, "--model-arg", "width=16", "--weights",
            str(tinynet_28["weights"]), "--data", "digits:28", "--device", tinynet_28["device"], "--table",
            str(tinynet_28["table"]), "--out", str(run), "--budget-ms", "85%", "--search", "random", "--evals", "6",
            "--measure-top", "2", "--heldout-images", "300", "--margin", "0.1", "--ray", address, "--json",
            env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    scoring = json.loads(r.stdout)["scoring"]
    assert scoring["workers"] == 2 and scoring["nodes"] == 2 and scoring["batch"] == 2, scoring
    assert f"the Ray cluster at {address}" in scoring["where"]


def test_a_worker_killed_mid_evaluation_loses_only_its_candidate(tinynet_28, tmp_path):
    """A worker is killed (SIGKILL) while it scores: Ray restarts it, the candidate is scored again,
    and the store holds every evaluation once."""
    marks, driver = tmp_path / "marks", os.getpid()
    marks.mkdir()
    images = torch.randn(64, 1, 28, 28)

    def score_fn(model) -> float:  # a custom task, scored on the workers: slow enough to be caught
        if os.getpid() != driver:
            (marks / str(os.getpid())).touch()
            time.sleep(0.3)
        with torch.no_grad():
            return float(model(images).softmax(1).max(1).values.mean())

    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for f in marks.iterdir():
                os.kill(int(f.name), signal.SIGKILL)
                killed.append(int(f.name))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    logs, run = [], tmp_path / "run"
    _, result = edgeprune.prune(
        _tinynet(tinynet_28["weights"]), (1, 1, 28, 28), device=tinynet_28["device"], table=tinynet_28["table"],
        score_fn=score_fn, train_data=[images[i : i + 16] for i in range(0, 64, 16)], search="random", workers=2,
        run_dir=run, log=logs.append, **{**PRUNE, "evals": 8, "heldout_images": 2000},
    )  # fmt: skip
    thread.join()
    assert killed, "no worker was caught scoring"
    assert result.record["scoring"]["requeued"] >= 1
    assert any("a scoring worker died while scoring plan" in line for line in logs)
    rows = RunStore(run).evals()
    distinct = [r for r in rows if not r["duplicate"]]
    assert len(distinct) == result.record["evals"] >= 8
    assert len({r["plan_hash"] for r in distinct}) == len(distinct) and [r["i"] for r in rows] == list(range(len(rows)))


@pytest.fixture(scope="module")
def r20():
    from edgeprune.models import build_model
    from edgeprune.pruning import space

    torch.manual_seed(0)
    return space(build_model("resnet20", in_channels=1).eval(), torch.randn(1, 1, 28, 28), step=8)


def _objective(s):
    w = np.random.default_rng(0).random(len(s.groups)) ** 3
    widths = np.asarray(s.widths, float)
    return lambda counts: float(np.sum(w * np.sqrt(np.asarray(counts) / widths)))


def test_batch_bo_proposes_q_distinct_feasible_candidates_the_same_for_a_seed(r20):
    def batch(seed: int, q: int = 4):
        problem = BudgetProblem.create(r20, FlopsCost(r20.cost, r20.macs()), 0.4)
        searcher = make_searcher("bo", problem, evals=20, seed=seed)
        loop = SearchLoop(problem, searcher, _objective(r20), RunStore(None), batch=q, progress=False)
        loop.run(12)  # the Sobol starts, then a batch from the GP
        proposals = loop._ask(q)
        return problem, proposals

    problem, proposals = batch(0)
    counts = [tuple(int(c) for c in p.counts) for p in proposals]
    assert len(proposals) == 4 and len(set(counts)) == 4 and not any(p.duplicate for p in proposals)
    assert all(p.cost <= problem.budget * (1 + 1e-9) for p in proposals)
    assert [tuple(int(c) for c in p.counts) for p in batch(0)[1]] == counts  # a seed gives the same batch
    assert [tuple(int(c) for c in p.counts) for p in batch(1)[1]] != counts


@pytest.mark.parametrize("name", ["pso", "random"])
def test_a_batch_changes_nothing_for_pso_and_random(r20, name):
    """PSO is told whole generations and random draws by proposal index: their runs are the same at any q."""

    def run(q: int):
        problem = BudgetProblem.create(r20, FlopsCost(r20.cost, r20.macs()), 0.4)
        searcher = make_searcher(name, problem, evals=14, seed=3, particles=5)
        loop = SearchLoop(problem, searcher, _objective(r20), RunStore(None), batch=q, progress=False)
        loop.run(14)
        return [r["counts"] for r in loop.rows]

    assert run(1) == run(4)


def test_devices_profiled_at_once_each_get_their_own_table_and_take_turns_on_one_cpu(tinynet_28, tmp_path):
    from edgeprune.devices import Device

    ov = tmp_path / "fast-ov.yaml"
    ov.write_text(
        Path(tinynet_28["device"]).read_text().replace("fast-ort", "fast-ov").replace("onnxruntime", "openvino")
    )
    devices = [Device.load(tinynet_28["device"]), Device.load(ov)]
    turns = {d.name: [] for d in devices}
    for d in devices:  # record the time each measurement holds its device's turn

        def timed(*, _turn=d.queue.turn, _name=d.name):
            @contextlib.contextmanager
            def held():
                with _turn():
                    t0 = time.monotonic()
                    yield
                    turns[_name].append((t0, time.monotonic()))

            return held()

        d.queue.turn = timed
    logs = []
    small = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
        torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )  # fmt: skip
    tables = edgeprune.profile(
        small.eval(), (1, 1, 16, 16), device=devices, out=[tmp_path / "ort.json", tmp_path / "ov.json"], step=8,
        calibrate=2, progress=False, log=logs.append,
    )  # fmt: skip
    assert [t.device for t in tables] == ["fast-ort", "fast-ov"]
    assert {json.loads((tmp_path / f).read_text())["device"] for f in ("ort.json", "ov.json")} == {
        "fast-ort",
        "fast-ov",
    }
    assert tables[0].fingerprint["runtime"] != tables[1].fingerprint["runtime"]
    assert any(line.startswith("[fast-ov] ") for line in logs)
    a, b = turns["fast-ort"], turns["fast-ov"]
    assert a and b
    # both profiles measure on this one CPU: never at the same time
    overlaps = [(x, y) for x in a for y in b if x[0] < y[1] - 1e-3 and y[0] < x[1] - 1e-3]
    assert not overlaps, overlaps[:3]


def test_finetune_seeds_run_as_tasks_and_resume(ray_run, tmp_path, cli_here):
    run = ray_run["run"]
    r = cli_here("finetune", run, "--seeds", "2", "--epochs", "1", "--max-batches", "3", "--workers", "2", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [(f["seed"], Path(f["run_dir"]).name) for f in got["finetunes"]] == [(0, "s0"), (1, "s1")]
    assert set(got["runs"][0]["test_accuracy"]) == {"0", "1"} and got["runs"][0]["sd"] is not None
    first = (run / "seeds" / "s1" / "finetuned.pt").stat().st_mtime_ns
    r = cli_here("finetune", run, "--seeds", "2", "--epochs", "1", "--max-batches", "3", "--json")
    assert r.returncode == 0 and "2 finetunes (2 already done)" in r.stderr, r.stderr
    assert (run / "seeds" / "s1" / "finetuned.pt").stat().st_mtime_ns == first  # nothing finetuned twice


def test_cluster_options_are_checked_before_any_work(tinynet_28, cli_here, tmp_path):
    for kw, says in [
        ({"workers": 0}, "--workers must be a whole number of at least 1"),
        ({"workers": 2, "ray": "auto"}, "not both"),
        ({"workers": 1, "worker_cpus": -1}, "--worker-cpus must be"),
        ({"workers": 1, "worker_cpus": 0}, "a worker needs some resource"),
    ]:
        with pytest.raises(EdgepruneError, match=says):
            edgeprune.prune(torch.nn.Conv2d(1, 8, 3), (1, 1, 8, 8), device=tinynet_28["device"], budget="50%",
                            data="digits", **kw)  # fmt: skip
    assert shutil.which("ray", path=str(Path(sys.executable).parent))
    dev, model = tinynet_28["device"], ["--model", TINYNET, "--model-arg", "width=16", "--input-shape", "1,1,28,28"]
    r = cli_here("profile", *model, "--device", dev, "--device", dev, "--out", tmp_path / "a.json")
    assert r.returncode == 2 and "2 --device but 1 --out" in r.stderr, r.stderr
    r = cli_here(
        "profile", *model, "--device", dev, "--device", dev, "--out", tmp_path / "a.json", "--out", tmp_path / "b.json"
    )
    assert r.returncode == 2 and "a device profile is named twice" in r.stderr, r.stderr
    r = cli_here("prune", *model[:4], "--device", dev, "--budget-ms", "50%", "--out", tmp_path / "r", "--workers", "0")
    assert r.returncode == 2 and "--workers must be a whole number of at least 1" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()
