"""Bayesian optimisation over keep ratios (botorch): a GP with a Matern-5/2 kernel and log-EI.

The acquisition is maximised over *repaired* candidates: Sobol points of the search box and
perturbations of the best plans so far are each projected onto the budget first, then scored by
log expected improvement, so the GP is asked only about plans that can actually be evaluated,
and it learns from the points where candidates really landed. Plans already evaluated are
skipped. The GP works in a space of `dim` coordinates that `expand` maps to the full cube
(the identity here; BOCR's clusters of groups elsewhere).

A batch (q candidates scored at once) is chosen greedily, botorch's sequential way: the first
point by log-EI as above, each further one by q-log-noisy-EI with the batch's earlier points as
pending (the GP integrates over their unknown scores, so the batch spreads out instead of
proposing one optimum q times), all on one GP fitted per batch. Its quasi-Monte-Carlo samples are
seeded, so a seed gives the same batches.
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


def log_nei_pending(gp, X: np.ndarray, pending: np.ndarray, candidates: np.ndarray, *, seed: int) -> np.ndarray:
    """q-log-noisy-EI of each candidate given the observed points `X` and the `pending` ones."""
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.sampling import SobolQMCNormalSampler

    acq = qLogNoisyExpectedImprovement(
        gp,
        X_baseline=torch.as_tensor(X, dtype=torch.float64),
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([128]), seed=seed),
        X_pending=torch.as_tensor(pending, dtype=torch.float64),
        prune_baseline=True,
        cache_root=False,
    )
    with torch.no_grad():
        x = torch.as_tensor(candidates, dtype=torch.float64).unsqueeze(1)
        return np.concatenate([acq(chunk).numpy() for chunk in x.split(256)])


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
        starts=(),
    ) -> None:
        super().__init__(problem, evals=evals, seed=seed, starts=starts)
        self.n_init = n_init
        self.n_candidates = n_candidates
        self.local_share = local_share
        self.box = (np.zeros(self.dim), np.ones(self.dim))
        self._gp: tuple[int, object] | None = None  # (history length, GP fitted on it): one fit per batch

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
        rng = np.random.default_rng([self.seed, self.asked, 1])
        n_local = int(self.n_candidates * self.local_share)
        parts = [self._sobol(self.n_candidates - n_local, seed=self.seed * 1000 + self.asked)]
        best = self.ranked()[:5]
        if best and n_local:
            centres = self.project(self.X()[best])
            pick = centres[rng.integers(len(centres), size=n_local)]
            parts.append(np.clip(pick + rng.normal(0, 0.1, pick.shape) * (hi - lo), lo, hi))
        return np.concatenate(parts)

    def ask(self) -> np.ndarray:
        if self.asked < len(self.starts):  # a warm start's points replace the first Sobol points
            return self.starts[self.asked]
        if self.asked < self.n_init or self.n < 2:  # Sobol starts (a batch larger than them: more of the sequence)
            k = self.asked - len(self.starts)
            return self.expand(self._sobol(max(self.n_init, k + 1), seed=self.seed)[k : k + 1])[0]
        repaired = self.problem.repair(self.expand(self._candidates()), fill=self.fill)
        keys = [tuple(int(c) for c in row) for row in repaired.counts]
        fresh, taken = [], self.taken()
        for i, k in enumerate(keys):
            if k not in taken:
                fresh.append(i)
                taken.add(k)
        if not fresh:  # every candidate was seen: try anywhere
            return np.random.default_rng([self.seed, self.asked, 2]).random(self.problem.dim)
        gp, candidates = self._fitted(), self.project(repaired.u[fresh])
        if self.pending:
            pending = self.project(np.array([u for u, _ in self.pending]))
            acq = log_nei_pending(gp, self.project(self.X()), pending, candidates, seed=self.seed * 1000 + self.asked)
        else:
            feasible, Y = self.feasible(), self.Y()
            acq = log_ei(gp, float(Y[feasible].max()) if feasible.any() else float(Y.max()), candidates)
        return repaired.u[fresh[int(np.argmax(acq))]]

    def _fitted(self):
        """The GP on the history, fitted once per batch."""
        if self._gp is None or self._gp[0] != self.n:
            self._gp = (self.n, fit_gp(self.project(self.X()), self.Y(), seed=self.seed + self.n))
        return self._gp[1]

    def replay(self, evaluation) -> None:
        # proposals are a function of (seed, history): nothing to advance but the history
        self.tell(evaluation)
