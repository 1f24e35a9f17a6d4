"""The search problem: one keep ratio per prunable group, every candidate repaired to the budget.

A searcher proposes points u in the unit cube, one coordinate per free group. u maps to keep
ratios r = lo + u (hi - lo) and r to the nearest allowed (device-aligned) keep-counts. Before a
candidate is scored it is repaired: if it is over the budget, its ratios are scaled towards the
smallest plan by bisection until it fits; then the leftover budget is spent greedily, one channel
step at a time, on the groups the candidate wanted widest relative to what they got. Every
scored candidate is feasible, and all of them use the budget nearly to the full.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.pruning.space import PrunableSpace

Cost = Callable[[np.ndarray], np.ndarray]  # (N, G) keep-counts -> (N,) cost


@dataclass
class Repaired:
    """Candidates after repair: where they ended in the cube, their keep-counts and cost."""

    u: np.ndarray  # (N, d)
    counts: np.ndarray  # (N, G)
    cost: np.ndarray  # (N,)


@dataclass
class BudgetProblem:
    space: PrunableSpace
    cost: Cost
    budget: float
    variables: list[int]  # indices of the groups the search sets (prunable, not fixed)
    lo: np.ndarray  # per variable, the smallest keep ratio
    hi: np.ndarray  # per variable, the largest keep ratio
    unit: str = ""
    _allowed: list[np.ndarray] = field(default_factory=list, repr=False)
    dense_fits: bool = False  # the dense model meets the budget as it is (quantized alone): its plan may be chosen

    @classmethod
    def create(
        cls,
        space: PrunableSpace,
        cost: Cost,
        budget: float,
        *,
        max_keep: float = 1.0,
        fix: Sequence[str] = (),
        unit: str = "",
        check: bool = True,
    ) -> BudgetProblem:
        """The problem, after checking that the budget lies between the smallest plan and the dense model.

        `fix` holds glob patterns of group roots (layer names) held at full width; `max_keep`
        caps every group's keep ratio. `check=False` defers the budget's check to `set_budget`
        (a caller that may first hold a predicted out-of-reach budget against the device)."""
        for pattern in fix:
            if not any(fnmatch.fnmatchcase(g.root, pattern) for g in space.groups):
                roots = ", ".join(g.root for g in space.groups[:4])
                raise EdgepruneError(f"--fix pattern {pattern!r} matches no channel group (group roots: {roots}, ...)")
        variables = [
            g.index for g in space.groups if g.prunable and not any(fnmatch.fnmatchcase(g.root, p) for p in fix)
        ]
        if not variables:
            raise EdgepruneError(
                "no channel group is left to search: every group is fixed or has a single allowed width"
            )
        lo = np.array([space.groups[i].allowed[0] / space.groups[i].width for i in variables])
        hi = np.maximum(lo, min(1.0, max_keep))
        allowed = [np.asarray(g.allowed) for g in space.groups]
        problem = cls(space, cost, float(budget), variables, lo, hi, unit, allowed)
        if check:
            problem.set_budget(budget)
        return problem

    def smallest(self) -> tuple[np.ndarray, float]:
        """The smallest plan the search can reach (every free group at its minimum) and its cost."""
        counts = self.counts(np.zeros((1, self.dim)))
        return counts[0], float(self.cost(counts)[0])

    def set_budget(self, budget: float) -> None:
        """Change the budget (e.g. tightened after measuring), refusing one no plan can meet."""
        unit = self.unit
        smallest = self.smallest()[1]
        dense = float(self.cost(np.asarray([self.space.full_counts()]))[0])
        if budget < smallest:
            raise EdgepruneError(
                f"budget {budget:.4g} {unit} is below the smallest cost this search space reaches "
                f"({smallest:.4g} {unit}, every free group at its minimum keep-count); {self.widen_hint()}"
            )
        if budget >= dense and self.dense_fits:
            budget = dense
        elif budget >= dense:
            raise EdgepruneError(
                f"budget {budget:.4g} {unit} is at or above the dense model's {dense:.4g} {unit}: "
                "the unpruned model already fits, nothing to prune"
            )
        self.budget = float(budget)

    def widen_hint(self) -> str:
        """What would let a smaller plan exist: --min-keep only where it is what stops the groups."""
        from edgeprune.pruning.space import allowed_counts

        groups = [self.space.groups[i] for i in self.variables]
        floor = [
            allowed_counts(g.width, step=self.space.step, min_keep_ratio=1e-9, channel_groups=g.channel_groups)[0]
            for g in groups
        ]
        depth = ""
        if not self.space.depth and self.space.base is not None:
            from edgeprune.pruning.blocks import residual_blocks

            if residual_blocks(self.space.base):
                depth = ", or let the search remove whole residual blocks (--depth)"
        if any(g.allowed[0] > f for g, f in zip(groups, floor) if g.block is None):
            return f"raise the budget, or lower --min-keep{depth}"
        step = self.space.step
        stuck = [g for g in self.space.groups if g.block is None and len(g.allowed) == 1 and g.width > 1]
        if stuck and step > 1:  # the table's channel step is what stops them: a finer one reaches further
            return (
                f"{len(stuck)} of {len(self.space.groups)} groups are narrower than two channel steps of {step} and "
                f"cannot shrink at all: profile a table at a finer step (edgeprune profile ... --step {step // 2}) and "
                f"prune with it, or raise the budget{depth}"
            )
        return (
            f"every group is already at one channel step ({step}): the rest is layers channel "
            f"pruning cannot remove; raise the budget{depth}"
        )

    @property
    def dim(self) -> int:
        return len(self.variables)

    # ----- mapping -----
    def ratios(self, u: np.ndarray) -> np.ndarray:
        return self.lo + np.clip(u, 0.0, 1.0) * (self.hi - self.lo)

    def to_u(self, ratios: np.ndarray) -> np.ndarray:
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        return np.clip((ratios - self.lo) / span, 0.0, 1.0)

    def counts_of_ratios(self, ratios: np.ndarray) -> np.ndarray:
        """(N, d) keep ratios -> (N, G) allowed keep-counts, the nearest (ties to the larger)."""
        ratios = np.atleast_2d(ratios)
        counts = np.tile(np.asarray(self.space.full_counts()), (len(ratios), 1))
        for j, g in enumerate(self.variables):
            allowed = self._allowed[g]
            target = ratios[:, j] * self.space.groups[g].width
            i = np.clip(np.searchsorted(allowed, target), 1, len(allowed) - 1)
            lower, upper = allowed[i - 1], allowed[i]
            counts[:, g] = np.where(target - lower < upper - target, lower, upper)
            counts[:, g] = np.where(target <= allowed[0], allowed[0], counts[:, g])
            counts[:, g] = np.where(target >= allowed[-1], allowed[-1], counts[:, g])
        return counts

    def counts(self, u: np.ndarray) -> np.ndarray:
        return self.counts_of_ratios(self.ratios(np.atleast_2d(u)))

    def u_of_counts(self, counts: np.ndarray) -> np.ndarray:
        counts = np.atleast_2d(counts)
        widths = np.array([self.space.groups[g].width for g in self.variables])
        return self.to_u(counts[:, self.variables] / widths)

    def cost_of(self, u: np.ndarray) -> np.ndarray:
        return self.cost(self.counts(u))

    # ----- repair -----
    def repair(self, u: np.ndarray, *, fill: bool = True, iterations: int = 30) -> Repaired:
        """Project candidates onto the budget (bisection towards the smallest plan), then, with
        `fill`, spend what is left greedily. Vectorised over the rows of `u`."""
        u = np.clip(np.atleast_2d(np.asarray(u, float)), 0.0, 1.0)
        fits = self.cost_of(u) <= self.budget
        lo_s, hi_s = np.where(fits, 1.0, 0.0), np.ones(len(u))
        todo = ~fits
        for _ in range(iterations if todo.any() else 0):
            mid = (lo_s[todo] + hi_s[todo]) / 2
            ok = self.cost_of(u[todo] * mid[:, None]) <= self.budget
            lo_s[todo] = np.where(ok, mid, lo_s[todo])
            hi_s[todo] = np.where(ok, hi_s[todo], mid)
        scaled = u * lo_s[:, None]
        counts = self.counts(scaled)
        if fill:
            counts = self._fill(counts, target=self.ratios(u))
        cost = self.cost(counts)
        # where the fill moved a group, the point is that group's realised ratio
        realised = self.u_of_counts(counts)
        moved = counts[:, self.variables] != self.counts(scaled)[:, self.variables]
        return Repaired(np.where(moved, realised, scaled), counts, cost)

    def _fill(self, counts: np.ndarray, *, target: np.ndarray) -> np.ndarray:
        """Raise one group by one allowed step at a time while the budget allows, the group whose
        realised ratio falls furthest below the candidate's wish first."""
        counts = counts.copy()
        variables = np.asarray(self.variables)
        widths = np.array([self.space.groups[g].width for g in variables], float)
        max_count = np.array([self.space.groups[g].floor(h * w) for g, h, w in zip(variables, self.hi, widths)])
        active = np.ones(len(counts), bool)
        while active.any():
            rows = np.flatnonzero(active)
            current = counts[rows]
            # every active row x every variable: the plan with that group one allowed step up
            nxt = np.stack([self._next_count(g, current[:, g]) for g in variables], axis=1)  # (n, d)
            can = nxt <= max_count
            trial = np.repeat(current[:, None, :], len(variables), axis=1)  # (n, d, G)
            trial[:, np.arange(len(variables)), variables] = np.where(can, nxt, current[:, variables])
            cost = self.cost(trial.reshape(-1, current.shape[1])).reshape(len(rows), -1)
            ok = can & (cost <= self.budget)
            gap = np.where(ok, target[rows] - current[:, variables] / widths, -np.inf)
            best = np.argmax(gap, axis=1)
            grow = ok.any(axis=1)
            counts[rows[grow], variables[best[grow]]] = nxt[grow, best[grow]]
            active[rows[~grow]] = False
        return counts

    def _next_count(self, g: int, current: np.ndarray) -> np.ndarray:
        allowed = self._allowed[g]
        i = np.searchsorted(allowed, current, side="right")
        return np.where(i < len(allowed), allowed[np.minimum(i, len(allowed) - 1)], np.iinfo(np.int64).max)
