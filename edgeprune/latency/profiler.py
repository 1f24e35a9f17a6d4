"""Profiler: measure every layer configuration a model's prunable space can reach, on a device.

Configurations are de-duplicated, turned into single-unit ONNX models (alone, or in context as
K summed copies against one: see `unit_model`), measured in batches
(locally or through an agent) and written to the table after every batch, so an interrupted
profile resumes where it stopped. A few whole-model measurements of random plans then fit the
predictor's calibration (hardware in the loop).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeprune.checks import POSITIVE, POSITIVE_OR_NONE, Rule, check_value, check_values
from edgeprune.devices import Device
from edgeprune.errors import EdgepruneError
from edgeprune.latency.interleave import ROUNDS, measure_interleaved, rounds_progress, window_seconds
from edgeprune.latency.layers import LayerConfig, ModelLayers, unit_model
from edgeprune.latency.measurement import Measurement, Protocol
from edgeprune.latency.predictor import Predictor
from edgeprune.latency.table import LatencyTable, calibration_key, fingerprint_diff
from edgeprune.progress import progress_bar

# Single units are fast and many: a lighter protocol than whole models (stored in the table).
UNIT_PROTOCOL = Protocol(
    warmup_runs=3, warmup_s=0.02, min_runs=20, min_s=0.02, precision=0.01, max_s=0.25, max_cv=0.15, retries=2
)
# how a unit is measured in context (copies > 1): each copy's output reduced as it is written
# (unit_model's `reduced`); on an int8 device pooled first, in int8, as a graph's next layer reads
# it (unit_model's `pooled`); tables of another way ("summed": the earlier one) are not extended
UNIT_CONTEXT = "reduced"
INT8_UNIT_CONTEXT = "pooled"


def unit_context(device) -> str:
    """How `device`'s units are measured in context (UNIT_CONTEXT or INT8_UNIT_CONTEXT)."""
    return INT8_UNIT_CONTEXT if device.spec.precision == "int8" else UNIT_CONTEXT


UNIT_ROUNDS = 4  # short windows per unit (the windows replace the precision rule: see measure_configs)
STEP_CANDIDATES = (32, 16, 8, 4, 2)
# A calibration line that misses its own whole-model points by more than this (median) was most
# likely fitted on a busy device (bench/README.md, "Calibration scatter": what quiet and busy fits miss by)
CALIBRATION_SCATTER = 0.05
# ... and one that misses the dense model's own measurement by more than this: prune refers every
# prediction to that one measurement (dense now / dense then), so an outlier there moves them all.
# The shipped lines miss it by 0.0-6.6 %, OpenVINO mobilenet_v2_cifar's by 9.6 %.
DENSE_MISS = 0.10


def measure_configs(
    device: Device,
    configs: list[LayerConfig],
    protocol: Protocol,
    on_result=None,
    *,
    copies: int = 1,
    rounds: int = UNIT_ROUNDS,
) -> list[Measurement]:
    """Measure single-unit models of `configs` on `device`, in turn, `rounds` short windows each,
    each keeping its quietest (edgeprune/latency/interleave.py: a slow phase of a shared machine
    spans many units and would otherwise inflate them all).

    With `copies` > 1, each configuration is measured as one copy and as `copies` copies summed,
    each copy's output reduced (UNIT_CONTEXT; see `unit_model`); the result's median, p90 and
    mean are per-copy differences (the unit's cost inside a graph, never below 0), its n and cv
    those of the many-copy model, and `extra` keeps both raw medians."""
    kinds = (1, copies) if copies > 1 else (1,)
    with tempfile.TemporaryDirectory(prefix="edgeprune-units-") as d:
        items = []
        for i, cfg in enumerate(configs):
            for k in kinds:
                pooled = copies > 1 and unit_context(device) == INT8_UNIT_CONTEXT
                model, shape = unit_model(cfg, seed=i, copies=k, reduced=copies > 1, pooled=pooled)
                path = Path(d) / f"u{i}x{k}.onnx"
                onnx.save(model, str(path))
                items.append((path, shape))
        n = len(items)

        def config_done(j, m):  # report a configuration once its last model's last round is measured
            last = j - (rounds - 1) * n
            if on_result is not None and last >= 0 and last % len(kinds) == len(kinds) - 1:
                on_result(last // len(kinds), m)

        ms = measure_interleaved(device, items, repeats=rounds, protocol=protocol, on_result=config_done)
    if copies == 1:
        return ms
    out = []
    for single, many in zip(ms[0::2], ms[1::2]):
        per_copy = {
            stat: max(0.0, (getattr(many, stat) - getattr(single, stat)) / (copies - 1))
            for stat in ("median_ms", "p90_ms", "mean_ms")
        }
        extra = {**(many.extra or {}), "single_ms": single.median_ms, "copies_ms": many.median_ms}
        out.append(replace(many, **per_copy, extra=extra))
    return out


def detect_step(
    device: Device,
    *,
    cin: int = 64,
    hw: tuple[int, int] = (14, 14),
    max_out: int = 72,
    tolerance: float = 0.04,
    max_off_share: float = 0.2,
    protocol: Protocol = UNIT_PROTOCOL,
    progress: bool = True,
) -> tuple[int, dict]:
    """The device's channel step: sweep a 3x3 conv's output channels and find the widest block
    size inside which latency stays flat (on the development CPU with ONNX Runtime: 16).

    A step s fits when at most `max_off_share` of the channel counts c cost more than `tolerance`
    less than ceil(c / s) * s channels do, i.e. rounding up to the step is (nearly) free. Rounding
    up that makes a layer *faster* counts for the step, not against it: OpenVINO's kernels block by
    16 and a width off a multiple of 16 costs ~10 % more than the multiple above it, so a finer
    step only offers the search widths that are slower than wider ones."""
    outs = list(range(4, max_out + 1))
    configs = [LayerConfig("conv", cin, c, hw[0], hw[1], (3, 3), (1, 1), (1, 1, 1, 1), 1, "relu") for c in outs]
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("channel step sweep", total=len(configs), status="")
        ms = measure_configs(device, configs, protocol, on_result=lambda i, m: bar.update(task, advance=1))
    t = {c: m.median_ms for c, m in zip(outs, ms)}
    errors = {s: _off_share(t, s, tolerance) for s in STEP_CANDIDATES}
    step = next((s for s in STEP_CANDIDATES if errors[s] <= max_off_share), 1)
    return step, {
        "sweep": {"cin": cin, "hw": list(hw), "out": outs, "ms": [round(t[c], 5) for c in outs]},
        "quantisation_error": errors,
    }


def _off_share(t: dict[int, float], s: int, tolerance: float) -> float:
    """The share of channel counts c that cost more than `tolerance` less than their block's top,
    ceil(c / s) * s. The top's cost is the lower of its own time and its block's median: one noisy
    window at the top would otherwise put a whole flat block off its plateau (an OpenVINO sweep
    read 32 channels 5 % over 17-31 and chose 8 over 16)."""
    errs = []
    for c in t:
        top = -(-c // s) * s
        if top in t:
            block = [t[k] for k in range(top - s + 1, top + 1) if k in t]
            errs.append((min(t[top], float(np.median(block))) - t[c]) / t[c])
    return float(np.mean(np.asarray(errs) > tolerance)) if errs else 1.0


def _open_table(
    out: Path | None, device: Device, fingerprint: dict, step: int, model_id: str, shape, copies: int
) -> tuple[LatencyTable, int]:
    """The table to extend: the existing file when it matches this device, step and unit copies
    (it may be another model's: what this one shares with it is not measured again), else a new one."""
    if out is not None and out.exists():
        old = LatencyTable.load(out)
        if old.input_shape and list(old.input_shape) != list(shape):
            raise EdgepruneError(
                f"{out} holds a table for input {list(old.input_shape)}, not {list(shape)}: a table holds one input "
                "size; give this one its own --out"
            )
        if not fingerprint_diff(old.fingerprint, fingerprint) and old.step == step and old.unit_copies == copies:
            if copies > 1 and (theirs := old.meta.get("unit_context", "summed")) != unit_context(device):
                raise EdgepruneError(
                    f"{out} holds units measured in context another way ({theirs}, not {unit_context(device)}): units "
                    "measured now would not add up with them; profile into another --out"
                )
            return old, len(old.entries)
        if diff := fingerprint_diff(old.fingerprint, fingerprint):
            raise EdgepruneError(
                f"{out} was profiled on another device setup ({diff}), and is left as it is: without --out, "
                "profile writes this setup's own table beside it (where prune and predict find it)"
            )
        if old.step != step:  # one table, one channel step: say which extends it
            raise EdgepruneError(
                f"{out} is this device's table at channel step {old.step}, not {step}: add --step {old.step} to "
                f"extend it, or give --out another file for a table at step {step}"
            )
        raise EdgepruneError(
            f"{out} holds units measured with {old.unit_copies} cop{'y' if old.unit_copies == 1 else 'ies'}, not "
            f"{copies}: add --copies {old.unit_copies} to extend it, or give --out another file"
        )
    table = LatencyTable(device.name, fingerprint, UNIT_PROTOCOL.to_dict(), step, model_id, list(shape))
    table.meta["unit_copies"] = copies
    if copies > 1:
        table.meta["unit_context"] = unit_context(device)
    return table, 0


# what each profile option may be (the CLI's, a config's profile: section, the Python keywords)
RULES = {
    "calibrate": Rule(int, lo=0),
    "copies": POSITIVE_OR_NONE,
    "recalibrate": Rule(bool),
    "batch": POSITIVE,
    "seed": Rule(int, lo=0),  # numpy's and torch's generators take no negative seed
    "sample": Rule(int, lo=0, optional=True),
}
# a model reaching more configurations than this is profiled on a designed sample by default
# (latency/sampling.py): resnet20/56 (280 at step 8) are measured in full; resnet18 at 224 (3,588 at
# step 16) is sampled, which predicts whole models as well as measuring all and takes minutes, not 11
# (bench/README.md, "Profiling cost")
SAMPLE_ABOVE = 2000
SAMPLE_POINTS = 5  # widths per axis of a family's first grid
# prune and run profile a device that has no table of its own for the model first, where that
# would take less than this (else they predict from another setup's table, and say how long)
PROFILE_FIRST_S = 240
CALIBRATION_S = 90  # the whole-model calibration's share where a table kept no points (25 small models)
EXPORT_S = 2.0  # a calibration plan's export, about


def profile_estimate(other: LatencyTable, protocol: Protocol) -> float | None:
    """Seconds a profile of the model another setup's table holds would take here: its units' time
    there, and its calibration models' windows under this device's `protocol` (ROUNDS each: at 224
    the calibration, not the units, is most of a profile); None where it did not record its time."""
    seconds = other.meta.get("profile_seconds")
    if seconds is None:
        return None
    points = (other.meta.get("calibration_points") or {}).values()
    calibration = sum(ROUNDS * window_seconds(protocol, p["measured_ms"]) + EXPORT_S for p in points)
    return float(seconds) + (calibration or CALIBRATION_S)


def profiles_first(other: LatencyTable, device: Device, model_id: str, log) -> bool:
    """Whether to profile `device` before predicting from `other`, the table found for it: yes
    where `other` is another device setup's and a profile here takes under PROFILE_FIRST_S (said,
    with its time); where it would take longer, how long is said and `other` is used."""
    if not fingerprint_diff(other.fingerprint, device.fingerprint()):
        return False
    seconds = profile_estimate(other, device.spec.protocol)
    mine = f"{device.name} has no table of its own for {model_id}"
    if seconds is None or seconds > PROFILE_FIRST_S:
        took = f"about {seconds / 60:.0f} min" if seconds else "a while (the table did not record its time)"
        log(f"{mine}: profiling it would take {took}")
        return False
    log(f"{mine}: profiling it first (about {seconds:.0f} s) rather than predicting from another device setup's table")
    return True


def check_options(*, step=None, as_flag: bool = True, **options) -> None:
    """The profile's options checked (one line for the first that is wrong): `step` is a positive
    number, "auto" or None (the device profile's)."""
    if step not in (None, "auto"):
        check_value("step", step, POSITIVE, as_flag=as_flag)
    check_values(options, RULES, where="profile", as_flag=as_flag)


def profile(
    model: nn.Module,
    example_input: torch.Tensor | tuple[int, ...],
    *,
    device: Device | str | Sequence[Device | str],
    out: str | os.PathLike | None = None,
    model_id: str | None = None,
    step: int | str | None = None,
    copies: int | None = None,
    calibrate: int = 24,
    recalibrate: bool = False,
    batch: int = 16,
    seed: int = 0,
    sample: int | None = None,
    progress: bool = True,
    log=print,
) -> LatencyTable:
    """Profile `model`'s reachable layer configurations on `device` into a latency table; returns it.

    `out`: the table's file, written after every batch (an interrupted profile resumes; an existing
    table of this device setup gets only the configurations it lacks, and its calibration is refit
    where it was another model's). Without `out`, the table is only returned.
    `step`: the channel step (an int, "auto" to detect it, None: the device profile's).
    `copies`: 1 measures each unit alone; K > 1 measures it in context, as the per-copy difference
    between K summed copies and one (see `unit_model`); default: the device profile's `unit_copies`.
    `sample`: measure a designed sample, N widths per axis of each family of configurations, and
    interpolate the rest, checked on held-out configurations (latency/sampling.py); 0 measures
    every configuration; None: sampled (SAMPLE_POINTS) where there are over SAMPLE_ABOVE.
    `recalibrate`: measure the dense model and `calibrate` plans anew, all together, and fit the
    line on them alone (the units are kept): a device drifts over days, and points measured at
    different times do not lie on one line. The replaced calibration is kept in
    `meta["previous_calibrations"]`.

    Several devices (a list; `out` then a list of paths, or None) are profiled at once, one
    thread each, and a list of tables is returned: devices measure in parallel, while each
    physical device still measures one model at a time (two profiles of one CPU take turns)."""
    from edgeprune.models.onnx import example_tensor
    from edgeprune.pruning import space

    options = {"step": step, "copies": copies, "calibrate": calibrate, "recalibrate": recalibrate, "batch": batch}
    options |= {"seed": seed, "sample": sample}
    check_options(**options)
    if isinstance(device, (list, tuple)):
        kw = {"model_id": model_id, "progress": progress, "log": log, **options}
        return profile_devices(model, example_input, devices=device, outs=out, **kw)
    device = Device.load(device) if isinstance(device, (str, os.PathLike)) else device
    input_shape = tuple(example_tensor(example_input).shape)
    model_id = model_id or type(model).__name__
    out = None if out is None else Path(out)
    if recalibrate and (out is None or not out.exists()):
        raise EdgepruneError(f"--recalibrate refits an existing table and {out} does not exist: profile it first")
    fingerprint = device.fingerprint()
    step, sweep = _step(step, device, input_shape, progress, log)
    s = space(model, torch.randn(*input_shape), step=step)
    layers = ModelLayers.from_model(s)
    configs = layers.reachable()
    copies = int(copies or device.spec.unit_copies)
    if copies < 1:
        raise EdgepruneError(f"unit copies must be at least 1, got {copies}")
    table, reused = _open_table(out, device, fingerprint, step, model_id, input_shape, copies)
    if sweep:
        table.meta["step_sweep"] = sweep
    units = Units(table, device, copies, batch, out, model_id, progress, log)
    units.profile(configs, sample, len(s.groups), reused, seed)
    _calibrate(table, s, layers, model, model_id, input_shape, device, calibrate, recalibrate, seed, out, progress, log)
    table.meta["model_protocol"] = device.spec.protocol.to_dict()
    table.meta["measurement"] = {"statistic": "quietest", "unit_rounds": UNIT_ROUNDS, "model_rounds": ROUNDS}
    table.meta["configurations"] = len(configs)
    table.model, table.input_shape = model_id, list(input_shape)
    if out is not None:
        table.save(out)
    return table


def profile_devices(model, example_input, *, devices: Sequence, outs=None, progress=True, log=print, **kw) -> list:
    """`profile` on each of `devices` at once (a thread each, a copy of the model each); the tables in order."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    devices = [Device.load(d) if isinstance(d, (str, os.PathLike)) else d for d in devices]
    outs = [None] * len(devices) if outs is None else list(outs)
    if len(outs) != len(devices):
        raise EdgepruneError(f"{len(devices)} devices but {len(outs)} table paths: give one --out per --device")
    names = [d.name for d in devices]
    if len(set(names)) < len(names):
        raise EdgepruneError(f"a device profile is named twice ({', '.join(names)}): each device gets one table")

    def one(i: int) -> LatencyTable:
        label = f"[{names[i]}] "
        return profile(
            copy.deepcopy(model),
            example_input,
            device=devices[i],
            out=outs[i],
            # one live display per terminal: each device's progress as plain lines, labelled
            progress=label if progress else False,
            log=lambda s, label=label: log(label + s),
            **kw,
        )

    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="edgeprune-profile") as pool:
        return list(pool.map(one, range(len(devices))))


def _step(step, device: Device, input_shape, progress: bool, log) -> tuple[int, dict | None]:
    """The channel step: given, detected (`auto`), or the device profile's (default 8)."""
    if step != "auto":
        return int(step or device.spec.channel_step or 8), None
    hw = tuple(input_shape[2:]) if len(input_shape) == 4 else (14, 14)
    hw = (max(7, hw[0] // 4), max(7, hw[1] // 4))
    found, sweep = detect_step(device, hw=hw, progress=progress)
    log(
        f"channel step on {device.name}: {found} (share of channel counts off each step's plateaus: "
        f"{', '.join(f'{s}: {e:.0%} off' for s, e in sweep['quantisation_error'].items())})"
    )
    return found, sweep


class Units:
    """Measures a table's layer units on a device, in batches, the table saved after each (an
    interrupted profile resumes): every configuration, or a designed sample of them."""

    def __init__(self, table, device, copies, batch, out, model_id, progress, log) -> None:
        self.table, self.device, self.copies, self.batch, self.out = table, device, copies, batch, out
        self.model_id, self.progress, self.log = model_id, progress, log
        if "unit_overhead_ms" not in table.meta:  # what one call of an (almost) empty model costs here
            empty = LayerConfig("act:relu", 1, 1)
            table.meta["unit_overhead_ms"] = round(measure_configs(device, [empty], UNIT_PROTOCOL)[0].median_ms, 6)

    def profile(self, configs, sample: int | None, groups: int, reused: bool, seed: int) -> None:
        """Every configuration, or (`sample` N widths per axis; None: SAMPLE_POINTS above
        SAMPLE_ABOVE configurations) a designed sample of them, the rest interpolated."""
        points = SAMPLE_POINTS if sample is None and len(configs) > SAMPLE_ABOVE else (sample or 0)
        if points:
            self.sampled(configs, points, groups, seed)
        else:
            self.measure_all(configs, groups, reused)

    def measured(self) -> dict[str, float]:
        """The configurations measured so far (not interpolated): key -> ms."""
        return {k: e["median_ms"] for k, e in self.table.entries.items() if not e.get("interpolated")}

    def measure_all(self, configs, groups: int, reused: bool) -> None:
        done = self.measured()
        todo = [c for c in configs if c.key not in done]
        self.log(
            f"{self.model_id}: {groups} groups, {len(configs)} reachable layer configurations at step "
            f"{self.table.step}; {len(todo)} to measure, {len(configs) - len(todo) if reused else 0} already in "
            f"{self.out or 'the table'}"
            + (f"; each unit in context ({self.copies} copies vs 1)" if self.copies > 1 else "")
        )
        self.measure(todo, f"profile {self.model_id} on {self.device.name}")

    def measure(self, todo, what: str) -> None:
        started = time.monotonic()
        with progress_bar(enabled=self.progress) as bar:
            task = bar.add_task(what, total=len(todo), status="")
            for i in range(0, len(todo), self.batch):
                chunk = todo[i : i + self.batch]
                results = measure_configs(
                    self.device, chunk, UNIT_PROTOCOL, on_result=lambda j, m: bar.update(task, advance=1),
                    copies=self.copies,
                )  # fmt: skip
                for cfg, m in zip(chunk, results):
                    d = m.to_dict()
                    extra = d.pop("extra") or {}
                    d.update({k: extra[k] for k in ("single_ms", "copies_ms") if k in extra})
                    self.table.entries[cfg.key] = {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}
                self.table.meta["profile_seconds"] = round(
                    self.table.meta.get("profile_seconds", 0) + time.monotonic() - started, 1
                )
                started = time.monotonic()
                if self.out is not None:
                    self.table.save(self.out)

    def sampled(self, configs, points: int, groups: int, seed: int) -> None:
        """Measure each family's grid and held-out configurations, refine the families the
        interpolation misses, and write the rest interpolated (latency/sampling.py)."""
        from edgeprune.latency.sampling import SamplePlan, held_out_errors

        plan = SamplePlan.of(configs, points)
        first = len(plan.to_measure())
        self.log(
            f"{self.model_id}: {groups} groups, {len(configs)} reachable layer configurations at step "
            f"{self.table.step}; sampled: {first} measured on grids of {points} widths per axis over "
            f"{len(plan.families)} families, the rest interpolated and checked on held-out configurations"
        )
        final: dict[int, list[float]] = {}
        check = None  # the families whose interpolation is checked this pass (None: all)
        for attempt in range(4):
            done = self.measured()
            self.measure([c for c in plan.to_measure() if c.key not in done], "measure the grids")
            pairs = plan.held_out(seed + attempt, only=check)
            done = self.measured()
            self.measure([c for _, c in pairs if c.key not in done], "measure held-out configurations")
            ms = self.measured()
            predicted = {c.key: plan.families[i].interpolate(c, ms, plan.level[i]) for i, c in pairs}
            errors = held_out_errors(pairs, predicted, ms)
            final.update(errors)
            if not (check := set(plan.refine(errors))):
                break
            what = "1 family" if len(check) == 1 else f"{len(check)} families"
            self.log(f"{what} interpolated worse than the tolerance: measured on a finer grid")
            for i in check:
                final.pop(i, None)
        self._write_interpolated(plan, final)

    def _write_interpolated(self, plan, errors: dict[int, list[float]]) -> None:
        ms = self.measured()
        interpolated = plan.interpolated(ms)
        for key, v in interpolated.items():
            self.table.entries[key] = {"median_ms": round(v, 6), "interpolated": True}
        errs = np.asarray([e for es in errors.values() for e in es]) * 100
        self.table.meta["sampling"] = {
            "points": plan.points,
            "families": len(plan.families),
            "measured_in_full": sum(1 for lv in plan.level.values() if lv == 0),
            "measured": len(ms),
            "interpolated": len(interpolated),
            "held_out": {
                "n": int(errs.size),
                "median_abs_pct": round(float(np.median(errs)), 2) if errs.size else None,
                "within_10": round(float(np.mean(errs <= 10)), 4) if errs.size else None,
                "max_abs_pct": round(float(errs.max()), 2) if errs.size else None,
            },
        }
        h = self.table.meta["sampling"]["held_out"]
        if errs.size:
            self.log(
                f"interpolated {len(interpolated)} configurations from {len(ms)} measured: on {h['n']} held-out "
                f"ones, median error {h['median_abs_pct']:.1f} %, {h['within_10']:.0%} within 10 %, worst "
                f"{h['max_abs_pct']:.0f} %"
            )
        if self.out is not None:
            self.table.save(self.out)


def _set_aside(table: LatencyTable, why: str, log) -> None:
    """The current line and its points, kept in meta["previous_calibrations"]; a new line is fitted."""
    if table.meta.get("calibration_points"):
        table.meta.setdefault("previous_calibrations", []).append(
            {
                "replaced": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "calibration": table.calibration,
                "points": table.meta.pop("calibration_points"),
                "model": table.model,
            }
        )
        log(f"{why}: the {table.calibration.get('n', 0)} points of the current line are set aside")


def _calibrate(
    table, s, layers, model, model_id, input_shape, device, calibrate, recalibrate, seed, out, progress, log
) -> None:
    """Fit the line on whole models: the dense one and random plans (kept in the table, resumable)."""
    from edgeprune.models.onnx import export_onnx
    from edgeprune.pruning import random_counts

    signature = layers.signature()
    if recalibrate:
        _set_aside(table, "recalibrating", log)
    elif why := table.other_model(model_id, signature):
        _set_aside(table, f"{why}: refitting it on {model_id} as given", log)
    table.meta["calibration_signature"] = signature
    points = table.meta.setdefault("calibration_points", {})
    rng = np.random.default_rng(seed)
    plans = [s.full_counts()] + [random_counts(s, rng, mode="near-uniform") for _ in range(calibrate)]
    predictor = Predictor(layers, table)
    todo = [counts for counts in plans if calibration_key(counts) not in points]
    with tempfile.TemporaryDirectory() as d:
        # in turn, the quietest of many short windows each: the line is fitted across plans, so a
        # slow phase that caught some of them and not the others would bend it
        paths = [
            (export_onnx(s.plan(counts).apply(model), input_shape, Path(d) / f"m{i}.onnx"), input_shape)
            for i, counts in enumerate(todo)
        ]
        if paths:
            with rounds_progress("calibrate on whole models", len(paths), enabled=progress) as shown:
                measured = measure_interleaved(device, paths, on_result=shown)
            for counts, m in zip(todo, measured):
                points[calibration_key(counts)] = {"sum_ms": predictor.unit_sum(counts), "measured_ms": m.median_ms}
            if out is not None:
                table.save(out)
    fitted = [[int(v) for v in key.split(",")] for key in points]
    sums = [predictor.unit_sum(counts) for counts in fitted]
    cal = predictor.fit_calibration(sums, [p["measured_ms"] for p in points.values()], fitted)
    _warn_calibration(table, cal, points, predictor, s, device, log)


def _warn_calibration(table, cal, points, predictor, s, device, log) -> None:
    if (cal.get("fit_median_abs_err") or 0) > CALIBRATION_SCATTER:
        log(
            f"warning: the calibration misses its own {cal['n']} whole-model measurements by a median "
            f"{cal['fit_median_abs_err']:.1%} (a quiet device: under {CALIBRATION_SCATTER:.0%}): {device.name} was "
            "probably busy or throttling while they were measured; run this again with --recalibrate when "
            "it is quiet. If the miss stays, "
            + (
                "units measured alone do not add up to whole models on this runtime: profile them in context "
                "(--copies 4) into a new table"
                if table.unit_copies == 1
                else "whole models do not add up from their units on this runtime (other kernels or layouts, or "
                "weights that no longer fit the cache): the table ranks plans roughly, and prune's measured check "
                "holds the budget"
            )
        )
    dense_point = points.get(calibration_key(s.full_counts()))
    if dense_point and cal.get("n", 0) >= 3:
        line = predictor.predict(s.full_counts())
        miss = line / dense_point["measured_ms"] - 1
        if abs(miss) > DENSE_MISS:
            log(
                f"warning: the calibration puts the dense model at {line:.4g} ms, {abs(miss):.0%} "
                f"{'over' if miss > 0 else 'under'} its own measurement ({dense_point['measured_ms']:.4g} ms): prune "
                "refers every prediction to that measurement, so if it was caught in a slow or fast phase they all "
                "move with it; run this again with --recalibrate when the device is quiet"
            )
