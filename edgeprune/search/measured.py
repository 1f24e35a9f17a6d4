"""The measured search: edgeprune's central idea as one object.

Search plans on the latency table, measure the best candidates on the device against the dense
model, and move the search budget by what the device says:

- where no candidate met the budget, the search budget is tightened by the observed prediction
  error (`tightened_budget`) and the search continues (`max_rounds` at most; a resume may grant more);
- where the chosen plan measures well under the target instead (a pessimistic table), the
  search budget is loosened once (`loosened_budget`): the budget is the user's to spend on
  accuracy, and a plan from the looser round is kept only if it measures in (`after_loosening`).

What a candidate is held to is the figure validation decides on (latency/verdict.py): the
statistic the device profile names (`verdict_statistic`: the median of the model's steady runs by
default, p90 for hard real time), so a plan the check keeps is a plan validation passes. A budget
that is a share of dense is held as a ratio: the dense model is measured again beside each round's
candidates (`PlanMeter.referred`) and the candidates referred to it, like for like, so a device
that drifted since the start does not move the goal. Every measurement is in turn with the others,
in short windows (latency/interleave.py); every evaluation and measurement is in the run's store as
it happens: a killed run resumes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.latency.verdict import STATISTICS


def cost_at(target_ms: float, lower: tuple[float, float], upper: tuple[float, float]) -> float:
    """The cost at which the line through two measured (cost, ms) points reaches `target_ms` (the
    lower point's cost where the two do not rise)."""
    (x0, y0), (x1, y1) = lower, upper
    return x0 + (target_ms - y0) * (x1 - x0) / (y1 - y0) if y1 > y0 else x0


def tightened_budget(current: float, target_ms: float, points: list[tuple[float, float]], rounds: list) -> float:
    """The search budget (in cost units) at which plans should measure just under `target_ms`.

    `points` are (cost, measured ms) of the dense model, the smallest plan and every measured
    candidate; `rounds` the most favourable candidate (lowest measured/cost) of each round so far.
    Latency is monotone in cost but far from proportional (half the MACs can keep 75 % of the
    time), so two estimates bound the step: the latest round's candidate scaled by its own
    measured/cost ratio (gentle, right for a near miss) and the budget interpolated between the
    measured points that bracket it (bold, never extrapolating). From the second round on, a
    least-squares line through the rounds' candidates (with two rounds, their secant) picks a
    point between them; where noise tilts that line the wrong way, the midpoint is taken, since
    the gentle step has already fallen short once. Before that the gentle one wins. Always at
    least 1 % tighter than `current`."""
    pts = sorted(points)
    below = [p for p in pts if p[1] <= target_ms]
    above = [p for p in pts if p[1] > target_ms and (not below or p[0] > below[-1][0])]
    if not below:  # nothing measured fits yet: fall back on the ratio of the cheapest point
        x, y = pts[0]
        interpolated = x * target_ms / y
    else:
        interpolated = cost_at(target_ms, below[-1], above[0] if above else below[-1])
    cost, measured = rounds[-1]
    scaled = cost * target_ms / measured
    lo, hi = sorted((interpolated, scaled))
    estimate = hi
    if len(rounds) >= 2:
        c, m = np.array(rounds, dtype=float).T
        slope = np.polyfit(c, m, 1)[0] if np.ptp(c) > 1e-12 else 0.0
        if slope > 0:
            estimate = float(np.clip(c.mean() + (target_ms - m.mean()) / slope, lo, hi))
        else:
            estimate = (lo + hi) / 2
    return min(estimate * 0.995, current * 0.99)


def loosened_budget(current: float, target_ms: float, points: list[tuple[float, float]]) -> float | None:
    """A search budget (in cost units) at which plans should measure just under `target_ms`, where
    the measured plans came out well under it; None where that is not at least 1 % looser.

    `points` are (cost, measured ms) of the dense model and the measured candidates. The estimate
    interpolates between the costliest plan that measured in and the cheapest costlier point that
    measured over (the dense model at worst), never extrapolating, 0.5 % short of the target as a
    tightening aims."""
    pts = sorted(points)
    below = [p for p in pts if p[1] <= target_ms]
    if not below:
        return None
    above = [p for p in pts if p[1] > target_ms and p[0] > below[-1][0]]
    if not above:
        return None
    estimate = 0.995 * cost_at(target_ms, below[-1], above[0])
    return estimate if estimate > current * 1.01 else None


def after_loosening(chosen, ok: list, stage: int, task, target_ms: float, log):
    """The plan to keep where an earlier round's plan outscores the looser round's (`ok`: the
    (evaluation, measurement) pairs within the target; `chosen`: the best scoring, from before;
    `task`: whose `resolution` says how far apart two scores must be to be told apart).

    The looser round exists to spend the budget left over on accuracy. Where its best plan scores
    within the proxy's resolution of the earlier one, the proxy cannot tell them apart, and the
    earlier one is the best of many more evaluations (the luckiest as much as the best); the looser
    plan keeps more channels within the same budget, and is kept."""
    looser = [rm for rm in ok if rm[1]["round"] == stage]
    if not looser:
        log(
            f"the looser round's candidates measured over {target_ms:.4g} ms on the device; keeping the "
            f"round-{chosen[1]['round']} plan ({chosen[1]['measured_ms']:.4g} ms)"
        )
        return chosen
    best = max(looser, key=lambda rm: (rm[0]["score"], -rm[1]["measured_ms"]))
    gap, within = chosen[0]["score"] - best[0]["score"], task.resolution(chosen[0]["score"])
    top1 = bool(task.images)
    score = (lambda v: f"{v:.2%}") if top1 else (lambda v: f"{v:.4g}")
    if gap <= within:
        note = f"{within:.1%} on {task.images} held-out images" if top1 else f"{within:.3g}"
        log(
            f"the looser round's best plan scores {score(best[0]['score'])}, within the proxy's resolution "
            f"({note}) of the round-{chosen[1]['round']} plan's {score(chosen[0]['score'])}: keeping the looser plan "
            f"({best[1]['measured_ms']:.4g} ms against {chosen[1]['measured_ms']:.4g}), which spends more of the budget"
        )
        return best
    log(
        f"the looser round's candidates scored lower (best {score(best[0]['score'])}, {score(gap)} under, more than "
        f"the proxy's resolution); keeping the round-{chosen[1]['round']} plan ({chosen[1]['measured_ms']:.4g} ms)"
    )
    return chosen


@dataclass
class Referred:
    """Plans measured beside the dense model: their raw measurements, the dense one beside them
    (empty where the budget is in ms and nothing was measured beside), and the factor that refers
    the plans to the dense model as measured at the start."""

    raw: list[dict]
    beside: list[float]
    refer: float


HELD = (*STATISTICS, "quietest")  # "quietest": a run started before the check named a statistic


def held_figure(m: dict, statistic: str) -> float:
    """The figure of measurement M (a Measurement's dict) held against a budget: `statistic` of its
    steady runs (latency/verdict.py), or its quietest window's median."""
    steady = (m.get("extra") or {}).get("steady")
    return m["median_ms"] if statistic == "quietest" or not steady else steady[f"{statistic}_ms"]


def held_name(statistic: str | None) -> str:
    """What a held figure is, in words ("median of steady runs"); None: a run from before the check
    named a statistic (its quietest window)."""
    return "quietest window" if statistic in (None, "quietest") else f"{statistic} of steady runs"


class PlanMeter:
    """Exports plans of the space and measures them on the device, in turn (in many short windows).
    For a budget that is a share of dense, beside the dense model. `statistic`: what a plan is held
    to (`held_figure`)."""

    def __init__(
        self,
        space,
        device,
        *,
        criterion: str,
        relative: bool,
        statistic: str = "median",
        progress: bool = True,
        log=print,
        noise=None,
    ) -> None:
        from edgeprune.latency.interleave import NoiseNote

        if statistic not in HELD:
            raise EdgepruneError(f"unknown statistic {statistic!r}; choose one of {list(HELD)}")
        self.space, self.device, self.criterion, self.relative = space, device, criterion, relative
        self.statistic, self.progress, self.log = statistic, progress, log
        self.noise = noise if noise is not None else NoiseNote()  # the run's: a noisy device is said once
        self.dense_ms: float | None = None  # the dense model's held figure, measured at the start
        self.dense_quietest_ms: float | None = None  # ... and its quietest window: its time on a quiet device
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeprune-meter-")

    def close(self) -> None:
        self._tmp.cleanup()

    def measure(self, plans: list, settle: float | None = None) -> list[dict]:
        """PLANS exported and measured in turn; `settle`: the first plan's quiet time (the dense
        model's: measure on while it is slower, or while a plan pruned from it measures slower
        than it, a slow phase either way)."""
        from edgeprune.latency import interleave
        from edgeprune.models.onnx import export_onnx
        from edgeprune.progress import progress_bar

        full = [list(map(int, c)) == list(self.space.full_counts()) for c in plans]
        n = len(plans) - sum(full)
        what = " and ".join(["the dense model"] * any(full) + [f"{n} candidate{'s' * (n > 1)}"] * bool(n))
        shape, items = self.space.input_shape, []
        with progress_bar(enabled=self.progress and len(plans) > 1) as bar:  # a second or more each under load
            task = bar.add_task(f"exporting {what}", total=len(plans), status="models")
            for i, counts in enumerate(plans):
                pruned = self.space.plan([int(c) for c in counts], criterion=self.criterion).apply(self.space.base)
                items.append((export_onnx(pruned, shape, Path(self._tmp.name) / f"m{i}.onnx"), shape))
                bar.advance(task)
        beside = {"settle": (0, settle), "pruned": (0, range(1, len(items)))} if settle else {}
        what += f" on {self.device.name}"
        with interleave.rounds_progress(f"measuring {what}", len(items), enabled=self.progress) as shown:
            measured = interleave.measure_interleaved(self.device, items, on_result=shown, **beside)
        for dense, m in zip(full, measured):
            self.noise.note("dense" if dense else "pruned", m.extra["rounds_ms"], self.log)
        return [m.to_dict() for m in measured]

    def measure_dense(self) -> tuple[float, float]:
        """The dense model alone, at the start: its held figure (the budget and the anchor hang on
        it) and its quietest window."""
        m = self.measure([self.space.full_counts()])[0]
        return self.held(m), m["median_ms"]

    def held(self, m: dict) -> float:
        """Measurement M's figure held against the budget (`held_figure` of this meter's statistic)."""
        return held_figure(m, self.statistic)

    def referred(self, plans: list) -> Referred:
        """Measure PLANS; for a budget that is a share of dense, beside the dense model.

        Such a budget is a ratio: the dense model is measured again, in turn with the plans, and
        they are referred to it (scaled by the dense model's held figure at the start / beside
        them), so a device that drifted since the start (a shared machine, a board warming up)
        moves both sides of the ratio alike."""
        if not plans:
            return Referred([], [], 1.0)
        if not self.relative:
            return Referred(self.measure(plans), [], 1.0)
        settle = self.dense_quietest_ms or self.dense_ms
        dense_now, *raw = self.measure([self.space.full_counts(), *plans], settle=settle)
        return Referred(raw, [self.held(dense_now)], self.dense_ms / self.held(dense_now))

    def described(self) -> str:
        """What the figures held against the budget are, for a log line."""
        return held_name(self.statistic) + (", referred to the dense model beside them" if self.relative else "")

    def log_referral(self, r: Referred, what: str) -> None:
        if r.beside and abs(r.refer - 1) > 0.01:
            self.log(
                f"the dense model measures {r.beside[0]:.4g} ms beside {what} "
                f"({self.dense_ms:.4g} ms at the start): scaled by {r.refer:.3f} to match"
            )


@dataclass
class Choice:
    """What the measured search settled on: the evaluation row and its measurement."""

    row: dict
    measurement: dict
    met: bool
    rounds: int


class MeasuredSearch:
    """Search on the table, measure the best candidates on the device, tighten or loosen, repeat."""

    def __init__(
        self,
        *,
        problem,
        meter: PlanMeter,
        store,
        settings,
        budget_ms: float,
        target_ms: float,
        dense_cost: float,
        log=print,
    ) -> None:
        self.problem, self.meter, self.store, self.settings = problem, meter, store, settings
        self.budget_ms, self.target_ms, self.dense_cost = budget_ms, target_ms, dense_cost
        self.log = log
        self.smallest_counts, self.smallest_cost = problem.smallest()

    @property
    def device(self) -> str:
        return self.meter.device.name

    def smallest_plan_ms(self, why: str = "") -> float:
        """The smallest plan measured (referred like the candidates), once per run: it brackets a
        tightening from below, and holds a table's 'out of reach' against the device."""
        if self.store.get("smallest_plan_ms") is None:
            self.log(f"{why}measuring the smallest plan of the space on {self.device} ...")
            r = self.meter.referred([self.smallest_counts])
            self.meter.log_referral(r, "the smallest plan")
            self.store.set("smallest_plan_ms", self.meter.held(r.raw[0]) * r.refer)
        return self.store.get("smallest_plan_ms")

    def start(self, budget: float, refit: str) -> None:
        """Set the first search budget (cost units). Where the table rates every plan over it, the
        refusal rests on the device: a line fitted while the device was busy can be wrong at this
        end, so the smallest plan is measured, and where it meets the target after all, the budget
        is mapped through it and the dense model, the two ends the device has measured."""
        unit, dense_ms = self.problem.unit, self.meter.dense_ms
        if self.settings.cost == "latency" and self.store.get("search_budget") is None and budget < self.smallest_cost:
            smallest_ms = self.smallest_plan_ms(
                f"the table rates even the smallest plan of the space over the budget ({self.smallest_cost:.4g} > "
                f"{budget:.4g} {unit}): "
            )
            if smallest_ms > self.target_ms:
                raise EdgepruneError(
                    f"budget {self.budget_ms:.4g} ms is out of reach on {self.device}: the smallest plan this search "
                    f"space reaches measures {smallest_ms:.4g} ms there, over the budget less its "
                    f"{self.settings.margin:.0%} margin ({self.target_ms:.4g} ms); {self.problem.widen_hint()}"
                )
            if self.smallest_cost >= self.dense_cost:
                raise EdgepruneError(
                    f"the table rates the smallest plan of the space ({self.smallest_cost:.4g} {unit}) as slow as "
                    f"the dense model ({self.dense_cost:.4g}), but it measures {smallest_ms:.4g} ms against "
                    f"{dense_ms:.4g}: the table's calibration is unusable; refit it when {self.device} is quiet: "
                    f"{refit}"
                )
            mapped = cost_at(self.target_ms, (self.smallest_cost, smallest_ms), (self.dense_cost, dense_ms))
            budget = max(self.smallest_cost, 0.995 * mapped)
            self.log(
                f"the smallest plan measures {smallest_ms:.4g} ms on {self.device}, within the {self.target_ms:.4g} ms "
                f"target: the table's line is off at this end. The search budget is set between the smallest plan "
                f"and the dense model as measured, {budget:.4g} {unit}; the measured check corrects the rest "
                f"(refit the table when {self.device} is quiet: {refit})"
            )
        self.problem.set_budget(self.store.get("search_budget", budget))

    def run(self, loop, task) -> Choice:
        """Search, measure, move the budget, until a round's best measured plan meets the target
        (or no round is left)."""
        s = self.settings
        stage = self.store.get("round", 0)
        extra = max(10, s.evals // 4)
        while True:
            loop.run(s.evals + stage * extra, stage=stage)
            measured, ok, by_counts = self._measure_round(loop, stage)
            if ok:
                chosen = max(ok, key=lambda rm: (rm[0]["score"], -rm[1]["measured_ms"]))
                if self.store.get("loosened_from") is not None:
                    if chosen[1]["round"] < stage:
                        chosen = after_loosening(chosen, ok, stage, task, self.target_ms, self.log)
                    return Choice(*chosen, True, stage + 1)
                if not self._loosen(chosen, measured, by_counts, stage, extra):
                    return Choice(*chosen, True, stage + 1)
            elif stage >= s.max_rounds or not measured or not self._tighten(measured, by_counts, extra):
                return self._fastest(loop, stage)
            stage += 1
            self.store.set("round", stage)

    def _measure_round(self, loop, stage: int) -> tuple[dict, list, dict]:
        """Measure the round's best new candidates; (every measurement by counts, the (evaluation,
        measurement) pairs within the target, the evaluations by counts)."""
        measured = {tuple(m["counts"]): m for m in self.store.measurements()}
        fits = [r for r in loop.rows if r["cost"] <= self.problem.budget * (1 + 1e-9) and not r["duplicate"]]
        fits.sort(key=lambda r: (-r["score"], r["cost"]))
        todo = [r for r in fits if tuple(r["counts"]) not in measured][: self.settings.measure_top]
        if todo:
            from edgeprune.latency.interleave import ROUNDS

            self.log(
                f"measuring the {len(todo)} best new candidates on {self.device} "
                f"(in turn, {ROUNDS}+ short windows each) ..."
            )
        r = self.meter.referred([row["counts"] for row in todo])
        for row, m in zip(todo, r.raw):
            record = {
                "counts": row["counts"],
                "plan_hash": row["plan_hash"],
                "round": stage,
                "predicted_ms": row.get("predicted_ms"),
                "measured_ms": self.meter.held(m) * r.refer,  # what is held against the target
                "raw_ms": m["median_ms"],  # the quietest window, as measured
                "dense_beside_ms": r.beside[0] if r.beside else None,
                "p90_ms": m["p90_ms"] * r.refer,
                "cv": m["cv"],
                "n": m["n"],
                # every window's runs pooled, as measured (not referred): the figures a validation's verdict decides on
                **_steady(m),
            }
            self.store.add_measurement(record)
            measured[tuple(row["counts"])] = record
        self.meter.log_referral(r, "these candidates")
        self._say_slower(r)
        by_counts = {tuple(row["counts"]): row for row in loop.rows}
        ok = [(by_counts[k], m) for k, m in measured.items() if m["measured_ms"] <= self.target_ms]
        if todo:
            self.log(
                f"measured {len(todo)} candidates on {self.device}: "
                + ", ".join(f"{measured[tuple(row['counts'])]['measured_ms']:.4g}" for row in todo)
                + f" ms, {self.meter.described()} (budget {self.budget_ms:.4g} ms, {self.target_ms:.4g} with the "
                f"{self.settings.margin:.0%} margin)"
            )
        return measured, ok, by_counts

    def _say_slower(self, r: Referred) -> None:
        from edgeprune.latency.interleave import PRUNED_OVER

        slower = [m["median_ms"] for m in r.raw if r.beside and m["median_ms"] > r.beside[0] * (1 + PRUNED_OVER)]
        if slower:
            self.log(
                f"{len(slower)} of these candidates measure slower than the dense model beside them "
                f"({', '.join(f'{ms:.4g}' for ms in slower)} vs {r.beside[0]:.4g} ms) even after measuring on: "
                f"{self.device} may run their channel counts on slower kernels than the dense model's"
            )

    def _loosen(self, chosen, measured: dict, by_counts: dict, stage: int, extra: int) -> bool:
        """Loosen the search budget once where the chosen plan measures well under the target;
        whether the search goes on."""
        s = self.settings
        slack = 1 - chosen[1]["measured_ms"] / self.target_ms
        if s.cost != "latency" or s.loosen == 0 or slack < s.loosen or stage >= s.max_rounds:
            return False
        points = [(self.dense_cost, self.meter.dense_ms)]
        points += [(by_counts[k]["cost"], m["measured_ms"]) for k, m in measured.items() if k in by_counts]
        looser = loosened_budget(self.problem.budget, self.target_ms, points)
        if looser is None:
            return False
        self.log(
            f"the best candidate measures {chosen[1]['measured_ms']:.4g} ms, {slack:.0%} under the "
            f"{self.target_ms:.4g} ms target: search budget {self.problem.budget:.4g} -> {looser:.4g} "
            f"{self.problem.unit} (from the measured plans), {extra} more evaluations to spend the rest on accuracy"
        )
        self.problem.set_budget(looser)
        self.store.set("search_budget", looser)
        self.store.set("loosened_from", chosen[1]["round"])  # once per run
        return True

    def _tighten(self, measured: dict, by_counts: dict, extra: int) -> bool:
        """Tighten the search budget after a round that missed; whether the search goes on."""
        # bracket the budget from below once
        smallest_ms = self.smallest_plan_ms("")
        if smallest_ms > self.target_ms:
            self.log(
                f"even the smallest plan of the space measures {smallest_ms:.4g} ms on "
                f"{self.device}, over the {self.target_ms:.4g} ms target (budget less the margin)"
            )
            return False
        points = [(self.dense_cost, self.meter.dense_ms), (self.smallest_cost, smallest_ms)]
        points += [(by_counts[k]["cost"], m["measured_ms"]) for k, m in measured.items() if k in by_counts]
        per_round: dict[int, tuple[float, float]] = {}  # each round's most favourable candidate
        for k, m in measured.items():
            if k in by_counts:
                c = (by_counts[k]["cost"], m["measured_ms"])
                seen = per_round.get(m["round"])
                if seen is None or c[1] / c[0] < seen[1] / seen[0]:
                    per_round[m["round"]] = c
        rounds = [per_round[r] for r in sorted(per_round)]
        new_budget = max(tightened_budget(self.problem.budget, self.target_ms, points, rounds), self.smallest_cost)
        if new_budget >= self.problem.budget:
            return False  # already at the smallest plan the space allows
        self.log(
            f"no candidate met {self.target_ms:.4g} ms on the device; search budget {self.problem.budget:.4g} -> "
            f"{new_budget:.4g} {self.problem.unit} (from the measured plans), {extra} more evaluations"
        )
        self.problem.set_budget(new_budget)
        self.store.set("search_budget", new_budget)
        return True

    def _fastest(self, loop, stage: int) -> Choice:
        """No plan met the budget: the fastest measured, with the warning that says what to do."""
        everything = self.store.measurements()
        if not everything:
            raise EdgepruneError("no candidate was measured on the device; nothing to choose from")
        best = min(everything, key=lambda m: m["measured_ms"])
        self.log(
            f"warning: no plan met the {self.budget_ms:.4g} ms budget on {self.device} after {stage + 1} rounds; "
            f"keeping the fastest measured ({best['measured_ms']:.4g} ms): lower --min-keep, add --depth "
            "or raise the budget (or, if the measurements were still closing in, --resume with a larger --max-rounds)"
        )
        return Choice({r["plan_hash"]: r for r in loop.rows}[best["plan_hash"]], best, False, stage + 1)


def _steady(m: dict) -> dict:
    """A measurement's steady-run median and p90 (latency/verdict.py), None where it has none."""
    steady = (m.get("extra") or {}).get("steady") or {}
    return {"steady_median_ms": steady.get("median_ms"), "steady_p90_ms": steady.get("p90_ms")}
