"""The search loop: ask, repair to the budget, score, record, tell, until N distinct plans are scored.

Candidates go in batches of `batch` (q): asked one by one (each seeing the earlier ones as
pending), scored together (in parallel where the scorer has workers: `score.many`), then
recorded and told in the order they were asked, so a seed gives the same run however the scores
arrive. Every evaluation is committed to the run's SQLite store once its batch is scored. On resume the
stored evaluations are replayed into a fresh searcher (same seed), each under the budget it was
made with, so the search continues exactly where it stopped and nothing is scored twice.
A proposal that lands on a plan already scored is recorded and told (with its cached score)
but does not count as an evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeprune.progress import progress_bar
from edgeprune.runs import RunStore
from edgeprune.search.base import Evaluation, Searcher
from edgeprune.search.problem import BudgetProblem

MAX_IDLE_PROPOSALS = 50  # proposals in a row that find no new plan: the space near the budget is exhausted


@dataclass
class Proposal:
    """One candidate of a batch: as asked, as repaired, and whether its plan was scored before."""

    u_raw: np.ndarray
    u: np.ndarray
    counts: np.ndarray
    cost: float
    duplicate: bool


def score_many(score, plans: list) -> list[tuple[float, float]]:
    """(score, seconds) of each plan: through the scorer's own `many` (parallel workers), or one by one."""
    if hasattr(score, "many"):
        return score.many(plans)
    out = []
    for counts in plans:
        t0 = time.perf_counter()
        out.append((float(score(counts)), time.perf_counter() - t0))
    return out


class SearchLoop:
    def __init__(
        self,
        problem: BudgetProblem,
        searcher: Searcher,
        score: Callable[[np.ndarray], float],
        store: RunStore,
        *,
        batch: int = 1,
        describe: Callable[[np.ndarray], dict] | None = None,
        plan_hash: Callable[[np.ndarray], str] | None = None,
        progress: bool = True,
        log=print,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.problem, self.searcher, self.score, self.store, self.batch = problem, searcher, score, store, batch
        self.describe = describe or (lambda counts: {})
        self.plan_hash = plan_hash or (lambda counts: ",".join(map(str, counts)))
        self.progress, self.log = progress, log
        self.rows = store.evals()
        self.seconds = 0.0  # wall time spent scoring batches (this process's share of the run)
        self._replay()

    def _replay(self) -> None:
        budget = self.problem.budget
        for row in self.rows:
            self.problem.budget = row["budget"]
            self.searcher.replay(
                Evaluation(
                    np.asarray(row["u_raw"]), np.asarray(row["u"]), np.asarray(row["counts"]), row["cost"], row["score"]
                )
            )
        self.problem.budget = budget
        if self.rows:
            self.log(f"resumed: {self.distinct} evaluations replayed from {self.store.path}")

    @property
    def distinct(self) -> int:
        return sum(1 for r in self.rows if not r["duplicate"])

    def best(self) -> dict | None:
        """The best-scoring evaluation that fits the current budget."""
        fits = [r for r in self.rows if r["cost"] <= self.problem.budget * (1 + 1e-9)]
        return max(fits, key=lambda r: (r["score"], -r["cost"])) if fits else None

    def _status(self) -> str:
        best = self.best()
        if not best:
            return ""
        ms = f" @ {best['predicted_ms']:.4g} ms" if best.get("predicted_ms") is not None else ""
        return f"best {best['score']:.2%}{ms}"

    def run(self, evals: int, *, stage: int = 0) -> None:
        """Score plans until `evals` distinct ones are in the store (all rounds together)."""
        if self.distinct >= evals or self.searcher.done:
            return
        idle = 0
        name = self.searcher.name
        with progress_bar(enabled=self.progress) as bar:
            task = bar.add_task(f"search {name}", total=evals, completed=self.distinct, status=self._status())
            while self.distinct < evals and not self.searcher.done and idle < MAX_IDLE_PROPOSALS:
                proposals = self._ask(min(self.batch, evals - self.distinct))
                t0 = time.perf_counter()
                scored = score_many(self.score, [p.counts for p in proposals])
                self.seconds += time.perf_counter() - t0
                for p, (score, seconds) in zip(proposals, scored):
                    self._record(p, score, seconds, stage)
                    idle = idle + 1 if p.duplicate else 0
                bar.update(task, completed=self.distinct, status=self._status())
        if idle >= MAX_IDLE_PROPOSALS:
            self.log(f"{name}: {idle} proposals in a row found no new plan near the budget; stopping early")

    def _ask(self, q: int) -> list[Proposal]:
        """Up to q candidates, each repaired to the budget and held as pending while the rest are asked."""
        proposals: list[Proposal] = []
        while len(proposals) < q and self.searcher.room() > 0 and not self.searcher.done:
            u_raw = np.asarray(self.searcher.ask(), float)
            repaired = self.problem.repair(u_raw[None], fill=self.searcher.fill)
            counts = repaired.counts[0]
            duplicate = tuple(int(c) for c in counts) in self.searcher.taken()
            proposals.append(Proposal(u_raw, repaired.u[0], counts, float(repaired.cost[0]), duplicate))
            self.searcher.pend(repaired.u[0], counts)
        return proposals

    def _record(self, p: Proposal, score: float, seconds: float, stage: int) -> None:
        """Commit one scored candidate to the store, then tell the searcher."""
        evaluation = Evaluation(p.u_raw, p.u, p.counts, p.cost, float(score))
        row = {
            "i": len(self.rows),
            "round": stage,
            "u_raw": [float(v) for v in p.u_raw],
            "u": [float(v) for v in p.u],
            "counts": [int(c) for c in p.counts],
            "plan_hash": self.plan_hash(p.counts),
            **self.describe(p.counts),
            "cost": p.cost,
            "budget": self.problem.budget,
            "score": float(score),
            "seconds": seconds,
            "duplicate": int(p.duplicate),
        }
        self.store.add_eval(row)
        self.rows.append(row)
        self.searcher.tell(evaluation)
