"""Particle swarm over keep ratios (pymoo's PSO), its swarm seeded around ACP's widths.

ACP (Chang et al. 2022) clusters each layer's channels by feature-map similarity; the number of
clusters is a data-driven width, and its initial swarm perturbs those widths particle by particle
(particle i moves each group by i channel steps up, down or not at all). Half the swarm is built
that way here, the other half at random (a warm start's points, the knapsack's plans, in place of
as many random ones). Inertia decays linearly over the run (ACP: 0.6 -> 0.43;
here 0.9 -> 0.4 by default), c1 = c2 = 2. Particles move in the unit cube; each position is
repaired to the budget before it is scored. Many positions repair to the same plan, so a swarm
left alone collapses onto a few plans: a particle whose plan was already scored is moved by a
growing random step until it lands on a new plan (duplicate elimination), and that position
becomes the particle's.
"""

from __future__ import annotations

import numpy as np

from edgeprune.search.base import Evaluation, Searcher
from edgeprune.search.problem import BudgetProblem


def acp_swarm(problem: BudgetProblem, acp_counts, n: int, rng: np.random.Generator) -> np.ndarray:
    """n particles (rows of u) around ACP's keep-counts, particle i moved by up to i allowed steps per group."""
    groups = [problem.space.groups[g] for g in problem.variables]
    base = np.array([g.allowed.index(g.snap(acp_counts[g.index])) for g in groups])
    out = []
    for i in range(n):
        idx = base + i * rng.integers(-1, 2, size=len(groups))
        idx = np.clip(idx, 0, [len(g.allowed) - 1 for g in groups])
        counts = np.asarray(problem.space.full_counts())
        for g, j in zip(groups, idx):
            counts[g.index] = g.allowed[j]
        out.append(problem.u_of_counts(counts)[0])
    return np.array(out)


class ParticleSwarm(Searcher):
    name = "pso"

    def __init__(
        self,
        problem: BudgetProblem,
        *,
        evals: int,
        seed: int = 0,
        particles: int = 10,
        acp_counts=None,
        inertia: tuple[float, float] = (0.9, 0.4),
        c1: float = 2.0,
        c2: float = 2.0,
        starts=(),
    ) -> None:
        from pymoo.algorithms.soo.nonconvex.pso import PSO
        from pymoo.core.problem import Problem

        super().__init__(problem, evals=evals, seed=seed, starts=[np.asarray(u, float) for u in starts][:particles])
        rng = np.random.default_rng([seed, 7])
        n_acp = particles // 2 if acp_counts is not None else 0
        init = [rng.random((particles - n_acp, problem.dim))]
        if n_acp:
            init.insert(0, acp_swarm(problem, acp_counts, n_acp, rng))
        init = np.concatenate(init)
        if self.starts:  # in place of the last random particles
            init[-len(self.starts) :] = self.starts
        self.inertia = inertia
        self.generations = max(1, -(-evals // particles) - 1)
        self._problem = Problem(n_var=problem.dim, n_obj=1, xl=0.0, xu=1.0)
        self.algorithm = PSO(pop_size=particles, sampling=init, adaptive=False, w=inertia[0], c1=c1, c2=c2)
        self.algorithm.setup(self._problem, seed=seed, verbose=False)
        self.particles = particles
        self.generation = 0
        self._pop = None
        self._told: list[Evaluation] = []

    def room(self) -> int:
        """The rest of the generation: a swarm is scored as one batch at most (pymoo is told whole generations)."""
        if self._pop is None or len(self._told) == len(self._pop):
            return self.particles
        return len(self._pop) - len(self._told) - len(self.pending)

    def ask(self) -> np.ndarray:
        if self._pop is None or len(self._told) == len(self._pop) and self._advance():
            self._pop = self.algorithm.ask()
            self._told = []
        particle = self._pop[len(self._told) + len(self.pending)]
        x = self._fresh(np.asarray(particle.X, float))
        particle.set("X", x)
        return x

    def _fresh(self, x: np.ndarray, tries: int = 20) -> np.ndarray:
        """`x`, or the first random move of it (step growing from 0.05) whose repaired plan is new."""
        rng = np.random.default_rng([self.seed, self.asked, 3])
        taken = self.taken()
        for t in range(tries + 1):
            y = x if t == 0 else np.clip(x + rng.normal(0, 0.05 * t, x.shape), 0.0, 1.0)
            counts = self.problem.repair(y[None], fill=self.fill).counts[0]
            if tuple(int(c) for c in counts) not in taken:
                return y
        return y

    def tell(self, evaluation: Evaluation) -> None:
        super().tell(evaluation)
        self._told.append(evaluation)

    def _advance(self) -> bool:
        """Hand the finished generation to pymoo (positions as asked, scores of their plans); decay the inertia."""
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        F = -np.array([[e.score] for e in self._told])
        Evaluator().eval(StaticProblem(self._problem, F=F), self._pop)
        self.algorithm.tell(infills=self._pop)
        self.generation += 1
        w0, w1 = self.inertia
        self.algorithm.w = w0 - (w0 - w1) * min(1.0, self.generation / self.generations)
        return True

    def state(self) -> dict:
        return {"generation": self.generation, "inertia": round(float(self.algorithm.w), 3)}
