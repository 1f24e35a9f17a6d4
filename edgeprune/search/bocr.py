"""BOCR: Bayesian optimisation with layer clustering and rollback (Fan et al., ECCV 2022).

Phase 1 searches k cluster ratios (groups clustered by their importance distributions share
one ratio) from Sobol starts: few dimensions, so the GP learns fast. When progress stalls (no new
best for `patience` evaluations once `monitor_from` of the evaluations are spent) or at
`rollback_at` of them, it rolls back to one dimension per group: the box shrinks to the range
the best candidates so far span (padded a little), and a fresh GP is fitted on every evaluation,
each at its realised full-dimensional point. The seed constrains FLOPs; here the constraint is
whatever the problem's cost is (predicted latency by default).
"""

from __future__ import annotations

import numpy as np

from edgeprune.search.base import Evaluation
from edgeprune.search.bo import BayesOpt
from edgeprune.search.problem import BudgetProblem


class BOCR(BayesOpt):
    name = "bocr"

    def __init__(
        self,
        problem: BudgetProblem,
        *,
        evals: int,
        labels: np.ndarray,
        seed: int = 0,
        patience: int = 20,
        monitor_from: float = 0.4,
        rollback_at: float = 0.5,
        top: int = 10,
        pad: float = 0.05,
        **kwargs,
    ) -> None:
        self.labels = np.asarray(labels, int)
        if len(self.labels) != problem.dim:
            raise ValueError(f"{len(self.labels)} cluster labels for {problem.dim} search variables")
        self.k = int(self.labels.max()) + 1
        self.clustered = self.k < problem.dim
        self.patience, self.monitor_from, self.rollback_at = patience, monitor_from, rollback_at
        self.top, self.pad = top, pad
        self.since_best = 0
        self.rolled_back_at: int | None = None
        super().__init__(problem, evals=evals, seed=seed, **kwargs)

    @property
    def dim(self) -> int:
        return self.k if self.clustered else self.problem.dim

    def expand(self, z: np.ndarray) -> np.ndarray:
        return z[..., self.labels] if self.clustered else z

    def project(self, u: np.ndarray) -> np.ndarray:
        if not self.clustered:
            return u
        return np.stack([u[..., self.labels == c].mean(-1) for c in range(self.k)], axis=-1)

    def tell(self, evaluation: Evaluation) -> None:
        improved = not self.history or evaluation.score > self.Y().max()
        super().tell(evaluation)
        self.since_best = 0 if improved else self.since_best + 1
        stalled = self.n >= self.monitor_from * self.evals and self.since_best >= self.patience
        if self.clustered and (stalled or self.n >= self.rollback_at * self.evals):
            self.rollback()

    def rollback(self) -> None:
        """Full dimension; the box spanned by the best realised plans so far, padded."""
        best = self.X()[self.ranked()[: self.top]]
        self.box = (np.clip(best.min(0) - self.pad, 0, 1), np.clip(best.max(0) + self.pad, 0, 1))
        self.clustered = False
        self.rolled_back_at = self.n

    def state(self) -> dict:
        return {"phase": f"clusters (k={self.k})" if self.clustered else "full", "rollback_at": self.rolled_back_at}
