"""Differentiable width search: a softmax over each group's keep-counts, the latency table as a loss.

PR-DARTS (Mousavi et al., "Pruning-Based Differentiable Architecture Search") adds pruned
convolution and linear operations to the candidate operations of DARTS cells and learns
architecture weights over them by gradient descent on DARTS's softmax relaxation. Here the same
relaxation is applied to channel widths: the candidate "operations" of a channel group are its
allowed keep-counts, each a 0/1 keep vector over the group's channels (which channels a count
keeps comes from the run's criterion, so the hard vectors are exactly the plans the proxy scores;
`ChannelMasks` multiplies them in), and a group's architecture weights are logits over them.

Kept from DARTS / PR-DARTS: a softmax over candidate operations, gradient steps on the
architecture logits, the most likely operation as the derived architecture. Different:

- one logit vector per channel group, not per cell edge; the operations are widths of one
  pretrained network, not separate ops;
- the weights are frozen, BatchNorm on batch statistics (no bilevel problem; `frozen_student`);
- what the network runs (`RELAXATIONS`): by default a plan drawn from the softmax, its gradient
  taken straight through a Gumbel-softmax sample (as GDAS and SNAS do), rather than DARTS's
  mixture (`"expected"`: each channel scaled by the probability that it is kept). BatchNorm after
  a reader undoes most of a mixture's down-scaling, so a mixture under-rates what pruning a group
  read by BatchNormed convolutions costs in accuracy, and a sampled plan is what the proxy runs.
  On resnet20 / Fashion-MNIST at 50 % of the dense latency the mixture kept the last stage's
  residual stream whole and cut every inner convolution to 8-16 channels; its plans' proxy top-1
  was 0.18-0.26 against 0.23-0.36 for sampled plans (3 seeds each), and alike at 70 % (0.79-0.84);
- the softmax temperature anneals (1 -> 0.5) so the distributions settle;
- the loss is the task's distillation loss against the dense model plus a latency term,
  lambda * (E[cost] - target) / budget: E[cost] is the device table's predicted latency,
  linearised around the current most likely plan (`MarginalCosts`, redone every few steps) and
  taken in expectation over the softmax; lambda follows a PI-controlled dual ascent
  (`BudgetMultiplier`) towards a target that glides from the start down to the budget
  (`BudgetGlide`);
- the argmax plan, which meets the budget only in expectation, is fitted to it by a greedy
  most-likely move search (`fit_to_budget`).

The optimisation runs once, on the first `ask`, which proposes the fitted most likely plan; later
asks propose distinct plans sampled from the learnt distributions, each fitted to the problem's
budget at that time (so a budget tightened by the measured check is met by what follows).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeprune.errors import EdgepruneError, choices_error
from edgeprune.pruning.masks import ChannelMasks
from edgeprune.search.base import SearchContext, Searcher
from edgeprune.search.marginal import MarginalCosts, choices_of
from edgeprune.search.problem import BudgetProblem

RELAXATIONS = ("gumbel", "expected")  # what the student runs: sampled plans (straight-through), or DARTS's mixture


@dataclass
class DartsStep:
    """One optimisation step as recorded: what the relaxed plan was expected to cost, what the
    most likely plan really costs, the task loss and the multiplier and temperature in force."""

    step: int
    task_loss: float
    expected_cost: float  # E[cost] under the distributions, the table linearised around the reference plan
    plan_cost: float  # the problem's cost of the most likely plan (argmax per group), before repair
    multiplier: float
    temperature: float


class WidthLogits(nn.Module):
    """Per variable group j, logits over `choices_of(problem, j)`; the soft keep vector they imply.

    Logits start leaning towards the widest counts (`lean` * keep ratio): the search starts near
    the dense model, where the frozen network is accurate and the teacher agrees with it, and its
    expected cost comes down to the budget (from no further than `starting_lean` allows)."""

    def __init__(self, problem: BudgetProblem, masks: ChannelMasks, *, lean: float) -> None:
        super().__init__()
        self.groups = list(problem.variables)
        self.choices = [choices_of(problem, j) for j in range(problem.dim)]
        self.rows: list[torch.Tensor] = []
        for g, counts in zip(self.groups, self.choices):
            allowed = problem.space.groups[g].allowed
            self.rows.append(masks.keep_matrix(g)[[allowed.index(int(c)) for c in counts]])
        self.widths = [problem.space.groups[g].width for g in self.groups]
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(len(c))) for c in self.choices)
        self.lean(lean)

    @torch.no_grad()
    def lean(self, lean: float) -> None:
        """Set the logits to `lean` * keep ratio: towards the widest counts (> 0) or the narrowest (< 0)."""
        for a, c, w in zip(self.logits, self.choices, self.widths):
            a.copy_(torch.as_tensor(lean * c / w, dtype=torch.float32))

    def probs(self, temperature: float) -> list[torch.Tensor]:
        return [torch.softmax(a / temperature, dim=0) for a in self.logits]

    def straight_through(self, temperature: float, generator: torch.Generator) -> list[torch.Tensor]:
        """A plan drawn from softmax(alpha / tau) (Gumbel-max), as one-hot vectors that carry the
        gradient of the Gumbel-softmax sample they are the argmax of (the straight-through
        estimator of GDAS / SNAS-style searches)."""
        out = []
        for a in self.logits:
            u = torch.rand(a.shape, generator=generator).clamp(1e-10, 1 - 1e-10).to(a.device)
            soft = torch.softmax(a / temperature - torch.log(-torch.log(u)), dim=0)
            hard = nn.functional.one_hot(soft.argmax(), len(a)).to(soft.dtype)
            out.append(hard - soft.detach() + soft)
        return out

    def soft_masks(self, mix: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Group -> a vector over its channels: the weights `mix` gives its choices times their keep
        vectors. Probabilities give each channel's chance to be kept (DARTS's mixture); one-hot
        weights give a plan's 0/1 mask."""
        return {g: w @ rows.to(w.device) for g, w, rows in zip(self.groups, mix, self.rows)}

    def soft_gates(self, mix: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Group -> its block's gate, where keep-count 0 removes a residual block (depth pruning):
        the weight of every choice but 0 (a plan's 0/1; the chance the block stays, for a mixture)."""
        return {g: 1 - w[0] for g, w, c in zip(self.groups, mix, self.choices) if c[0] == 0}

    def picks(self) -> list[int]:
        """The most likely choice of each group (the DARTS discretisation); ties go to the wider."""
        return [len(a) - 1 - int(torch.argmax(a.detach().flip(0))) for a in self.logits]

    def counts(self, problem: BudgetProblem, picks: list[int]) -> np.ndarray:
        """The full keep-counts (G,) of one choice per variable group."""
        return _counts(problem, self.choices, picks)


class ExpectedCost:
    """E[cost] of independent per-group choices: the problem's cost linearised around a reference
    plan (base + sum_j p_j . delta_j), differentiable in the probabilities. The pairs of groups
    that share a layer are not in a linearisation, so it is redone around the current most likely
    plan as the search moves (`around`)."""

    def __init__(self, problem: BudgetProblem, ref: np.ndarray) -> None:
        self.problem = problem
        self.around(ref)

    def around(self, ref: np.ndarray) -> None:
        marginal = MarginalCosts.around(self.problem, ref)
        self.ref, self.base = marginal.ref, marginal.base
        self.delta = [torch.as_tensor(d, dtype=torch.float32) for d in marginal.delta]

    def __call__(self, probs: list[torch.Tensor]) -> torch.Tensor:
        return self.base + sum((p * d.to(p.device)).sum() for p, d in zip(probs, self.delta))


@dataclass
class BudgetMultiplier:
    """The weight lambda of the latency term, by multiplicative dual ascent on the relative
    violation v = (E[cost] - target) / budget, with a proportional term (a PI controller, as in
    PID Lagrangian methods): log lambda = integral + gain * v, integral += rate * v. Over the
    target lambda grows until the latency gradient outweighs the task's; under it, it shrinks, so
    the task loss widens the groups again and the budget is used rather than undershot. The
    proportional term answers a violation at once, which damps the swing a pure integral gives
    while the logits lag behind it; while the gap closes the integral holds (anti-windup: one
    that kept growing while the logits caught up would then push them far past the target, where
    a saturated softmax cannot climb back). Working in log lambda finds its scale whatever the
    task loss's."""

    rate: float = 1.0
    gain: float = 5.0
    integral: float = 0.0  # log lambda's integral part
    value: float = 1.0
    bounds: tuple[float, float] = (-10.0, 10.0)  # of log lambda
    last: float | None = None  # the previous violation

    def update(self, violation: float) -> None:
        closing = self.last is not None and abs(violation) < abs(self.last) and violation * self.last > 0
        if not closing:  # anti-windup: while the gap closes, the integral holds
            self.integral = float(np.clip(self.integral + self.rate * violation, *self.bounds))
        self.value = math.exp(float(np.clip(self.integral + self.gain * violation, *self.bounds)))
        self.last = violation


@dataclass
class BudgetGlide:
    """Where the expected cost should be at each step: from where it starts down to the budget
    over the first `steps` steps (linearly), then the budget. A constraint met at once from near
    the dense model drives the multiplier up while the logits lag behind, then overshoots far
    under the budget, where the softmax saturates and cannot climb back; a gliding target keeps
    the violation, and so the multiplier, small."""

    start: float
    budget: float
    steps: int

    def target(self, step: int) -> float:
        left = max(0.0, 1.0 - step / max(1, self.steps))
        return self.budget + max(0.0, self.start - self.budget) * left


def starting_lean(problem: BudgetProblem, logits: WidthLogits, *, most: float, start: float, tau: float) -> float:
    """The lean (at most `most`) at which the expected cost starts at `start` x the budget, and
    the logits set to it. Near the dense model is where the search should start, but a tight
    budget is then too far away for the steps given: the expected cost still lags above it when
    the softmax has settled."""

    def expected(lean: float) -> float:
        logits.lean(lean)
        with torch.no_grad():
            return float(ExpectedCost(problem, logits.counts(problem, logits.picks()))(logits.probs(tau)))

    target = start * problem.budget
    lo, hi = -most, most
    if expected(hi) <= target:
        lean = hi
    elif expected(lo) >= target:
        lean = lo
    else:
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid) < target else (lo, mid)
        lean = lo
    logits.lean(lean)
    return lean


def frozen_student(base: nn.Module, device: str) -> nn.Module:
    """A copy of `base` whose weights do not train and whose BatchNorm uses batch statistics.

    Why frozen: the proxy that scores the plans prunes the *base* weights and recalibrates
    BatchNorm, without training (by default); BatchNorm on batch statistics is that recalibration
    done on the fly for whatever widths the masks give, so each step's loss is that of a plan as
    the proxy runs it, distilled from the dense model. Training the weights too (DARTS's bilevel
    problem) would optimise widths for weights the scored plans never get, cost a weight update
    per step, and may favour, as DARTS is known to, the choices that train fastest rather than
    the best ones. Everything else (dropout) is in eval mode: nothing random in the forward."""
    student = copy.deepcopy(base).to(device).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for m in student.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return student


def distillation_stream(task, teacher: nn.Module, *, seed: int, steps: int, device: str) -> Iterator[tuple]:
    """`steps` (batch, the dense model's outputs on it) from the task's training data, in the
    seed's order, over as many epochs as it takes; the teacher's outputs without gradients."""
    from edgeprune.training.train import to_device

    done, epoch = 0, 0
    while done < steps:
        before = done
        for batch in task.train.batches(seed=seed, epoch=epoch, limit=steps - done):
            batch = to_device(batch, device)
            with torch.no_grad():
                target = teacher(task.input_of(batch))
            yield batch, target
            done += 1
        if done == before:
            raise EdgepruneError("--search darts needs training batches; the task's train data yielded none")
        epoch += 1


class DifferentiableWidths(Searcher):
    """`--search darts`: keep-count distributions learnt by gradient descent on distillation loss
    plus the table's expected latency, then the most likely plan and samples of the distributions.

    `steps` gradient steps (one training batch each) with Adam at `lr` on the logits; the
    softmax temperature anneals geometrically from `temperature[0]` to `temperature[1]`; the
    table is re-linearised around the most likely plan every `relinearise` steps; the latency
    multiplier follows `BudgetMultiplier` at `dual_rate` (integral) and `dual_gain` (proportional);
    `lean` sets how near the dense model the logits start, `start` how far above the budget their
    expected cost may start (`starting_lean`); `shrink`, over which share of the steps
    the target glides down to the budget; `relaxation`, what the network runs (`RELAXATIONS`);
    `device`, where (a copy of the model; the base model stays put). Defaults: resnet20 at 28x28,
    batches of 128: about 0.5 s a step on one CPU thread, under a minute in all."""

    name = "darts"

    def __init__(
        self,
        problem: BudgetProblem,
        *,
        evals: int,
        seed: int = 0,
        context: SearchContext | None = None,
        steps: int = 100,
        lr: float = 0.1,
        temperature: tuple[float, float] = (1.0, 0.5),
        relinearise: int = 10,
        dual_rate: float = 1.0,
        dual_gain: float = 5.0,
        lean: float = 4.0,
        start: float = 1.3,
        shrink: float = 0.5,
        relaxation: str = "gumbel",
        device: str = "cpu",
    ) -> None:
        super().__init__(problem, evals=evals, seed=seed)
        self.context = _checked_context(problem, context)
        self.steps, self.lr, self.temperature = steps, lr, temperature
        self.relinearise, self.dual_rate, self.lean, self.device = relinearise, dual_rate, lean, device
        self.shrink, self.relaxation, self.dual_gain, self.start = shrink, relaxation, dual_gain, start
        if relaxation not in RELAXATIONS:
            raise choices_error("darts relaxation", relaxation, RELAXATIONS)
        self.masks = ChannelMasks(problem.space, groups=problem.variables, criterion=self.context.criterion, depth=True)
        self.trace: list[DartsStep] = []  # the optimisation, step by step
        self.logits: WidthLogits | None = None  # learnt on the first ask
        self.seconds = 0.0  # wall time of the optimisation
        self._exhausted = False

    # ----- the optimisation -----
    def tau(self, step: int) -> float:
        """The softmax temperature at `step`: geometric from temperature[0] to temperature[1]."""
        t0, t1 = self.temperature
        return t0 * (t1 / t0) ** (step / max(1, self.steps - 1))

    def learn(self) -> WidthLogits:
        """Run the optimisation (once): the logits after `steps` steps, the trace recorded."""
        if self.logits is not None:
            return self.logits
        from edgeprune.progress import progress_bar

        t0 = time.perf_counter()
        logits = WidthLogits(self.problem, self.masks, lean=self.lean)
        starting_lean(self.problem, logits, most=self.lean, start=self.start, tau=self.temperature[0])
        logits.to(self.device)
        # nothing here draws at random, but a model whose forward does stays repeatable (the caller's
        # random state untouched)
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), progress_bar(enabled=self.context.progress) as bar:
            torch.manual_seed(self.seed)
            task = bar.add_task("search darts: learning widths", total=self.steps, status="")
            for record in self._descend(logits):
                self.trace.append(record)
                status = f"E[cost] {record.expected_cost:.4g} / {self.problem.budget:.4g} {self.problem.unit}"
                bar.update(task, completed=record.step + 1, status=status)
        self.logits, self.seconds = logits, time.perf_counter() - t0
        self.context.log(self._summary())
        return logits

    def _descend(self, logits: WidthLogits) -> Iterator[DartsStep]:
        """Gradient steps on the logits (Adam, cosine learning rate); yields each step's record."""
        problem, task = self.problem, self.context.task
        teacher = copy.deepcopy(problem.space.base).to(self.device).eval()  # the base model is never touched
        student = frozen_student(problem.space.base, self.device)
        cost = ExpectedCost(problem, logits.counts(problem, logits.picks()))
        multiplier = BudgetMultiplier(rate=self.dual_rate, gain=self.dual_gain)
        opt = torch.optim.Adam(logits.parameters(), lr=self.lr)
        stream = distillation_stream(task, teacher, seed=self.seed, steps=self.steps, device=self.device)
        glide: BudgetGlide | None = None
        generator = torch.Generator().manual_seed(self.seed)
        for step, (batch, target) in enumerate(stream):
            if step and step % self.relinearise == 0:
                cost.around(logits.counts(problem, logits.picks()))
            tau = self.tau(step)
            probs = logits.probs(tau)
            mix = probs if self.relaxation == "expected" else logits.straight_through(tau, generator)
            with self.masks.applied(student, logits.soft_masks(mix), logits.soft_gates(mix)):
                task_loss = task.loss(student(task.input_of(batch)), target, batch)
            expected = cost(probs)
            if glide is None:
                glide = BudgetGlide(float(expected.detach()), problem.budget, round(self.shrink * self.steps))
            violation = (expected - glide.target(step)) / problem.budget
            for group in opt.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
            opt.zero_grad(set_to_none=True)
            (task_loss + multiplier.value * violation).backward()
            opt.step()
            multiplier.update(float(violation.detach()))
            plan_cost = float(problem.cost(logits.counts(problem, logits.picks())[None])[0])
            yield DartsStep(step, float(task_loss.detach()), float(expected.detach()), plan_cost, multiplier.value, tau)

    def _summary(self) -> str:
        problem, last, unit = self.problem, self.trace[-1], self.problem.unit
        plan = self.plan()
        ratios = plan[problem.variables] / np.array([problem.space.groups[g].width for g in problem.variables])
        return (
            f"darts: {len(self.trace)} steps in {self.seconds:.1f} s; expected cost {last.expected_cost:.4g} {unit}, "
            f"most likely plan {last.plan_cost:.4g} {unit}, fitted to the budget {problem.budget:.4g} {unit}: "
            f"{float(problem.cost(plan[None])[0]):.4g} {unit}; keep ratios {np.round(ratios, 2).tolist()}"
        )

    # ----- proposals -----
    def log_probs(self) -> list[np.ndarray]:
        """Per variable group, the learnt log-probabilities of its choices (at the final temperature)."""
        logits = self.learn()
        with torch.no_grad():
            return [torch.log_softmax(a / self.temperature[1], 0).cpu().double().numpy() for a in logits.logits]

    def probabilities(self) -> list[np.ndarray]:
        """Per variable group, the learnt distribution over its choices (at the final temperature)."""
        return [np.exp(lp) for lp in self.log_probs()]

    def plan(self) -> np.ndarray:
        """The derived plan: each group's most likely keep-count (DARTS's argmax), then fitted to
        the budget by `fit_to_budget` (the argmax of distributions that meet the budget only in
        expectation may miss it either way)."""
        logits = self.learn()
        return logits.counts(
            self.problem, fit_to_budget(self.problem, logits.choices, self.log_probs(), logits.picks())
        )

    def ask(self) -> np.ndarray:
        if self.asked == 0:
            return self.problem.u_of_counts(self.plan())[0]
        return self._sample()

    def _sample(self, tries: int = 64) -> np.ndarray:
        """A plan drawn from the learnt distributions and fitted to the budget, the first of `tries`
        that is new; the draws keyed by the number of proposals so far (a replayed run proposes
        the same). After `tries` plans already taken, the searcher is done."""
        rng = np.random.default_rng([self.seed, self.asked])
        log_probs, logits, taken = self.log_probs(), self.learn(), self.taken()
        for _ in range(tries):
            picks = [int(rng.choice(len(lp), p=np.exp(lp) / np.exp(lp).sum())) for lp in log_probs]
            picks = fit_to_budget(self.problem, logits.choices, log_probs, picks)
            u = self.problem.u_of_counts(logits.counts(self.problem, picks))[0]
            counts = self.problem.repair(u[None], fill=self.fill).counts[0]
            if tuple(int(c) for c in counts) not in taken:
                return u
        self._exhausted = True
        return u

    @property
    def done(self) -> bool:
        return self._exhausted

    def state(self) -> dict:
        if not self.trace:
            return {}
        last = self.trace[-1]
        return {"expected_cost": round(last.expected_cost, 4), "multiplier": round(last.multiplier, 4)}


def fit_to_budget(
    problem: BudgetProblem, choices: list[np.ndarray], log_probs: list[np.ndarray], picks: list[int]
) -> list[int]:
    """The choices `picks` moved, one group at a time, to a likely plan that fits the budget and
    leaves no room for a wider choice: while over the budget, the move that gives up the least
    log-probability per unit of cost saved; then, while a wider choice fits, one that costs no
    more than the current (on a device's table, a wider count can run faster), else the one that
    gives up the least log-probability per unit of cost added. Any choice of a group is a move
    (learnt distributions are often bimodal: the narrowest and the widest count, the ones between
    costing as much as the widest on the device or helping as little as the narrowest). Greedy,
    on the problem's real cost."""
    picks, budget = list(picks), problem.budget
    moves = [(j, i) for j, c in enumerate(choices) for i in range(len(c))]
    while True:
        rows = np.repeat(_counts(problem, choices, picks)[None], len(moves), axis=0)
        for row, (j, i) in zip(rows, moves):
            row[problem.variables[j]] = choices[j][i]
        cost = np.asarray(problem.cost(rows), float)
        current = float(problem.cost(_counts(problem, choices, picks)[None])[0])
        gain = np.array([log_probs[j][i] - log_probs[j][picks[j]] for j, i in moves])
        if current > budget:
            ok, per = cost < current, gain / np.maximum(current - cost, 1e-30)
        else:  # wider choices only (each move adds channels: no cycle); a wider one that costs no more first
            wider = np.array([i > picks[j] for j, i in moves])
            added = cost - current
            ok = wider & (cost <= budget)
            per = np.where(added <= 0, 1e6 + gain, gain / np.maximum(added, 1e-30))
        if not ok.any():
            return picks
        j, i = moves[int(np.argmax(np.where(ok, per, -np.inf)))]
        picks[j] = i


def _counts(problem: BudgetProblem, choices: list[np.ndarray], picks: list[int]) -> np.ndarray:
    counts = np.asarray(problem.space.full_counts(), dtype=np.int64)
    for g, c, i in zip(problem.variables, choices, picks):
        counts[g] = c[i]
    return counts


def _checked_context(problem: BudgetProblem, context: SearchContext | None) -> SearchContext:
    """The context, refusing in one line what this searcher cannot work with."""
    if context is None or context.task is None:
        raise EdgepruneError(
            "--search darts needs the model's task (training batches and loss): pass context=SearchContext(task=...)"
        )
    if problem.space.base is None:
        raise EdgepruneError("--search darts needs the base model: build the space from the model")
    return context
