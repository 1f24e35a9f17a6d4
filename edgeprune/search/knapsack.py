"""`--search knapsack`: HALP's latency-saliency knapsack (Shen et al., NeurIPS 2022) on the device's table.

Each group chooses one keep-count; a choice is worth the Taylor saliency of the channels it keeps
(search/saliency.py) and costs what the table says it adds (search/marginal.py: the plan's cost
linearised around a reference, with every kernel step of the table in it, so a count that costs as
much as a wider one is never chosen). Maximising total saliency under the budget is a
multiple-choice knapsack, solved exactly by dynamic programming over the budget quantised into
`bins` steps (`solve_knapsack`). Because the cost is only nearly a sum over groups, the solution is
re-linearised around itself until it settles, and the DP's budget is bisected until the real cost
(the full predictor) fits: `KnapsackSolver.fit`.

HALP prunes progressively while training. With `rounds` > 0, so does this searcher: it goes to the
budget in `rounds` steps, each re-estimating the saliency on the model as pruned and trained so far
(linearised at its plan), solving the knapsack at an intermediate budget with no group growing
back (HALP never restores a pruned channel), and training the masked model `steps` distilled SGD
steps (the REPrune / HALP train-while-prune idea). The channels a count keeps stay the criterion's,
so the plan is scored and finetuned as any other. With depth pruning a residual block is one more
item: its saliency (its gate's) is kept only where the block is.

The first candidate is the knapsack's plan; later ones (evals > 1) solve it again with each group's
saliency scaled by seeded noise: neighbours the proxy then ranks.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgeprune.pruning.masks import ChannelMasks
from edgeprune.search.base import SearchContext, Searcher
from edgeprune.search.marginal import MarginalCosts, choices_of
from edgeprune.search.problem import BudgetProblem
from edgeprune.search.saliency import count_values, taylor_saliency


def capped(values: list[np.ndarray], choices: list[np.ndarray], cap) -> list[np.ndarray]:
    """`values` with every choice above the variable's `cap` (a keep-count) ruled out."""
    return [np.where(c <= k, v, -np.inf) for v, c, k in zip(values, choices, cap)]


def solve_knapsack(
    values: list[np.ndarray], weights: list[np.ndarray], capacity: float, *, bins: int = 2000
) -> list[int]:
    """One choice per item maximising the total value with total weight <= capacity (multiple-choice
    knapsack; weights >= 0, rounded up to `capacity / bins` steps, so the answer never exceeds it).
    Where nothing fits, the lightest choice of each item."""
    if capacity <= 0:
        return [int(np.argmin(w)) for w in weights]
    unit = capacity / bins
    best = np.zeros(bins + 1)  # best value at each used capacity, over the items so far
    choice = np.zeros((len(values), bins + 1), dtype=np.int64)
    for j, (v, w) in enumerate(zip(values, weights)):
        q = np.ceil(np.asarray(w) / unit - 1e-9).astype(np.int64)
        new = np.full(bins + 1, -np.inf)
        for i in np.flatnonzero(q <= bins):
            cand = np.full(bins + 1, -np.inf)
            cand[q[i] :] = best[: bins + 1 - q[i]] + v[i]
            better = cand > new
            new[better], choice[j, better] = cand[better], i
        best = new
    if not np.isfinite(best).any():
        return [int(np.argmin(w)) for w in weights]
    b, picks = int(np.argmax(best)), []
    for j in range(len(values) - 1, -1, -1):
        i = int(choice[j, b])
        picks.append(i)
        b -= int(np.ceil(np.asarray(weights[j])[i] / unit - 1e-9))
    return picks[::-1]


class KnapsackSolver:
    """The plan of highest total value whose *predicted* cost fits a budget."""

    def __init__(self, problem: BudgetProblem, *, bins: int = 2000, relinearise: int = 6) -> None:
        self.problem, self.bins, self.relinearise = problem, bins, relinearise

    def linear(self, values: list[np.ndarray], target: float, ref) -> np.ndarray:
        """The knapsack's plan at `target` under the cost linearised around `ref`, re-linearised
        around its own answer until it settles."""
        counts = np.asarray(ref)
        for _ in range(self.relinearise):
            marginal = MarginalCosts.around(self.problem, counts)
            floor = [d.min() for d in marginal.delta]
            capacity = target - marginal.base - sum(floor)
            picks = solve_knapsack(values, [d - f for d, f in zip(marginal.delta, floor)], capacity, bins=self.bins)
            new = marginal.counts(self.problem, picks)
            if np.array_equal(new, counts):
                break
            counts = new
        return counts

    def fit(self, values: list[np.ndarray], budget: float, *, iterations: int = 16) -> np.ndarray:
        """The knapsack's plan whose real cost is within `budget`: the DP's target bisected between
        the smallest plan's cost and the largest target whose answer still fits."""
        best = self.linear(values, budget, self.problem.space.full_counts())
        if self.cost(best) <= budget:
            return best
        best, lo = self.problem.smallest()
        hi = budget
        for _ in range(iterations):
            mid = (lo + hi) / 2
            counts = self.linear(values, mid, self.problem.space.full_counts())
            if self.cost(counts) <= budget:
                lo, best = mid, counts
            else:
                hi = mid
        return best

    def cost(self, counts) -> float:
        """The problem's real cost (the table's full prediction) of one plan."""
        return float(self.problem.cost(np.asarray(counts)[None])[0])


class Knapsack(Searcher):
    name = "knapsack"
    fill = False  # the knapsack spends the budget by value; a greedy fill would spend it by index

    def __init__(
        self,
        problem: BudgetProblem,
        *,
        evals: int,
        context: SearchContext,
        seed: int = 0,
        rounds: int = 0,
        steps: int = 50,
        lr: float = 0.01,
        saliency_batches: int = 8,
        noise: float = 0.3,
    ) -> None:
        super().__init__(problem, evals=evals, seed=seed)
        self.context, self.rounds, self.steps, self.lr = context, rounds, steps, lr
        self.saliency_batches, self.noise = saliency_batches, noise
        self.masks = ChannelMasks(problem.space, groups=problem.variables, criterion=context.criterion, depth=True)
        self.solver = KnapsackSolver(problem)
        self.choices = [choices_of(problem, j) for j in range(problem.dim)]
        self._values: list[np.ndarray] | None = None

    def values(self) -> list[np.ndarray]:
        """Each group's value per keep-count: saliency on the dense model, or, after progressive
        rounds, on the model pruned and trained so far, no group above its last plan's count."""
        if self._values is None:
            if self.rounds:
                model, last = ProgressivePruning(self).run()
                saliency = self.saliency(model=model, at=last, seed=self.seed + self.rounds + 1)
                self._values = capped(count_values(self.masks, saliency, self.choices), self.choices, self.cap(last))
            else:
                self._values = count_values(self.masks, self.saliency(), self.choices)
        return self._values

    def saliency(self, *, model=None, at=None, seed: int | None = None):
        seed = self.seed if seed is None else seed
        return taylor_saliency(
            self.masks, self.context.task, batches=self.saliency_batches, seed=seed, model=model, at=at
        )

    def cap(self, counts) -> list[int]:
        return [int(counts[g]) for g in self.problem.variables]

    def ask(self) -> np.ndarray:
        values = self.values()
        if self.asked:  # neighbours: each group's worth scaled by seeded noise
            rng = np.random.default_rng([self.seed, self.asked])
            values = [v * float(np.exp(rng.normal(0, self.noise))) for v in values]
        counts = self.solver.fit(values, self.problem.budget)
        return self.problem.u_of_counts(counts)[0]

    def state(self) -> dict:
        return {"rounds": self.rounds}


def knapsack_starts(problem: BudgetProblem, *, context: SearchContext, n: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Points of `n` distinct plans of the one-shot knapsack (its plan, then neighbours; fewer where
    4n tries find no more): seconds of work that start bo, bocr or pso where the saliency says the
    budget is best spent (`--warm-start knapsack`)."""
    searcher = Knapsack(problem, evals=4 * n, context=context, seed=seed)
    points, plans = [], set()
    for _ in range(4 * n):
        (u,) = searcher.ask_batch(1)
        if searcher.pending[-1][1] not in plans and len(points) < n:
            plans.add(searcher.pending[-1][1])
            points.append(u)
    return points


class ProgressivePruning:
    """HALP's schedule on masks: budgets from dense down to the search budget in `rounds` steps;
    at each, the knapsack's plan masks the model, which trains `steps` distilled steps before the
    saliency is re-estimated on it. Returns the trained model (a copy) and its last plan."""

    def __init__(self, knapsack: Knapsack) -> None:
        self.k = knapsack

    def run(self) -> tuple[torch.nn.Module, np.ndarray]:
        from edgeprune.progress import progress_bar

        k, problem, ctx = self.k, self.k.problem, self.k.context
        counts = np.asarray(problem.space.full_counts())
        dense = float(problem.cost(counts[None])[0])
        model = copy.deepcopy(problem.space.base)
        with progress_bar(enabled=ctx.progress) as bar:
            shown = bar.add_task("knapsack: prune while training", total=k.rounds, status="")
            for r in range(1, k.rounds + 1):
                values = count_values(k.masks, k.saliency(model=model, at=counts, seed=k.seed + r), k.choices)
                budget = dense + (problem.budget - dense) * r / k.rounds
                counts = k.solver.fit(capped(values, k.choices, k.cap(counts)), budget)
                self.train(model, counts, seed=k.seed + r)
                bar.update(shown, advance=1, status=f"{budget:.4g} {problem.unit}")
        ctx.log(f"knapsack: pruned to the budget in {k.rounds} rounds of {k.steps} distilled training steps")
        return model, counts

    def train(self, model: torch.nn.Module, counts, *, seed: int) -> None:
        from edgeprune.training.train import Recipe, sgd

        k = self.k
        task, teacher = k.context.task, k.problem.space.base.eval()
        opt = sgd(model, Recipe(epochs=1, lr=k.lr))
        torch.manual_seed(seed)
        model.train()
        with k.masks.applied(model, k.masks.hard(counts), k.masks.hard_gates(counts)):
            for batch in task.train.batches(seed=seed, limit=k.steps):
                x = task.input_of(batch)
                with torch.no_grad():
                    target = teacher(x)
                loss = task.loss(model(x), target, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
