"""The search loop: ask, repair to the budget, score, record, tell, until N distinct plans are scored.

Every evaluation is committed to the run's SQLite store before the next starts. On resume the
stored evaluations are replayed into a fresh searcher (same seed), each under the budget it was
made with, so the search continues exactly where it stopped and nothing is scored twice.
A proposal that lands on a plan already scored is recorded and told (with its cached score)
but does not count as an evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from edgeprune.progress import progress_bar
from edgeprune.runs import RunStore
from edgeprune.search.base import Evaluation, Searcher
from edgeprune.search.problem import BudgetProblem

MAX_IDLE_PROPOSALS = 50  # proposals in a row that find no new plan: the space near the budget is exhausted


class SearchLoop:
    def __init__(
        self,
        problem: BudgetProblem,
        searcher: Searcher,
        score: Callable[[np.ndarray], float],
        store: RunStore,
        *,
        describe: Callable[[np.ndarray], dict] | None = None,
        plan_hash: Callable[[np.ndarray], str] | None = None,
        progress: bool = True,
        log=print,
    ) -> None:
        self.problem, self.searcher, self.score, self.store = problem, searcher, score, store
        self.describe = describe or (lambda counts: {})
        self.plan_hash = plan_hash or (lambda counts: ",".join(map(str, counts)))
        self.progress, self.log = progress, log
        self.rows = store.evals()
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
                u_raw = np.asarray(self.searcher.ask(), float)
                repaired = self.problem.repair(u_raw[None], fill=self.searcher.fill)
                counts = repaired.counts[0]
                duplicate = tuple(int(c) for c in counts) in self.searcher.seen
                t0 = time.perf_counter()
                score = float(self.score(counts))
                seconds = time.perf_counter() - t0
                evaluation = Evaluation(u_raw, repaired.u[0], counts, float(repaired.cost[0]), score)
                row = {
                    "i": len(self.rows),
                    "round": stage,
                    "u_raw": [float(v) for v in u_raw],
                    "u": [float(v) for v in evaluation.u],
                    "counts": [int(c) for c in counts],
                    "plan_hash": self.plan_hash(counts),
                    **self.describe(counts),
                    "cost": evaluation.cost,
                    "budget": self.problem.budget,
                    "score": score,
                    "seconds": seconds,
                    "duplicate": int(duplicate),
                }
                self.store.add_eval(row)
                self.rows.append(row)
                self.searcher.tell(evaluation)
                idle = idle + 1 if duplicate else 0
                bar.update(task, completed=self.distinct, status=self._status())
        if idle >= MAX_IDLE_PROPOSALS:
            self.log(f"{name}: {idle} proposals in a row found no new plan near the budget; stopping early")
