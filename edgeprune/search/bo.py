"""Bayesian optimisation over keep ratios (botorch): a GP with a Matern-5/2 kernel and log-EI.

The acquisition is maximised over *repaired* candidates: Sobol points of the search box and
perturbations of the best plans so far are each projected onto the budget first, then scored by
log expected improvement, so the GP is asked only about plans that can actually be evaluated,
and it learns from the points where candidates really landed. Plans already evaluated are
skipped. The GP works in a space of `dim` coordinates that `expand` maps to the full cube
(the identity here; BOCR's clusters of groups elsewhere).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from edgeprune.search.base import Searcher
from edgeprune.search.problem import BudgetProblem


def fit_gp(X: np.ndarray, Y: np.ndarray, *, seed: int = 0):
    """A SingleTaskGP (Matern-5/2 with ARD, standardised outcomes) fitted by marginal likelihood."""
    with warnings.catch_warnings():  # linear_operator decorates with the deprecated torch.jit.script at import
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.utils.gpytorch_modules import get_matern_kernel_with_gamma_prior
        from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(seed)
    train_x = torch.as_tensor(X, dtype=torch.float64)
    train_y = torch.as_tensor(Y, dtype=torch.float64).reshape(-1, 1)
    gp = SingleTaskGP(train_x, train_y, covar_module=get_matern_kernel_with_gamma_prior(ard_num_dims=X.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # botorch warns about input scaling and retries; both are handled
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
    return gp


def log_ei(gp, best_f: float, candidates: np.ndarray) -> np.ndarray:
    from botorch.acquisition import LogExpectedImprovement

    acq = LogExpectedImprovement(gp, best_f=best_f)
    with torch.no_grad():
        x = torch.as_tensor(candidates, dtype=torch.float64).unsqueeze(1)
        return np.concatenate([acq(chunk).numpy() for chunk in x.split(2048)])


class BayesOpt(Searcher):
    name = "bo"

    def __init__(
        self,
        problem: BudgetProblem,
        *,
        evals: int,
        seed: int = 0,
        n_init: int = 10,
        n_candidates: int = 1024,
        local_share: float = 0.5,
    ) -> None:
        super().__init__(problem, evals=evals, seed=seed)
        self.n_init = n_init
        self.n_candidates = n_candidates
        self.local_share = local_share
        self.box = (np.zeros(self.dim), np.ones(self.dim))

    # ----- the GP's coordinates -----
    @property
    def dim(self) -> int:
        return self.problem.dim

    def expand(self, z: np.ndarray) -> np.ndarray:
        """GP coordinates -> points of the full cube."""
        return z

    def project(self, u: np.ndarray) -> np.ndarray:
        """Points of the full cube -> GP coordinates."""
        return u

    # ----- ask -----
    def _sobol(self, n: int, seed: int) -> np.ndarray:
        from torch.quasirandom import SobolEngine

        lo, hi = self.box
        return lo + SobolEngine(self.dim, scramble=True, seed=seed).draw(n).double().numpy() * (hi - lo)

    def _candidates(self) -> np.ndarray:
        lo, hi = self.box
        rng = np.random.default_rng([self.seed, self.n, 1])
        n_local = int(self.n_candidates * self.local_share)
        parts = [self._sobol(self.n_candidates - n_local, seed=self.seed * 1000 + self.n)]
        best = self.ranked()[:5]
        if best and n_local:
            centres = self.project(self.X()[best])
            pick = centres[rng.integers(len(centres), size=n_local)]
            parts.append(np.clip(pick + rng.normal(0, 0.1, pick.shape) * (hi - lo), lo, hi))
        return np.concatenate(parts)

    def ask(self) -> np.ndarray:
        if self.n < self.n_init:
            return self.expand(self._sobol(self.n_init, seed=self.seed)[self.n : self.n + 1])[0]
        repaired = self.problem.repair(self.expand(self._candidates()), fill=self.fill)
        keys = [tuple(int(c) for c in row) for row in repaired.counts]
        fresh, taken = [], set(self.seen)
        for i, k in enumerate(keys):
            if k not in taken:
                fresh.append(i)
                taken.add(k)
        if not fresh:  # every candidate was seen: try anywhere
            return np.random.default_rng([self.seed, self.n, 2]).random(self.problem.dim)
        feasible = self.feasible()
        Y = self.Y()
        best_f = float(Y[feasible].max()) if feasible.any() else float(Y.max())
        gp = fit_gp(self.project(self.X()), Y, seed=self.seed + self.n)
        acq = log_ei(gp, best_f, self.project(repaired.u[fresh]))
        return repaired.u[fresh[int(np.argmax(acq))]]

    def replay(self, evaluation) -> None:
        # proposals are a function of (seed, history): nothing to advance but the history
        self.tell(evaluation)
