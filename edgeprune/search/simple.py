"""The baselines: uniform pruning (one keep ratio for every group) and random feasible plans."""

from __future__ import annotations

import numpy as np

from edgeprune.search.base import Searcher


class Uniform(Searcher):
    """One keep ratio for every free group, bisected to the largest that fits the budget.
    A single candidate: what most pruning tools do, and what a search has to beat.

    With depth pruning, blocks are removed evenly and only as far as needed: the fewest blocks
    (the last of each stage first, see `even_removal_order`) for which some shared ratio fits,
    every other group at that ratio and at least one channel step."""

    name = "uniform"
    fill = False

    def ratio(self, iterations: int = 40, removed: frozenset[int] = frozenset()) -> float:
        problem, lo, hi = self.problem, 0.0, 1.0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if problem.cost(self._counts(mid, removed))[0] <= problem.budget:
                lo = mid
            else:
                hi = mid
        return lo

    def _gates(self) -> list[int]:
        return [g for g in self.problem.space.gates if g in self.problem.variables]

    def _counts(self, ratio: float, removed: frozenset[int]) -> np.ndarray:
        counts = self.problem.counts_of_ratios(np.full((1, self.problem.dim), ratio))
        for g in self._gates():  # a kept block keeps at least one channel step
            counts[0, g] = 0 if g in removed else max(counts[0, g], self.problem.space.groups[g].allowed[1])
        return counts

    def ask(self) -> np.ndarray:
        problem = self.problem
        gates = self._gates()
        if not gates:
            return problem.to_u(np.full(problem.dim, self.ratio()))
        from edgeprune.pruning.blocks import even_removal_order

        space = problem.space
        order = even_removal_order([space.gates[g] for g in gates], space.base)
        by_block = {space.gates[g]: g for g in gates}
        for k in range(len(order) + 1):
            removed = frozenset(by_block[b] for b in order[:k])
            if problem.cost(self._counts(0.0, removed))[0] <= problem.budget or k == len(order):
                return problem.u_of_counts(self._counts(self.ratio(removed=removed), removed))[0]
        raise AssertionError("unreachable")

    def room(self) -> int:
        return 1 - len(self.pending)  # one candidate

    @property
    def done(self) -> bool:
        return self.n >= 1 and tuple(self.history[-1].counts) == tuple(self.problem.counts(self.ask())[0])


class RandomSearch(Searcher):
    """Uniformly random points of the cube, each repaired to the budget."""

    name = "random"

    def ask(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.asked]).random(self.problem.dim)
