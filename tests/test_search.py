"""Search under a budget: repair, budget errors, searchers, the loop's store and resume, prune runs."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.predictor import Predictor
from edgeprune.latency.table import LatencyTable, calibration_key
from edgeprune.models import build_model
from edgeprune.pruning import random_counts, space
from edgeprune.runs import RunStore
from edgeprune.search import (
    BOCR,
    BudgetProblem,
    FlopsCost,
    ProxyEvaluator,
    SearchLoop,
    Uniform,
    cluster_groups,
    make_searcher,
)

from .conftest import ROOT


@pytest.fixture(scope="module")
def r56():
    model = build_model("resnet56", in_channels=1).eval()
    return space(model, torch.randn(1, 1, 28, 28), step=8)


def flops_problem(s, budget=0.5, **kw):
    return BudgetProblem.create(s, FlopsCost(s.cost, s.macs()), budget, **kw)


def test_flops_cost_is_exact(r56):
    rng = np.random.default_rng(0)
    plans = np.array([random_counts(r56, rng) for _ in range(5)])
    assert list(FlopsCost(r56.cost, r56.macs())(plans) * r56.macs()) == pytest.approx([r56.macs(p) for p in plans])


def test_compiled_predictor_matches_the_table_sum():
    model = build_model("resnet20", in_channels=1)
    s = space(model, torch.randn(1, 1, 28, 28), step=16)
    layers = ModelLayers.from_model(s)
    entries = {c.key: {"median_ms": 0.01 * (i + 1)} for i, c in enumerate(layers.reachable())}
    table = LatencyTable("d", {}, {}, 16, "resnet20", [1, 1, 28, 28], entries, {"a": 1.5, "b": 0.2, "n": 3})
    table.meta["unit_overhead_ms"] = 0.003
    p = Predictor(layers, table)
    fast = p.compiled()
    rng = np.random.default_rng(1)
    plans = [random_counts(s, rng) for _ in range(20)] + [s.full_counts()]
    assert list(fast.predict(plans)) == pytest.approx([p.predict(c) for c in plans])


@pytest.mark.parametrize("fill", [True, False])
def test_repair_always_yields_feasible_plans(r56, fill):
    problem = flops_problem(r56, 0.4)
    u = np.random.default_rng(0).random((300, problem.dim))
    u[:10] = 1.0  # the dense corner
    u[10:20] = 0.0  # the smallest plan
    rep = problem.repair(u, fill=fill)
    assert (rep.cost <= problem.budget + 1e-12).all()
    assert (problem.cost(rep.counts) == rep.cost).all()
    for g, col in zip(r56.groups, rep.counts.T):
        assert set(col) <= set(g.allowed)
    again = problem.repair(rep.u, fill=fill)  # a repaired point is its own repair
    assert (again.counts == rep.counts).all()
    if fill:  # nothing fits on top: no free group can take one more step within the budget
        for counts in rep.counts[::30]:
            for g in problem.variables:
                allowed = r56.groups[g].allowed
                i = allowed.index(counts[g])
                if i + 1 < len(allowed):
                    bigger = counts.copy()
                    bigger[g] = allowed[i + 1]
                    assert problem.cost(bigger[None])[0] > problem.budget


def test_repair_keeps_what_fits(r56):
    problem = flops_problem(r56, 0.6)
    u = np.zeros((1, problem.dim))
    rep = problem.repair(u, fill=False)
    assert (rep.counts == problem.counts(u)).all() and (rep.u == 0).all()


def test_budget_errors(r56):
    with pytest.raises(EdgepruneError, match=r"below the smallest cost .*every free group at its minimum"):
        flops_problem(r56, 0.001)
    # the hint names --min-keep only where the keep ratio, not the channel step, is what binds
    with pytest.raises(
        EdgepruneError,
        match=r"already at one channel step \(8\).*raise the budget, or let the search "
        r"remove whole residual blocks \(--depth\)$",
    ):
        flops_problem(r56, 0.001)
    half = space(build_model("resnet56", in_channels=1).eval(), torch.randn(1, 1, 28, 28), step=8, min_keep_ratio=0.5)
    with pytest.raises(EdgepruneError, match=r"raise the budget, or lower --min-keep, or let the search remove"):
        flops_problem(half, 0.05)
    # with depth pruning on, the hint no longer offers it
    deep = space(build_model("resnet56", in_channels=1).eval(), torch.randn(1, 1, 28, 28), step=8, depth=True)
    with pytest.raises(EdgepruneError, match=r"already at one channel step \(8\).*raise the budget$"):
        flops_problem(deep, 0.0001)
    with pytest.raises(EdgepruneError, match="at or above the dense model.*nothing to prune"):
        flops_problem(r56, 1.0)
    with pytest.raises(EdgepruneError, match="--fix pattern 'nope' matches no channel group"):
        flops_problem(r56, 0.5, fix=["nope"])
    fixed = flops_problem(r56, 0.5, fix=["layer3.*"])
    assert all(not r56.groups[g].root.startswith("layer3") for g in fixed.variables)
    assert (
        fixed.repair(np.zeros((1, fixed.dim))).counts[0][[g.index for g in r56.groups if g.root.startswith("layer3")]]
        == [g.width for g in r56.groups if g.root.startswith("layer3")]
    ).all()


def synthetic_score(s, seed=0):
    """A smooth objective: some groups matter much more than others, with diminishing returns."""
    w = np.random.default_rng(seed).random(len(s.groups)) ** 3
    widths = np.asarray(s.widths, float)
    return lambda counts: float(np.sum(w * np.sqrt(np.asarray(counts) / widths)))


@pytest.mark.parametrize("name", ["random", "bo", "bocr", "pso"])
def test_searcher_improves_on_its_first_evaluation(r56, tmp_path, name):
    problem = flops_problem(r56, 0.35)
    acp = [g.allowed[len(g.allowed) // 2] for g in r56.groups]
    searcher = make_searcher(name, problem, evals=24, seed=1, clusters=3, acp_counts=acp, particles=6)
    store = RunStore(tmp_path)
    loop = SearchLoop(problem, searcher, synthetic_score(r56), store, progress=False)
    loop.run(24)
    rows = [r for r in store.evals() if not r["duplicate"]]
    assert len(rows) == 24
    assert all(r["cost"] <= problem.budget + 1e-12 for r in rows)
    assert max(r["score"] for r in rows) > rows[0]["score"]
    if name == "bocr":
        assert searcher.rolled_back_at is not None and searcher.state()["phase"] == "full"


def test_uniform_is_one_ratio_bisected_to_the_budget(r56, tmp_path):
    problem = flops_problem(r56, 0.5)
    searcher = Uniform(problem, evals=10)
    loop = SearchLoop(problem, searcher, synthetic_score(r56), RunStore(tmp_path), progress=False)
    loop.run(10)
    assert len(loop.rows) == 1 and searcher.done
    counts = np.asarray(loop.rows[0]["counts"])
    r = searcher.ratio()
    assert (counts == problem.counts_of_ratios(np.full((1, problem.dim), r))[0]).all()
    assert (
        problem.cost(counts[None])[0]
        <= 0.5
        < problem.cost(problem.counts_of_ratios(np.full((1, problem.dim), r + 0.02)))[0]
    )


def test_bocr_clusters_and_rolls_back_to_the_best_box(r56, tmp_path):
    problem = flops_problem(r56, 0.4)
    imps = [
        np.abs(np.random.default_rng(i).standard_normal(r56.groups[g].width)) * (1 + i % 3)
        for i, g in enumerate(problem.variables)
    ]
    labels = cluster_groups(imps, 3)
    assert labels.max() == 2 and len(labels) == problem.dim
    searcher = BOCR(problem, evals=30, seed=0, labels=labels, patience=4, monitor_from=0.3, rollback_at=0.9)
    assert searcher.dim == 3 and searcher.expand(np.array([0.1, 0.5, 0.9])).shape == (problem.dim,)
    loop = SearchLoop(problem, searcher, synthetic_score(r56), RunStore(tmp_path), progress=False)
    loop.run(30)
    assert searcher.rolled_back_at is not None and searcher.rolled_back_at < 27  # stalled before 90 %
    lo, hi = searcher.box
    assert lo.shape == (problem.dim,) and (lo <= hi).all() and (hi - lo).mean() < 1.0


def test_loop_replays_a_store_and_continues(r56, tmp_path):
    """Resuming from the store gives the same history as an uninterrupted run."""
    score = synthetic_score(r56, seed=3)

    def loop(folder):
        problem = flops_problem(r56, 0.4)
        searcher = make_searcher("pso", problem, evals=18, seed=2, particles=6)
        return SearchLoop(problem, searcher, score, RunStore(tmp_path / folder), progress=False)

    full = loop("a")
    full.run(18)
    loop("b").run(7)
    resumed = loop("b")
    assert resumed.distinct == 7
    resumed.run(18)
    assert [r["counts"] for r in resumed.rows] == [r["counts"] for r in full.rows]


# ----- whole prune runs on a tiny model and data set, measured for real -----


def kill_prune_after(args: list[str], db_path: Path, evals: int) -> list[tuple]:
    """Start `edgeprune ARGS` (a prune), SIGKILL it once its store holds `evals` evaluations (or
    after 300 s); the stored (i, counts, score) rows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeprune", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if db_path.exists():
            with sqlite3.connect(db_path) as db:
                if db.execute("SELECT COUNT(*) FROM evals").fetchone()[0] >= evals:
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db_path) as db:
        return [tuple(r) for r in db.execute("SELECT i, counts, score FROM evals ORDER BY i")]


def prune_args(run, out, **extra):
    args = ["prune", "--weights", run["weights"], "--device", run["device"], "--table", run["table"], "--out", str(out)]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_prune_meets_budget_on_the_device(tiny_run, tmp_path, cli):
    # a slow phase of this shared host that outlasts the comparison's deadline drives a 0.2 ms model's
    # ratios toward 1 (2026-11-29: dense 0.29-0.34 ms over the start's 15 rounds, quiet 0.21; the
    # smallest plan then measured 89 % of dense beside it): where the run itself reported the device
    # noisy and missed, a new run is started, twice at most; a quiet device's miss fails at once
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        r = cli(*prune_args(tiny_run, run, budget_ms="80%", search="random", evals=8, measure_top=3), "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        if res["met_budget"] or "the device is noisy" not in r.stderr:
            break
    assert res["met_budget"] and res["chosen"]["measured_ms"] <= res["budget_ms"], (
        f"{r.stderr}\nchosen: {res['chosen']}"
    )
    # 8 in the search's own round; a tightening round (the table's prediction missed) adds its own
    assert res["evals"] >= 8 and res["chosen"]["proxy_accuracy"] > 0
    for f in (
        "plan.json",
        "pruned.pt",
        "convergence.png",
        "scatter.png",
        "evals.sqlite",
        "results.json",
        "config.json",
    ):
        assert (run / f).stat().st_size > 0
    from edgeprune.checkpoint import load_checkpoint

    pruned = load_checkpoint(run / "pruned.pt").build()
    assert sum(p.numel() for p in pruned.parameters()) == res["chosen"]["params"]
    # the store holds every evaluation and the measured candidates
    db = sqlite3.connect(run / "evals.sqlite")
    assert db.execute("SELECT COUNT(*) FROM evals WHERE duplicate = 0 AND round = 0").fetchone()[0] == 8
    assert db.execute("SELECT COUNT(*) FROM evals WHERE duplicate = 0").fetchone()[0] == res["evals"]
    assert db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] >= 1
    r = cli(*prune_args(tiny_run, run, budget_ms="80%"))
    assert r.returncode == 2 and "already holds a pruning run; pass --resume" in r.stderr


def _saving_device(monkeypatch, *, saving: float, drift: float = 1.0, pin: dict | None = None) -> None:
    """The prune's measurements, real, but where pruning saves only `saving` of what it saves on
    this host: the latency table is optimistic about pruned plans, wrong in proportion to how far
    a plan prunes (as a real table is). From the second measurement on, everything is also `drift`
    x slower (a board warming up). The first measurement is the dense model alone (`pin`: set to
    pin["dense_ms"]); later, the dense model is item 0 of a comparison that settles on it (a share
    budget's referral). Compressing the savings also compresses this host's noise and the fixture
    table's own error (a table stretched to promise more let those decide whether a round missed)."""
    from dataclasses import replace

    import edgeprune.latency.interleave as interleave

    real = getattr(interleave.measure_interleaved, "real", interleave.measure_interleaved)  # not wrapped twice
    state = {"calls": 0}

    def measured(device, items, **kw):
        ms = real(device, items, **kw)
        state["calls"] += 1
        first = state["calls"] == 1
        beside = first or kw.get("settle") is not None
        if first:
            state["dense_ms"] = ms[0].median_ms
        dense = ms[0].median_ms if beside else state["dense_ms"]
        slow = drift if not first else (pin["dense_ms"] / dense if pin else 1.0)
        out = []
        for i, m in enumerate(ms):
            f = slow * (1.0 if i == 0 and beside else (dense - saving * (dense - m.median_ms)) / m.median_ms)
            steady = {
                k: v * f if k in ("median_ms", "p90_ms", "quietest_ms") else v for k, v in m.extra["steady"].items()
            }
            extra = {**m.extra, "steady": steady}  # what the check holds a plan to (search/measured.py), alike
            out.append(replace(m, median_ms=m.median_ms * f, p90_ms=m.p90_ms * f, mean_ms=m.mean_ms * f, extra=extra))
        return out

    measured.real = real
    monkeypatch.setattr(interleave, "measure_interleaved", measured)


def _steady_device(tiny_run, tmp_path) -> str:
    """The fixture's fast protocol with more runs: a 0.2 ms model on a loaded machine is noisy enough
    to need extra rounds (what a user on a noisy device gets from --max-rounds)."""
    steady = tmp_path / "steady-ort.yaml"
    steady.write_text(
        Path(tiny_run["device"]).read_text().replace("min_runs: 20, min_s: 0.05", "min_runs: 50, min_s: 0.2")
    )
    assert steady.read_text() != Path(tiny_run["device"]).read_text()
    return str(steady)


def test_measured_check_tightens_an_optimistic_prediction(tiny_run, tmp_path, monkeypatch):
    """A table right about the dense model but optimistic about pruned ones (on the device a plan
    saves half what the table promises): the first candidates miss the budget on the device, the
    search budget is tightened from the measurements, and the plan chosen meets the budget."""
    from edgeprune.pipeline import prune_run as prune

    _saving_device(monkeypatch, saving=0.5)
    common = {
        "weights": tiny_run["weights"],
        "device": _steady_device(tiny_run, tmp_path),
        "table": tiny_run["table"],
        # 88 %: on this device the smallest plan measures ~78 % of dense (it saves half of its ~44 %),
        # and at 85 % a noisy host left so little room that 7 rounds closed in without meeting it
        # (fresh-clone CI: the last candidates 0.1946 ms against a 0.1936 ms target)
        "budget": "88%",
        "search": "random",
        "evals": 6,
        "measure_top": 2,
        "progress": False,
    }
    # the resumed run measures round 0's candidates again; a slow phase of this host that moves their
    # ratio to dense (fresh-clone CI: dense 26 % slower than at the profile) can let one meet the budget
    # there, and then nothing is tightened (another fresh-clone CI: a second round with no tightening,
    # so a loosening one: they met it by over 5 %): where that happens a new run is started, twice at most.
    # The same where the run tightened but a slow phase then put even the smallest plan over the target
    # (fresh-clone CI: the start's dense 0.319 ms, 0.238 beside the smallest plan, which measured 91 % of
    # it where it is ~78 %): a run that did not both tighten and meet the budget is not what is tested
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        # no tightening allowed: the candidates (~93 % of dense on the device) miss, and the run says so
        lines: list[str] = []
        res = prune(run, max_rounds=0, log=lines.append, **common)
        assert res["rounds"] == 1 and not res["met_budget"], "\n".join(lines)
        warned = [line for line in lines if line.startswith("warning: no plan met")]
        assert res["chosen"]["measured_ms"] > res["budget_ms"] * (1 - 0.02) and "--max-rounds" in warned[-1]
        # resumed with tightening allowed: the budget is tightened from the measurements until a plan fits
        lines.clear()
        res = prune(run, max_rounds=8, resume=True, log=lines.append, **common)
        if any("no candidate met" in line for line in lines) and res["met_budget"]:
            break
    assert any("no candidate met" in line for line in lines), "\n".join(lines)
    assert res["rounds"] >= 2 and res["search_budget"] < res["budget_ms"], "\n".join(lines)
    assert res["met_budget"] and res["chosen"]["measured_ms"] <= res["budget_ms"], "\n".join(lines)


def test_measured_check_loosens_a_pessimistic_prediction(tiny_run, tmp_path, monkeypatch):
    """On this device pruning saves 1.6x what the table promises, so the first round's plans
    measure well under the target: the budget left over is the user's accuracy. With a round to
    spare (here granted on resume), the search budget is loosened once from the measured plans and
    the search goes on; what it keeps still measures in."""
    from edgeprune.pipeline import prune_run as prune

    _saving_device(monkeypatch, saving=1.6)
    common = {
        "weights": tiny_run["weights"],
        "device": _steady_device(tiny_run, tmp_path),
        "table": tiny_run["table"],
        "budget": "80%",
        "search": "random",
        "evals": 2,  # both measured in the first round: a resume measures only the looser round's
        "measure_top": 2,
        "progress": False,
    }
    lines: list[str] = []
    # no round to spare. A slow phase of a shared host while round 0 is measured can make its plans
    # miss (fresh-clone CI once measured them 9 % slower than the dense model beside them, where they
    # are ~35 % faster). The comparison now measures on while that lasts (interleave.PRUNED_OVER), but
    # only for ~15 s more here, and this host has had slow phases of minutes: the user's remedy is a
    # round to spare, which would loosen here, so a new run is started instead, twice at most. The same
    # where a slow phase caught the start's dense measurement (fresh-clone CI: 0.33-0.43 ms over its 16
    # rounds, 0.24 beside the candidates) and the plans, referred to it, came out only just in
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        first = prune(run, max_rounds=0, log=lines.append, **common)
        if first["met_budget"] and first["chosen"]["measured_ms"] < first["target_ms"] * 0.95:
            break
    assert first["met_budget"] and first["rounds"] == 1 and not first["loosened"], "\n".join(lines)
    assert first["chosen"]["measured_ms"] < first["target_ms"] * 0.95, "\n".join(lines)  # the setup holds
    shutil.copytree(run, tmp_path / "keep")
    lines.clear()
    res = prune(run, max_rounds=2, resume=True, log=lines.append, **common)
    assert res["loosened"] and res["rounds"] == 2 and res["search_budget"] > first["search_budget"], "\n".join(lines)
    assert any("more evaluations to spend the rest on accuracy" in line for line in lines), lines
    assert res["met_budget"] and res["chosen"]["measured_ms"] <= res["target_ms"], "\n".join(lines)
    # a better plan, or one the proxy cannot tell from the first round's that spends more of the budget
    if any("within the proxy's resolution" in line for line in lines):
        assert res["chosen"]["measured_ms"] > first["chosen"]["measured_ms"], "\n".join(lines)
    else:
        assert res["chosen"]["proxy_accuracy"] >= first["chosen"]["proxy_accuracy"], "\n".join(lines)
    rows = RunStore(run).measurements()
    looser = [m["predicted_ms"] for m in rows if m["round"] == 1]  # nearer the target (as predicted: the
    # measurements of plans this close are at the mercy of the host's phases)
    assert looser and max(looser) > max(m["predicted_ms"] for m in rows if m["round"] == 0), rows
    # where the looser round's plans measure over the target (here the device now saves little),
    # the plan that measured in stands: loosening never loses a plan that met the budget
    _saving_device(monkeypatch, saving=0.3)
    lines.clear()
    res = prune(tmp_path / "keep", max_rounds=2, resume=True, log=lines.append, **common)
    assert res["loosened"] and res["met_budget"], "\n".join(lines)
    assert res["chosen"]["plan_hash"] == first["chosen"]["plan_hash"], "\n".join(lines)
    assert any("keeping the round-0 plan" in line for line in lines), lines


@pytest.mark.slow  # ~80 s; the default suite had reached ~18 min here (prune runs refer to dense in every test)
def test_measured_check_refers_candidates_to_the_dense_model_beside_them(tiny_run, tmp_path, monkeypatch):
    """The device slows down 3x after the dense model is first measured (a board warming up, a
    shared machine getting busy; 3x, so that this host's own phases, up to ~1.9x, cannot hide it).
    A budget that is a share of dense is a ratio: the dense model is measured again beside the
    candidates and they are referred to it, so the search still meets 85 % of dense. Without
    that, every candidate (and the smallest plan, ~56 % of dense x 3) would miss. The table is
    optimistic (a plan saves half what it promises), so the first round misses and the smallest
    plan is measured to bracket the tightening: it too is referred. A budget in milliseconds is
    absolute: nothing is re-measured or scaled."""
    from edgeprune.pipeline import prune_run as prune

    _saving_device(monkeypatch, saving=0.5, drift=3.0)
    common = {
        "weights": tiny_run["weights"],
        "device": _steady_device(tiny_run, tmp_path),
        "table": tiny_run["table"],
        "search": "random",
        "evals": 6,
        "measure_top": 2,
    }
    lines: list[str] = []
    res = prune(tmp_path / "share", budget="85%", progress=False, log=lines.append, max_rounds=8, **common)
    assert res["met_budget"] and res["chosen"]["measured_ms"] <= res["budget_ms"], "\n".join(lines)
    store = RunStore(tmp_path / "share")
    dense_ms = res["dense"]["measured_ms"]
    for m in store.measurements():  # ~3 (1.0 without the drift), times what the host's phases add
        assert 1.5 < m["dense_beside_ms"] / dense_ms < 6, (m, dense_ms)
        assert m["raw_ms"] / m["measured_ms"] == pytest.approx(m["dense_beside_ms"] / dense_ms)
    assert any("scaled by" in line for line in lines), lines
    assert res["rounds"] >= 2 and any("no candidate met" in line for line in lines), lines
    smallest = store.get("smallest_plan_ms")  # measured after the first round missed; referred like the candidates
    assert smallest is not None and smallest < dense_ms, (smallest, dense_ms)  # unreferred: ~3 x 0.8

    # this host's phases must not move an absolute budget's dense model: it is pinned
    _saving_device(monkeypatch, saving=0.5, drift=3.0, pin={"dense_ms": dense_ms})
    res = prune(tmp_path / "ms", budget=str(dense_ms * 0.85), max_rounds=0, progress=False, log=lines.append, **common)
    rows = RunStore(tmp_path / "ms").measurements()
    assert rows and all(m["dense_beside_ms"] is None and m["raw_ms"] == m["measured_ms"] for m in rows)
    assert not res["met_budget"]  # 3x slower than at the start, against an absolute budget


def test_measured_check_says_where_pruned_plans_measure_slower_than_dense(tiny_run, tmp_path, monkeypatch):
    """On this device pruning makes plans slower (what a runtime does to channel counts its fast
    kernels do not cover): measured beside the dense model, the candidates are slower than it,
    and the run says so instead of only missing the budget."""
    from edgeprune.pipeline import prune_run as prune

    _saving_device(monkeypatch, saving=-3.0)  # a plan ~15 % faster here measures ~45 % slower
    lines: list[str] = []
    res = prune(
        tmp_path / "run",
        weights=tiny_run["weights"],
        device=tiny_run["device"],
        table=tiny_run["table"],
        budget="80%",
        search="random",
        evals=2,
        measure_top=2,
        max_rounds=0,
        progress=False,
        log=lines.append,
    )
    assert not res["met_budget"], "\n".join(lines)
    said = [line for line in lines if "measure slower than the dense model beside them" in line]
    assert said and "slower kernels" in said[0], "\n".join(lines)
    rows = RunStore(tmp_path / "run").measurements()
    assert all(m["raw_ms"] > m["dense_beside_ms"] for m in rows), rows


def test_short_training_proxy_scores_what_a_few_distilled_steps_recover(tiny_run, digits16):
    from edgeprune.checkpoint import load_checkpoint

    base = load_checkpoint(tiny_run["weights"]).build().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    s = space(base, torch.randn(1, 1, 16, 16), step=8)
    narrow = [max(8, c // 4 // 8 * 8) for c in s.full_counts()]
    from edgeprune.task import Task

    task = Task.classification_on(digits16, heldout_images=300)
    recalibrated = ProxyEvaluator(s, task)
    trained = ProxyEvaluator(s, task, train_steps=15)
    assert len(trained.train_batches) == 15
    score = trained(narrow)
    assert score > recalibrated(narrow) + 0.05, (score, recalibrated(narrow))
    # the candidate trains on a copy: the dense model the search prunes is untouched
    assert all(torch.equal(before[k], v) for k, v in s.base.state_dict().items())
    # the training batches and the teacher's targets are drawn once: a plan's score is reproducible
    again = ProxyEvaluator(s, task, train_steps=15)
    assert again(narrow) == score and trained.cache[trained.plan(narrow).hash()] == score


def test_prune_errors_are_one_line(tiny_run, tmp_path, cli):
    r = cli(*prune_args(tiny_run, tmp_path / "a", budget_ms="0.0001"))
    assert r.returncode == 2 and "is out of reach" in r.stderr and "Traceback" not in r.stderr
    # a table profiled on another device setup: one warning line that says what to do, no Python warning
    other = json.loads(Path(tiny_run["table"]).read_text())
    other["fingerprint"]["cpu"] = "another CPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = cli(*prune_args({**tiny_run, "table": str(tmp_path / "other.json")}, tmp_path / "b", budget_ms="100"))
    assert r.returncode == 2 and "nothing to prune" in r.stderr  # 100 ms: over the dense model as measured
    warned = [line for line in r.stdout.splitlines() if "profiled on another device setup" in line]
    assert len(warned) == 1 and "cpu: another CPU !=" in warned[0], r.stdout
    assert f"edgeprune profile --weights {tiny_run['weights']} --device {tiny_run['device']}" in warned[0]
    assert "UserWarning" not in r.stdout + r.stderr, r.stderr
    r = cli(*prune_args(tiny_run, tmp_path / "c", budget_ms="50%", search="annealing"))
    assert r.returncode == 2 and "unknown search 'annealing'" in r.stderr
    r = cli(*prune_args(tiny_run, tmp_path / "f", budget_ms="80%"), "--loosen", "5")
    assert r.returncode == 2 and "--loosen must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
    r = cli(*prune_args(tiny_run, tmp_path / "e", budget_ms="80%", proxy_steps=-1))
    assert r.returncode == 2 and "--proxy-steps must be at least 0" in r.stderr and "Traceback" not in r.stderr
    r = cli("prune", "--out", str(tmp_path / "d"), "--resume")
    assert r.returncode == 2 and "no pruning run to resume" in r.stderr


@pytest.mark.slow  # a Ray start and two scoring workers; tests/test_knapsack.py kills and resumes a prune by default
def test_prune_resumes_after_kill_9(tiny_run, tmp_path, cli):
    """A run scoring its candidates on a local Ray of two workers is killed (the driver: SIGKILL);
    resumed without workers, it loses and rewrites nothing (the driver alone wrote the store)."""
    out = tmp_path / "run"
    args = prune_args(tiny_run, out, budget_ms="80%", search="bo", evals=16, measure_top=2, workers=2)
    db_path = out / "evals.sqlite"
    kept = kill_prune_after(args, db_path, 12)  # past the Sobol starts, inside the GP phase
    assert len(kept) >= 12
    r = cli(*prune_args(tiny_run, out, evals=16), "--resume", "--json")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db_path) as db:
        after = [tuple(r) for r in db.execute("SELECT i, counts, score FROM evals ORDER BY i")]
        first_round = db.execute("SELECT COUNT(*) FROM evals WHERE duplicate = 0 AND round = 0").fetchone()[0]
        distinct = db.execute("SELECT COUNT(*) FROM evals WHERE duplicate = 0").fetchone()[0]
    assert after[: len(kept)] == kept  # nothing lost, nothing rewritten
    # the search continued to the requested count; a tightening round, if one ran, adds its own
    assert first_round == 16 and json.loads(r.stdout)["evals"] == distinct
    assert f"resumed: {sum(1 for _ in kept)}" in r.stderr or "resumed:" in r.stderr


def test_tightening_follows_the_measured_plans():
    from edgeprune.search.measured import tightened_budget as _tightened

    # latency far from proportional to cost: 50 % of the MACs still costs 75 % of the time
    points = [(1.0, 0.49), (0.5, 0.37), (0.12, 0.21)]
    first = _tightened(0.5, 0.25, points, rounds=[(0.5, 0.37)])
    scaled = 0.5 * 0.25 / 0.37
    interpolated = 0.12 + (0.25 - 0.21) * (0.5 - 0.12) / (0.37 - 0.21)
    assert first == pytest.approx(0.995 * max(scaled, interpolated))  # the gentle step first
    # second round measured 0.30 at 0.34: the secant through both rounds, inside the bracket
    second = _tightened(first, 0.25, [*points, (0.34, 0.30)], rounds=[(0.5, 0.37), (0.34, 0.30)])
    secant = 0.34 - (0.30 - 0.25) * (0.5 - 0.34) / (0.37 - 0.30)
    assert second == pytest.approx(0.995 * secant) and 0.12 < second < 0.34
    # a near miss (measured 1 % over): a gentle step, not a jump to the interpolation
    near = _tightened(0.2467, 0.2467, [(0.49, 0.49), (0.2, 0.21), (0.2467, 0.2492)], rounds=[(0.2467, 0.2492)])
    assert 0.2467 * 0.98 < near <= 0.2467 * 0.99
    # noise tilted the rounds the wrong way (the tighter round measured slower): halfway to the bold step
    rounds = [(0.5, 0.37), (0.45, 0.38)]
    tilted = _tightened(0.45, 0.25, [*points, (0.45, 0.38)], rounds=rounds)
    lo = 0.12 + (0.25 - 0.21) * (0.45 - 0.12) / (0.38 - 0.21)
    assert tilted == pytest.approx(0.995 * (lo + 0.45 * 0.25 / 0.38) / 2)
    # three rounds: the least-squares line, not the secant through the last two
    rounds = [(0.5, 0.38), (0.42, 0.33), (0.36, 0.31)]
    third = _tightened(0.36, 0.25, [(1.0, 0.49), (0.12, 0.21), *rounds], rounds=rounds)
    slope, icept = np.polyfit(*np.array(rounds).T, 1)
    assert third == pytest.approx(0.995 * (0.25 - icept) / slope)
    assert third < 0.995 * 0.36 * 0.25 / 0.31 and third > 0.995 * (0.12 + 0.04 * 0.24 / 0.10)  # inside the bracket


def test_loosening_interpolates_toward_the_target():
    from edgeprune.search.measured import loosened_budget as _loosened

    # the costliest plan in (0.6 -> 0.20 ms) and the next point over (dense, 1.0 -> 0.50 ms)
    points = [(1.0, 0.50), (0.6, 0.20), (0.5, 0.18)]
    assert _loosened(0.6, 0.30, points) == pytest.approx(0.995 * (0.6 + 0.10 * 0.4 / 0.30))
    # a plan that measured over between them bounds the step instead of the dense model
    assert _loosened(0.6, 0.30, [*points, (0.7, 0.34)]) == pytest.approx(0.995 * (0.6 + 0.10 * 0.1 / 0.14))
    assert _loosened(0.73, 0.30, points) is None  # less than 1 % looser: not worth a round
    assert _loosened(0.6, 0.15, points) is None  # nothing measured in


def test_after_loosening_a_plan_within_the_proxy_s_resolution_spends_the_budget():
    """The loosened round's plans compete with the best of many more evaluations. Where the proxy
    cannot tell the two apart, the looser plan is kept: it has more channels in the same budget.
    (bench/README: on three loosened runs the earlier plans won by 0.25-1.05 points on 2,000 images;
    finetuned 30 epochs, the looser plans were +0.22, -0.01 and (resnet56, 21 epochs) +0.37 points.)"""
    from edgeprune.search.measured import after_loosening as _after_loosening
    from edgeprune.task import Task

    def on(images):
        return Task(score=None, train=None, loss=None, images=images)

    assert on(10_000).resolution(0.5) == pytest.approx(0.01)
    assert on(2000).resolution(0.818) == pytest.approx(2 * (0.818 * 0.182 / 2000) ** 0.5)
    earlier = ({"score": 0.818}, {"round": 0, "measured_ms": 0.219})
    looser = ({"score": 0.8075}, {"round": 1, "measured_ms": 0.262})
    worse = ({"score": 0.79}, {"round": 1, "measured_ms": 0.265})
    lines: list[str] = []
    assert _after_loosening(earlier, [earlier, worse, looser], 1, on(2000), 0.276, lines.append) is looser
    assert "within the proxy's resolution (1.7% on 2000 held-out images)" in lines[-1]
    # told apart: 2.8 points is more than the resolution on 2000 images, or 1.05 points on 20000
    assert _after_loosening(earlier, [earlier, worse], 1, on(2000), 0.276, lines.append) is earlier
    assert "scored lower" in lines[-1]
    assert _after_loosening(earlier, [earlier, looser], 1, on(20_000), 0.276, lines.append) is earlier
    # nothing of the looser round measured within the target
    assert _after_loosening(earlier, [earlier], 1, on(2000), 0.276, lines.append) is earlier
    assert "measured over 0.276 ms" in lines[-1]


@pytest.mark.slow  # ~32 s: an edge of the measured check
def test_a_table_that_rates_every_plan_over_the_budget_is_held_against_the_device(tiny_run, tmp_path, cli):
    """A line fitted while the device was busy can come out flat: here it rates the smallest plan at
    95 % of the dense model, which measures ~56 %. A 75 % budget is not refused on the table's word:
    the smallest plan is measured, meets the target, and the search budget is mapped through it and
    the dense model. A budget the smallest plan measures over is refused, with that measurement."""
    t = LatencyTable.load(tiny_run["table"])
    s = space(build_model("resnet20", in_channels=1), torch.randn(1, 1, 16, 16), step=8)
    predictor = Predictor(ModelLayers.from_model(s), t)
    probe = BudgetProblem.create(s, predictor.compiled().unit_sum, 0.0, check=False)
    smallest_counts, smallest_sum = probe.smallest()
    dense_sum, dense_line = predictor.unit_sum(), predictor.predict()
    a = 0.05 * dense_line / (dense_sum - smallest_sum)
    # the same at the dense end; a line this wrong misses its own points, which prune repeats
    t.calibration = {**t.calibration, "a": a, "b": dense_line - a * dense_sum, "fit_median_abs_err": 0.08}
    t.save(tmp_path / "flat.json")
    run = {**tiny_run, "table": str(tmp_path / "flat.json")}
    args = prune_args(run, tmp_path / "run", budget_ms="75%", search="uniform", evals=1, measure_top=1)
    r = cli(*args, "--max-rounds", "0", "--json")
    assert r.returncode == 0, r.stderr
    res, log = json.loads(r.stdout), " ".join(r.stderr.split())
    assert "the table rates even the smallest plan of the space over the budget" in log
    assert "the table's line is off at this end" in log and "--recalibrate" in log
    assert "misses its own whole-model measurements by a median 8.0%" in log
    smallest_ms, dense_ms, target = res["smallest_plan_ms"], res["dense"]["measured_ms"], res["target_ms"]
    assert smallest_ms <= target
    # the budget interpolated between the two measured ends, in the table's (anchored) units
    cost_small, cost_dense = res["anchor"] * (a * smallest_sum + t.calibration["b"]), res["anchor"] * dense_line
    mapped = cost_small + (target - smallest_ms) * (cost_dense - cost_small) / (dense_ms - smallest_ms)
    assert res["search_budget"] == pytest.approx(max(cost_small, 0.995 * mapped), rel=1e-6)
    assert cost_small <= res["search_budget"] < cost_dense
    # a budget under what the smallest plan measures: refused on that measurement, no run left behind
    r = cli(*prune_args(run, tmp_path / "low", budget_ms="30%"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is out of reach on fast-ort: the smallest plan this search space reaches measures" in " ".join(
        r.stderr.split()
    )
    assert not (tmp_path / "low" / "config.json").exists()
    again = prune_args(run, tmp_path / "low", budget_ms="85%", search="uniform", evals=1, measure_top=1)
    r = cli(*again, "--max-rounds", "0")
    assert r.returncode == 0, r.stderr  # the corrected command just works, no --resume needed


def test_a_table_low_at_the_dense_end_still_prunes_a_share_of_dense(tiny_run, tmp_path, cli):
    """The table's line predicts the dense model at 2/3 of its own measurement of it (as a profile
    caught in a host's slow phase can): a 92 % budget is not 'nothing to prune' (the dense model
    measures over it); the search starts at 92 % of the *predicted* dense, so it does not admit
    plans the table itself rates as slow as the dense model."""
    t = LatencyTable.load(tiny_run["table"])
    s = space(build_model("resnet20", in_channels=1), torch.randn(1, 1, 16, 16), step=8)
    predicted = Predictor(ModelLayers.from_model(s), t).predict()
    t.meta["calibration_points"][calibration_key(s.full_counts())]["measured_ms"] = 1.5 * predicted
    t.save(tmp_path / "low.json")
    run = {**tiny_run, "table": str(tmp_path / "low.json")}
    args = prune_args(run, tmp_path / "run", budget_ms="92%", search="uniform", evals=1, measure_top=1)
    r = cli(*args, "--max-rounds", "0", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["search_budget"] == pytest.approx(0.92 * 0.98 * res["dense"]["measured_ms"] / 1.5, rel=1e-6)
    assert "the search budget starts at the same share of the prediction" in " ".join(r.stderr.split())
    # where the dense model measures within the budget there is nothing to prune, whatever the table says
    r = cli(*prune_args(run, tmp_path / "again", budget_ms="100"))  # ms: over the dense model
    assert r.returncode == 2 and "budget less its 2% margin: nothing to prune" in " ".join(r.stderr.split()), r.stderr
