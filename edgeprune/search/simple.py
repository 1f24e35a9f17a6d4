"""The baselines: uniform pruning (one keep ratio for every group) and random feasible plans."""

from __future__ import annotations

import numpy as np

from edgeprune.search.base import Searcher


class Uniform(Searcher):
    """One keep ratio for every free group, bisected to the largest that fits the budget.
    A single candidate: what most pruning tools do, and what a search has to beat."""

    name = "uniform"
    fill = False

    def ratio(self, iterations: int = 40) -> float:
        problem, lo, hi = self.problem, 0.0, 1.0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if problem.cost(problem.counts_of_ratios(np.full((1, problem.dim), mid)))[0] <= problem.budget:
                lo = mid
            else:
                hi = mid
        return lo

    def ask(self) -> np.ndarray:
        return self.problem.to_u(np.full(self.problem.dim, self.ratio()))

    @property
    def done(self) -> bool:
        return self.n >= 1 and tuple(self.history[-1].counts) == tuple(self.problem.counts(self.ask())[0])


class RandomSearch(Searcher):
    """Uniformly random points of the cube, each repaired to the budget."""

    name = "random"

    def ask(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.n]).random(self.problem.dim)
