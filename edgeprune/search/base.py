"""The ask/tell interface every searcher implements.

A searcher proposes points in the unit cube of a BudgetProblem (`ask`); the search loop repairs
each to the budget, scores it and hands back the evaluation (`tell`), realised point included, so
the searcher learns where its candidate really landed. A searcher's proposals depend only on its
seed and what it was told: a resumed run replays the stored evaluations and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgeprune.search.problem import BudgetProblem


@dataclass
class Evaluation:
    u_raw: np.ndarray  # what the searcher asked for
    u: np.ndarray  # where repair put it
    counts: np.ndarray  # keep-count per group
    cost: float  # predicted ms, or MACs share
    score: float  # proxy accuracy


class Searcher:
    name: ClassVar[str] = ""
    fill: ClassVar[bool] = True  # repair spends the leftover budget greedily

    def __init__(self, problem: BudgetProblem, *, evals: int, seed: int = 0) -> None:
        self.problem = problem
        self.evals = evals
        self.seed = seed
        self.history: list[Evaluation] = []
        self.seen: set[tuple[int, ...]] = set()

    def ask(self) -> np.ndarray:
        """The next candidate, a point in [0, 1]^dim."""
        raise NotImplementedError

    def tell(self, evaluation: Evaluation) -> None:
        self.history.append(evaluation)
        self.seen.add(tuple(int(c) for c in evaluation.counts))

    def replay(self, evaluation: Evaluation) -> None:
        """Re-enter a stored evaluation on resume (ask first, so any random state advances as before)."""
        self.ask()
        self.tell(evaluation)

    @property
    def done(self) -> bool:
        """True when the searcher has nothing new to propose."""
        return False

    # ----- views of the history -----
    @property
    def n(self) -> int:
        return len(self.history)

    def X(self) -> np.ndarray:
        return np.array([e.u for e in self.history]).reshape(-1, self.problem.dim)

    def Y(self) -> np.ndarray:
        return np.array([e.score for e in self.history])

    def feasible(self) -> np.ndarray:
        """Which evaluations fit the problem's current budget (it may have been tightened)."""
        return np.array([e.cost <= self.problem.budget * (1 + 1e-9) for e in self.history], bool)

    def ranked(self) -> list[int]:
        """Indices of evaluations, best score first, feasible ones before the rest."""
        feasible = self.feasible()
        return sorted(range(self.n), key=lambda i: (not feasible[i], -self.history[i].score))

    def state(self) -> dict:
        """What a progress line or the run log may show about the searcher."""
        return {}
