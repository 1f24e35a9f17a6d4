"""--search darts: keep-count distributions learnt by gradient descent, the latency table as a loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.predictor import Predictor
from edgeprune.latency.table import LatencyTable
from edgeprune.models import build_model
from edgeprune.pruning import space
from edgeprune.search import BudgetProblem, FlopsCost, LatencyCost, Uniform
from edgeprune.search.base import Evaluation, SearchContext
from edgeprune.search.darts import DifferentiableWidths, ExpectedCost, WidthLogits, starting_lean
from edgeprune.search.marginal import MarginalCosts

BUDGET = 0.7  # of the dense model's predicted latency: the tiny table's smallest plan predicts ~40-55 % of dense


@pytest.fixture(scope="module")
def r20(tiny_run, digits16):
    """resnet20 trained briefly on digits at 16x16, its latency problem at 80 % of dense, its task."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.task import Task

    base = load_checkpoint(tiny_run["weights"]).build().eval()
    s = space(base, torch.randn(1, 1, 16, 16), step=8)
    cost = LatencyCost(Predictor(ModelLayers.from_model(s), LatencyTable.load(tiny_run["table"])).compiled())
    dense = float(cost(np.asarray([s.full_counts()]))[0])
    problem = BudgetProblem.create(s, cost, BUDGET * dense, unit="ms")
    return problem, Task.classification_on(digits16, heldout_images=300)


def darts(problem, task, *, steps: int, seed: int = 0, evals: int = 4, log=None) -> DifferentiableWidths:
    context = SearchContext(task=task, log=log if log is not None else (lambda s: None))
    return DifferentiableWidths(problem, evals=evals, seed=seed, context=context, steps=steps)


@pytest.fixture(scope="module")
def learnt(r20):
    """A full optimisation (the expensive part, ~10 s), shared by the tests that read its outcome."""
    problem, task = r20
    before = {k: v.clone() for k, v in problem.space.base.state_dict().items()}
    logs: list[str] = []
    searcher = darts(problem, task, steps=60, log=logs.append)
    u = searcher.ask()
    return searcher, u, logs, before


def test_lands_within_the_budget_and_uses_most_of_it(r20, learnt):
    problem, _ = r20
    searcher, u, logs, _ = learnt
    repaired = problem.repair(u[None], fill=searcher.fill)
    assert repaired.cost[0] <= problem.budget
    assert repaired.cost[0] > 0.85 * problem.budget
    # the plan is fitted to the budget already: the loop's repair has nothing left to do
    assert tuple(repaired.counts[0]) == tuple(searcher.plan())
    assert len(logs) == 1 and logs[0].startswith("darts: 60 steps in")


def test_expected_cost_comes_down_to_the_budget(r20, learnt):
    problem, _ = r20
    trace = learnt[0].trace
    assert len(trace) == 60 and [r.step for r in trace] == list(range(60))
    expected = np.array([r.expected_cost for r in trace]) / problem.budget
    assert expected[0] > 1.15  # the logits start near the dense model
    assert expected[:15].mean() > expected[-15:].mean() + 0.08  # it comes down
    assert abs(expected[-10:].mean() - 1) < 0.08, expected[-10:]  # to the budget
    assert trace[-1].temperature == pytest.approx(0.5) and trace[0].temperature == 1.0


def test_the_plan_is_learnt_not_uniform(r20, learnt):
    problem, _ = r20
    plan = learnt[0].plan()
    widths = np.array([problem.space.groups[g].width for g in problem.variables])
    ratios = plan[problem.variables] / widths
    uniform = problem.repair(Uniform(problem, evals=1).ask()[None], fill=False).counts[0]
    assert tuple(plan) != tuple(uniform)
    assert ratios.max() - ratios.min() >= 0.25, ratios  # groups are pruned unevenly


def test_the_base_model_is_untouched(r20, learnt):
    problem, _ = r20
    before = learnt[3]
    base = problem.space.base
    assert not base.training
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_deterministic_for_a_seed(r20, learnt):
    problem, task = r20
    a, b = (darts(problem, task, steps=6, seed=1) for _ in range(2))
    a.ask(), b.ask()
    assert [(r.task_loss, r.expected_cost) for r in a.trace] == [(r.task_loss, r.expected_cost) for r in b.trace]
    assert all(torch.equal(x, y) for x, y in zip(a.logits.logits, b.logits.logits))
    # another seed distils on other batches (the first step's loss: same logits, schedule and teacher)
    assert a.trace[0].task_loss != learnt[0].trace[0].task_loss


def test_later_asks_are_distinct_fitted_samples_and_replay_alike(r20, learnt):
    """Asks after the first draw plans from the learnt distributions, fitted to the budget and new;
    a run resumed from its store (a fresh searcher, the evaluations replayed as ask then tell)
    proposes the same. The replaying searcher is handed the learnt logits (determinism of the
    optimisation itself is tested above): what is tested here is that proposals follow the count."""
    problem, task = r20
    searcher, u0 = learnt[0], learnt[1]

    def propose(s, u):
        rep = problem.repair(u[None], fill=s.fill)
        s.tell(Evaluation(u, rep.u[0], rep.counts[0], float(rep.cost[0]), 0.0))
        return tuple(int(c) for c in rep.counts[0]), float(rep.cost[0])

    first = [propose(searcher, u0)] + [propose(searcher, searcher.ask()) for _ in range(4)]
    assert len({p for p, _ in first}) == 5
    assert all(0.85 * problem.budget < c <= problem.budget for _, c in first)
    resumed = darts(problem, task, steps=60, seed=0)
    resumed.logits, resumed.trace = searcher.logits, searcher.trace
    for e in searcher.history:  # SearchLoop's replay: ask, then tell what was stored
        assert np.array_equal(resumed.ask(), e.u_raw)
        resumed.tell(e)
    assert np.array_equal(searcher.ask(), resumed.ask())


def test_expected_cost_is_the_marginal_linearisation(r20):
    """At one-hot probabilities the expected cost is MarginalCosts' estimate of that choice, and
    at the reference plan the problem's own cost; one-hot soft masks are the plan's hard masks."""
    problem, task = r20
    searcher = darts(problem, task, steps=1)
    logits = WidthLogits(problem, searcher.masks, lean=4.0)
    rng = np.random.default_rng(0)
    picks = [int(rng.integers(len(c))) for c in logits.choices]
    ref = logits.counts(problem, logits.picks())
    cost = ExpectedCost(problem, ref)
    one_hot = [F.one_hot(torch.tensor(i), len(c)).float() for i, c in zip(picks, logits.choices)]
    assert float(cost(one_hot)) == pytest.approx(MarginalCosts.around(problem, ref).estimate(picks), rel=1e-5)
    at_ref = [
        torch.nn.functional.one_hot(torch.tensor(i), len(c)).float() for i, c in zip(logits.picks(), logits.choices)
    ]
    assert float(cost(at_ref)) == pytest.approx(float(problem.cost(ref[None])[0]), rel=1e-5)
    hard = searcher.masks.hard(logits.counts(problem, picks))
    soft = logits.soft_masks(one_hot)
    assert all(torch.equal(soft[g], hard[g]) for g in problem.variables)


def test_straight_through_runs_a_plan_and_carries_the_softmax_gradient(r20):
    """The default relaxation: forward, one-hot choices (a real plan, whose masks are its hard
    masks); backward, the gradient of the Gumbel-softmax sample; drawn from softmax(alpha / tau)."""
    problem, task = r20
    searcher = darts(problem, task, steps=1)
    logits = WidthLogits(problem, searcher.masks, lean=4.0)
    generator = torch.Generator().manual_seed(0)
    sample = logits.straight_through(0.5, generator)
    assert all(set(v.detach().tolist()) <= {0.0, 1.0} and v.sum() == 1 for v in sample)
    sum(v[-1] for v in sample).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in logits.logits)
    # the draws follow the softmax: the widest (most likely at the start) is drawn most often
    top = logits.logits[0].detach().argmax()
    draws = [int(logits.straight_through(1.0, generator)[0].argmax()) for _ in range(200)]
    assert max(set(draws), key=draws.count) == int(top)


def test_a_tight_budget_starts_its_expected_cost_nearer(r20):
    """From near the dense model a tight budget is too far for the steps given: the logits lean
    less, so that the expected cost starts at `start` x the budget; a loose one keeps the lean."""
    problem, task = r20
    tight = BudgetProblem.create(problem.space, problem.cost, problem.budget * 0.5 / BUDGET, unit="ms")
    searcher = darts(tight, task, steps=1)
    for p, lean in ((tight, None), (problem, 4.0)):
        logits = WidthLogits(p, searcher.masks, lean=4.0)
        got = starting_lean(p, logits, most=4.0, start=1.3, tau=1.0)
        with torch.no_grad():
            expected = float(ExpectedCost(p, logits.counts(p, logits.picks()))(logits.probs(1.0)))
        if lean is None:
            assert got < 4.0 and expected == pytest.approx(1.3 * p.budget, rel=1e-3)
        else:
            assert got == lean and expected < 1.3 * p.budget


def test_the_mixture_relaxation_runs_too(r20):
    problem, task = r20
    context = SearchContext(task=task, log=lambda s: None)
    searcher = DifferentiableWidths(problem, evals=1, context=context, steps=3, relaxation="expected")
    u = searcher.ask()
    assert len(searcher.trace) == 3 and problem.repair(u[None]).cost[0] <= problem.budget
    with pytest.raises(EdgepruneError, match="unknown darts relaxation 'hard'; choose one of: gumbel, expected"):
        DifferentiableWidths(problem, evals=1, context=context, relaxation="hard")


def test_with_depth_a_block_is_a_gated_choice_and_the_plan_fits(tiny_run, digits16):
    """With --depth, keep-count 0 of a block's inner group removes the block: a gate the sampled
    plans open or close; at a budget width pruning alone cannot reach, the plan removes blocks."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.task import Task

    base = load_checkpoint(tiny_run["weights"]).build().eval()
    s = space(base, torch.randn(1, 1, 16, 16), step=8, depth=True)
    cost = LatencyCost(Predictor(ModelLayers.from_model(s), LatencyTable.load(tiny_run["table"])).compiled())
    widths_only = space(base, torch.randn(1, 1, 16, 16), step=8)
    smallest = float(
        LatencyCost(Predictor(ModelLayers.from_model(widths_only), LatencyTable.load(tiny_run["table"])).compiled())(
            np.asarray([widths_only.min_counts()])
        )[0]
    )
    problem = BudgetProblem.create(s, cost, 0.95 * smallest, unit="ms")
    task = Task.classification_on(digits16, heldout_images=300)
    searcher = darts(problem, task, steps=20)
    counts = problem.repair(searcher.ask()[None], fill=searcher.fill).counts[0]
    assert float(cost(counts[None])[0]) <= problem.budget
    gated = [g for g in problem.variables if s.groups[g].allowed[0] == 0]
    assert gated and set(searcher.logits.soft_gates([F.one_hot(torch.tensor(0), len(c)).float()
                                                     for c in searcher.logits.choices])) == set(gated)  # fmt: skip
    assert any(counts[g] == 0 for g in gated)  # below every width-only plan: some block is removed


def test_refuses_a_missing_task():
    flat = space(build_model("resnet20", in_channels=1).eval(), torch.randn(1, 1, 16, 16), step=8)
    with pytest.raises(EdgepruneError, match="needs the model's task"):
        DifferentiableWidths(BudgetProblem.create(flat, FlopsCost(flat.cost, flat.macs()), 0.5), evals=2)
