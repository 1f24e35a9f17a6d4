"""The ask/tell interface every searcher implements.

A searcher proposes points in the unit cube of a BudgetProblem (`ask`); the search loop repairs
each to the budget, scores it and hands back the evaluation (`tell`), realised point included, so
the searcher learns where its candidate really landed. A searcher's proposals depend only on its
seed and what it was told: a resumed run replays the stored evaluations and carries on.

A batch of q candidates (scored in parallel) is asked one by one before any is told: each ask
sees the batch's earlier proposals as `pending` (their plans are taken, their points count for
the random state), so a batch is q distinct plans, and with q = 1 every searcher proposes
exactly what it proposes alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgeprune.search.problem import BudgetProblem


@dataclass
class Evaluation:
    u_raw: np.ndarray  # what the searcher asked for
    u: np.ndarray  # where repair put it
    counts: np.ndarray  # keep-count per group
    cost: float  # predicted ms, or MACs share
    score: float  # proxy accuracy


@dataclass
class SearchContext:
    """What a model-aware searcher (knapsack, darts) needs beyond the problem, whose space holds the
    base model: the task (training batches, loss), the criterion that picks a group's channels (so
    its values and masks agree with the plans scored), where to log, and whether to show progress."""

    task: Any
    criterion: str = "l2"
    seed: int = 0
    log: Callable[[str], None] = print
    progress: bool = False


class Searcher:
    name: ClassVar[str] = ""
    fill: ClassVar[bool] = True  # repair spends the leftover budget greedily

    def __init__(self, problem: BudgetProblem, *, evals: int, seed: int = 0, starts=()) -> None:
        self.problem = problem
        self.evals = evals
        self.seed = seed
        self.history: list[Evaluation] = []
        self.seen: set[tuple[int, ...]] = set()
        self.pending: list[tuple[np.ndarray, tuple[int, ...]]] = []  # the batch asked, not yet told: (u, counts)
        # a warm start: points another searcher found (the knapsack's plans), proposed first in place of
        # as many of this searcher's own starts (BO's Sobol points, PSO's random particles)
        self.starts: list[np.ndarray] = [np.asarray(u, float) for u in starts]

    def ask(self) -> np.ndarray:
        """The next candidate, a point in [0, 1]^dim."""
        raise NotImplementedError

    def pend(self, u: np.ndarray, counts) -> None:
        """Hold a proposal of the batch being asked (where repair put it, and its plan) until it is
        told; the batch is told in the order it was asked."""
        self.pending.append((np.asarray(u, float), tuple(int(c) for c in counts)))

    def ask_batch(self, n: int) -> list[np.ndarray]:
        """`n` proposals asked as one batch, each held as pending where repair puts its plan (what
        the search loop does, without scoring)."""
        points = []
        for _ in range(n):
            u = self.ask()
            self.pend(u, self.problem.repair(u[None], fill=self.fill).counts[0])
            points.append(u)
        return points

    def room(self) -> int:
        """How many more proposals the batch being asked may take before the searcher must be told."""
        return 1 << 30

    @property
    def asked(self) -> int:
        """Proposals so far, the pending ones included: what a proposal's random state is keyed by."""
        return self.n + len(self.pending)

    def taken(self) -> set[tuple[int, ...]]:
        """Plans a new proposal must avoid: those scored and those of the batch being asked."""
        return self.seen | {counts for _, counts in self.pending}

    def tell(self, evaluation: Evaluation) -> None:
        self.history.append(evaluation)
        self.seen.add(tuple(int(c) for c in evaluation.counts))
        if self.pending:
            self.pending.pop(0)

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
