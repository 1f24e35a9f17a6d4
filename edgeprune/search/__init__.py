"""Search per-group keep ratios under a budget: the problem (with repair), searchers, the loop.

problem = BudgetProblem.create(space, LatencyCost(predictor.compiled()), budget_ms)
searcher = make_searcher("bocr", problem, evals=60, seed=0, importances=...)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeprune.errors import choices_error
from edgeprune.search.base import Evaluation, SearchContext, Searcher
from edgeprune.search.bo import BayesOpt
from edgeprune.search.bocr import BOCR
from edgeprune.search.clustering import cluster_groups
from edgeprune.search.cost import COSTS, FlopsCost, LatencyCost
from edgeprune.search.darts import DifferentiableWidths
from edgeprune.search.knapsack import Knapsack
from edgeprune.search.loop import SearchLoop
from edgeprune.search.problem import BudgetProblem, Repaired
from edgeprune.search.proxy import ProxyEvaluator
from edgeprune.search.pso import ParticleSwarm
from edgeprune.search.simple import RandomSearch, Uniform

SEARCHERS = {s.name: s for s in (Uniform, RandomSearch, BayesOpt, BOCR, ParticleSwarm, Knapsack, DifferentiableWidths)}
WARM_STARTED = ("bo", "bocr", "pso")  # searchers a warm start's points (--warm-start) can begin with
MODEL_AWARE = ("knapsack", "darts")  # searchers that read the model and the task (a SearchContext), not only the cost


def group_importances(problem: BudgetProblem) -> list[np.ndarray]:
    """Per-channel group L1 importance of each free group (what BOCR clusters)."""
    l1 = problem.space.criterion("l1")
    return [l1.scores(problem.space.groups[g]).numpy() for g in problem.variables]


def make_searcher(
    name: str,
    problem: BudgetProblem,
    *,
    evals: int,
    seed: int = 0,
    clusters: int = 4,
    acp_counts: Sequence[int] | None = None,
    particles: int = 10,
    context: SearchContext | None = None,
    rounds: int = 0,
    starts: Sequence[np.ndarray] = (),
) -> Searcher:
    """A searcher by name: uniform, random, bo, bocr (k = `clusters`), pso (swarm around `acp_counts`),
    knapsack (`rounds` of pruning while training, 0: one shot) and darts, which read the model and
    the task through `context`. `starts`: points bo, bocr and pso propose first (a warm start)."""
    if name not in SEARCHERS:
        raise choices_error("search", name, list(SEARCHERS))
    if name in MODEL_AWARE and context is None:
        raise ValueError(f"the {name} searcher needs a SearchContext (the task whose loss ranks channels)")
    if name == "knapsack":
        return Knapsack(problem, evals=evals, seed=seed, context=context, rounds=rounds)
    if name == "darts":
        return DifferentiableWidths(problem, evals=evals, seed=seed, context=context)
    if name == "bocr":
        labels = cluster_groups(group_importances(problem), clusters)
        return BOCR(problem, evals=evals, seed=seed, labels=labels, starts=starts)
    if name == "pso":
        return ParticleSwarm(problem, evals=evals, seed=seed, particles=particles, acp_counts=acp_counts, starts=starts)
    return SEARCHERS[name](problem, evals=evals, seed=seed, starts=starts if name in WARM_STARTED else ())


__all__ = [
    "BOCR",
    "COSTS",
    "SEARCHERS",
    "WARM_STARTED",
    "BayesOpt",
    "BudgetProblem",
    "Evaluation",
    "DifferentiableWidths",
    "FlopsCost",
    "Knapsack",
    "LatencyCost",
    "ParticleSwarm",
    "ProxyEvaluator",
    "RandomSearch",
    "SearchContext",
    "Repaired",
    "SearchLoop",
    "Searcher",
    "Uniform",
    "cluster_groups",
    "group_importances",
    "make_searcher",
]
