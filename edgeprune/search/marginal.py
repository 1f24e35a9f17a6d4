"""A plan's cost as a sum over groups, linearised around a reference plan.

The table's latency is not a sum over groups: a conv's time depends on its input and output
widths together. Around a reference plan it is nearly one, though: cost(plan) ~ cost(ref) +
sum over groups of (cost of ref with only that group changed - cost(ref)). That is what a knapsack
needs (each group's choice has its own cost) and what a differentiable search can take an
expectation of (independent choices per group). Every step of the table's kernels is in it (a
count that costs as much as a wider one shows so); the pairs of groups that share a layer are
not, so a solution is re-linearised around itself and checked against the real cost (`KnapsackSolver`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprune.search.problem import BudgetProblem


@dataclass
class MarginalCosts:
    """Per variable group j: its choices (keep-counts), and each choice's cost change from `ref`."""

    ref: np.ndarray  # (G,) the reference keep-counts
    base: float  # cost of the reference plan
    choices: list[np.ndarray]  # per variable: the keep-counts it may take (allowed, up to max_keep)
    delta: list[np.ndarray]  # per variable: cost(ref with this group at each choice) - base

    @classmethod
    def around(cls, problem: BudgetProblem, ref) -> MarginalCosts:
        ref = np.asarray(ref, dtype=np.int64)
        choices = [choices_of(problem, j) for j in range(problem.dim)]
        trials = np.repeat(ref[None], 1 + sum(len(c) for c in choices), axis=0)  # row 0: the reference
        row = 1
        for g, counts in zip(problem.variables, choices):
            trials[row : row + len(counts), g] = counts
            row += len(counts)
        cost = np.asarray(problem.cost(trials), float)
        base, delta, row = float(cost[0]), [], 1
        for counts in choices:
            delta.append(cost[row : row + len(counts)] - cost[0])
            row += len(counts)
        return cls(ref, base, choices, delta)

    def estimate(self, picks: list[int]) -> float:
        """The linearised cost of choosing `picks[j]` (an index into choices[j]) for each variable."""
        return self.base + float(sum(d[i] for d, i in zip(self.delta, picks)))

    def counts(self, problem: BudgetProblem, picks: list[int]) -> np.ndarray:
        """The full keep-counts (G,) of a choice per variable."""
        counts = self.ref.copy()
        for g, c, i in zip(problem.variables, self.choices, picks):
            counts[g] = c[i]
        return counts


def choices_of(problem: BudgetProblem, j: int) -> np.ndarray:
    """The keep-counts variable j may take within the problem's box (max_keep caps the top)."""
    g = problem.variables[j]
    group = problem.space.groups[g]
    allowed = np.asarray(group.allowed)
    top = group.floor(problem.hi[j] * group.width)
    return allowed[allowed <= top]
