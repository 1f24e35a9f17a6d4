"""The latency-saliency knapsack (HALP-style): the DP, the solver on toy and real tables, masks and
saliency it rests on, and the searcher in a prune run (budget, determinism, resume after kill -9)."""

import itertools
import json
import sqlite3

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.predictor import Predictor
from edgeprune.latency.table import LatencyTable
from edgeprune.models import build_model
from edgeprune.pruning import space
from edgeprune.pruning.masks import ChannelMasks
from edgeprune.search import BudgetProblem, LatencyCost, SearchContext, make_searcher
from edgeprune.search.knapsack import KnapsackSolver, capped, knapsack_starts, solve_knapsack
from edgeprune.search.marginal import MarginalCosts
from edgeprune.search.saliency import count_values, taylor_saliency
from edgeprune.task import make_task

from .test_search import kill_prune_after, prune_args


def brute_force(values, weights, capacity):
    best = (-np.inf, None)
    for picks in itertools.product(*[range(len(v)) for v in values]):
        if sum(w[i] for w, i in zip(weights, picks)) <= capacity + 1e-9:
            best = max(best, (sum(v[i] for v, i in zip(values, picks)), picks))
    return best


def test_knapsack_dp_is_exact_and_never_over_capacity():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 5))
        values = [rng.random(int(rng.integers(2, 5))) * 10 for _ in range(n)]
        weights = [rng.integers(0, 8, size=len(v)).astype(float) for v in values]
        capacity = float(rng.integers(1, 20))
        picks = solve_knapsack(values, weights, capacity, bins=int(capacity))  # integer weights: exact
        optimum = brute_force(values, weights, capacity)[0]
        if optimum == -np.inf:  # nothing fits: the lightest choice of each
            assert picks == [int(np.argmin(w)) for w in weights]
            continue
        assert sum(w[i] for w, i in zip(weights, picks)) <= capacity
        assert sum(v[i] for v, i in zip(values, picks)) == pytest.approx(optimum)
    # a coarse quantisation rounds weights up: never over, at worst a little under the optimum
    values, weights = [np.array([0.0, 5.0]), np.array([0.0, 4.0])], [np.array([0.0, 0.55]), np.array([0.0, 0.5])]
    assert solve_knapsack(values, weights, 1.0, bins=3) in ([1, 0], [0, 1])
    assert solve_knapsack(values, weights, 1.06, bins=1000) == [1, 1]


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1).eval()
    return space(model, torch.randn(1, 1, 16, 16), step=8, min_keep_ratio=0.1)


def toy_problem(s, per_channel: dict[int, float], budget_share: float):
    """An additive toy cost: each group's channels cost `per_channel[g]` (1 for the others)."""
    w = np.array([per_channel.get(g.index, 1.0) for g in s.groups])
    cost = lambda counts: np.atleast_2d(counts) @ w  # noqa: E731
    dense = float(cost(np.asarray(s.full_counts()))[0])
    return BudgetProblem.create(s, cost, budget_share * dense)


def test_knapsack_prefers_salient_cheap_channels_and_meets_the_budget_exactly(r20):
    # two groups alike in saliency: the cheaper one keeps more; one more salient and as cheap: it wins
    prunable = [g.index for g in r20.groups if g.prunable]
    a, b = prunable[-1], prunable[-2]
    problem = toy_problem(r20, {a: 0.1, b: 10.0}, 0.6)
    choices = MarginalCosts.around(problem, r20.full_counts()).choices
    values = [np.asarray(c, float) for c in choices]  # one unit of saliency per channel, everywhere
    counts = KnapsackSolver(problem).fit(values, problem.budget)
    assert float(problem.cost(counts[None])[0]) <= problem.budget
    assert counts[a] == r20.groups[a].width and counts[b] < r20.groups[b].width
    # every other group costs 1 per channel: salient channels of one of them beat plain ones of another
    c, d = prunable[0], prunable[1]
    problem = toy_problem(r20, {}, 0.6)
    values = [np.asarray(ch, float) * (5.0 if g == c else 1.0) for g, ch in zip(problem.variables, choices)]
    counts = KnapsackSolver(problem).fit(values, problem.budget)
    assert counts[c] / r20.groups[c].width >= counts[d] / r20.groups[d].width
    assert counts[c] == r20.groups[c].width
    assert float(problem.cost(counts[None])[0]) <= problem.budget


def test_a_count_that_costs_as_much_as_a_wider_one_is_never_chosen(r20):
    # a kernel step: in one group every count below the full width costs what the full width costs
    g = next(g.index for g in r20.groups if g.prunable)
    w = np.ones(len(r20.groups))

    def cost(counts):
        counts = np.atleast_2d(counts).astype(float)
        stepped = counts.copy()
        stepped[:, g] = r20.groups[g].width  # as slow as the full width, whatever it keeps
        return stepped @ w

    dense = float(cost(np.asarray(r20.full_counts()))[0])
    problem = BudgetProblem.create(r20, cost, 0.7 * dense)
    choices = MarginalCosts.around(problem, r20.full_counts()).choices
    counts = KnapsackSolver(problem).fit([np.asarray(c, float) for c in choices], problem.budget)
    assert counts[g] == r20.groups[g].width  # pruning it would buy nothing


def test_capped_values_rule_out_growing_back():
    values = [np.array([1.0, 2.0, 3.0])]
    out = capped(values, [np.array([8, 16, 24])], [16])
    assert list(out[0][:2]) == [1.0, 2.0] and out[0][2] == -np.inf


def test_hard_masks_compute_the_pruned_model_blocks_included():
    for name, depth in (("resnet20", True), ("mobilenet_v2_cifar", False)):
        torch.manual_seed(0)
        model = build_model(name, in_channels=1).eval()
        for m in model.modules():  # statistics far from identity, so a wrongly masked channel shows
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.bias.data.normal_()
        s = space(model, torch.randn(1, 1, 28, 28), step=8, min_keep_ratio=0.1, depth=depth)
        masks = ChannelMasks(s, groups=[g.index for g in s.groups if g.prunable], depth=depth)
        rng = np.random.default_rng(3)
        for _ in range(2):
            counts = [int(rng.choice(g.allowed)) for g in s.groups]
            x = torch.randn(4, 1, 28, 28)
            with torch.no_grad(), masks.applied(model, masks.hard(counts), masks.hard_gates(counts)):
                masked = model(x)
            assert torch.allclose(masked, s.plan(counts, criterion="l2").apply(model)(x), atol=1e-5)
    deep = space(build_model("resnet20", in_channels=1).eval(), torch.randn(1, 1, 28, 28), step=8, depth=True)
    with pytest.raises(EdgepruneError, match="without --depth"):
        ChannelMasks(deep, groups=[g.index for g in deep.groups if g.prunable])


@pytest.fixture(scope="module")
def tiny_problem(tiny_run):
    from edgeprune.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run["weights"])
    model = ckpt.build().eval()
    s = space(model, torch.randn(1, 1, 16, 16), step=8, min_keep_ratio=0.1, depth=True)
    table = LatencyTable.load(tiny_run["table"])
    cost = LatencyCost(Predictor(ModelLayers.from_model(s), table).compiled())
    dense = float(cost(np.asarray([s.full_counts()]))[0])
    task = make_task(data="digits:16", heldout_images=200)
    return s, cost, dense, task


def test_taylor_saliency_ranks_channels_and_blocks(tiny_problem):
    s, _, _, task = tiny_problem
    masks = ChannelMasks(s, groups=[g.index for g in s.groups if g.prunable], depth=True)
    sal = taylor_saliency(masks, task, batches=3)
    assert set(sal.channels) == set(masks.groups) and set(sal.blocks) == set(masks.gated) and sal.blocks
    assert all((v >= 0).all() and v.sum() > 0 for v in sal.channels.values())
    # a plan keeps at least the saliency of any plan inside it
    choices = MarginalCosts.around(BudgetProblem.create(s, lambda c: np.atleast_2d(c).sum(1), 1e9, check=False),
                                   s.full_counts()).choices  # fmt: skip
    values = count_values(masks, sal, choices)
    assert all(np.all(np.diff(v[1:]) >= -1e-12) for v in values)  # more channels kept, more saliency kept
    assert all(v[0] < v[-1] for v, c in zip(values, choices) if c[0] == 0)  # removing a block loses its saliency


@pytest.mark.parametrize("rounds", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_knapsack_searcher_meets_the_table_budget_and_is_deterministic(tiny_problem, rounds):
    s, cost, dense, task = tiny_problem
    problem = BudgetProblem.create(s, cost, 0.6 * dense)
    context = SearchContext(task, criterion="l2", log=lambda m: None)
    plans = []
    for _ in range(2):
        k = make_searcher("knapsack", problem, evals=3, seed=1, context=context, rounds=rounds)
        k.steps, k.saliency_batches = 3, 2  # few training steps and batches: digits at 16x16
        u = k.ask()
        repaired = problem.repair(u[None], fill=k.fill)
        assert repaired.cost[0] <= problem.budget and repaired.cost[0] >= 0.9 * problem.budget
        assert np.allclose(repaired.u[0], u)  # the plan fits as proposed: repair leaves it
        plans.append(tuple(repaired.counts[0]))
    assert plans[0] == plans[1]
    with pytest.raises(ValueError, match="SearchContext"):
        make_searcher("knapsack", problem, evals=3)


def test_a_warm_start_is_what_bo_bocr_and_pso_propose_first(tiny_problem):
    """`--warm-start knapsack`: the knapsack's plans are the first proposals of bo and bocr (in place
    of Sobol points, which follow from their first) and among pso's first generation."""
    s, cost, dense, task = tiny_problem
    problem = BudgetProblem.create(s, cost, 0.6 * dense)
    context = SearchContext(task, criterion="l2", log=lambda m: None)
    starts = knapsack_starts(problem, context=context, n=2, seed=0)
    plans = [tuple(problem.repair(u[None], fill=False).counts[0]) for u in starts]
    assert 1 <= len(set(plans)) == len(plans) <= 2  # the plan and a neighbour, distinct
    assert plans[0] == tuple(problem.repair(make_searcher("knapsack", problem, evals=1, context=context).ask()[None],
                                            fill=False).counts[0])  # fmt: skip

    def first(name, n, **kw):
        return make_searcher(name, problem, evals=12, seed=0, **kw).ask_batch(n)

    for name in ("bo", "bocr"):
        warm, cold = first(name, len(starts) + 2, starts=starts), first(name, 2)
        assert np.allclose(warm[: len(starts)], starts) and np.allclose(warm[len(starts) :], cold)
    # a particle whose plan an earlier one took is moved (duplicate elimination): the plan is proposed either way
    swarm = {tuple(problem.repair(u[None], fill=True).counts[0]) for u in first("pso", 10, starts=starts, particles=10)}
    assert {tuple(problem.repair(u[None], fill=True).counts[0]) for u in starts} <= swarm


@pytest.mark.parametrize("search", ["knapsack", pytest.param("darts", marks=pytest.mark.slow)])
def test_new_searchers_resume_after_kill_9(tiny_run, tmp_path, cli, search):
    """A knapsack or darts prune killed after its first evaluations resumes: nothing lost or
    rewritten, and the proposals go on where they stopped (keyed by seed and position; darts
    learns its distributions again, deterministically, before it replays)."""
    out = tmp_path / "run"
    args = prune_args(tiny_run, out, budget_ms="80%", search=search, evals=5, measure_top=2)
    db_path = out / "evals.sqlite"
    kept = kill_prune_after(args, db_path, 2)
    assert len(kept) >= 2
    r = cli(*prune_args(tiny_run, out, evals=5), "--resume", "--json")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db_path) as db:
        after = [tuple(r) for r in db.execute("SELECT i, counts, score FROM evals ORDER BY i")]
    assert after[: len(kept)] == kept and len(after) > len(kept)
    res = json.loads(r.stdout)
    assert res["search"] == search and res["chosen"]["predicted_ms"] is not None


def test_a_warm_started_prune_begins_with_the_knapsack_plan_and_keeps_it_on_resume(tiny_run, tmp_path, cli):
    out = tmp_path / "run"
    args = prune_args(tiny_run, out, budget_ms="80%", search="bocr", evals=4, measure_top=1, warm_start="knapsack")
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert "warm start: the knapsack's plans" in r.stderr
    with sqlite3.connect(out / "evals.sqlite") as db:
        first = [(json.loads(u), c) for u, c in db.execute("SELECT u_raw, counts FROM evals ORDER BY i LIMIT 2")]
        (starts,) = db.execute("SELECT value FROM state WHERE key = 'warm_starts'").fetchone()
    assert np.allclose([u for u, _ in first], json.loads(starts))  # the search's first two proposals
    r = cli(*prune_args(tiny_run, out, evals=6), "--resume", "--json")
    assert r.returncode == 0, r.stderr
    assert "warm start" not in r.stderr  # solved once, kept in the store
    with sqlite3.connect(out / "evals.sqlite") as db:
        again = [(json.loads(u), c) for u, c in db.execute("SELECT u_raw, counts FROM evals ORDER BY i LIMIT 2")]
    assert again == first
