"""Profiling cost that scales: measure a designed sample of a model's layer configurations and
interpolate the rest.

A *family* is the units alike in everything but their channel counts (op, input size, kernel,
stride, padding, fusion). A convolution's or a gemm's work is bilinear in its input and output
widths, so a grid of a few widths on each axis, measured, gives every width between them by
bilinear interpolation (exact for a*cin*cout + b*cin + c*cout + d, which the widths already on the
channel step follow up to the kernel's blocking; a grouped convolution's, its group count fixed,
too). A depthwise convolution, an add, a pool or a batch norm has one axis, its channels, and is
interpolated linearly. Concatenations and other ops are measured in full.

What the interpolation misses (the blocking changing between grid points, the weights leaving a
cache) is measured rather than assumed: a held-out random sample of every family's interpolated
configurations is measured too, and a family whose held-out error is over the tolerance is
measured again on a grid twice as fine, until it is within it or measured in full. The held-out
error is what the table records (meta["sampling"]), and interpolated entries say so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgeprune.latency.layers import LayerConfig

ONE_AXIS_OPS = ("add", "mul", "bn", "act:", "pool:")  # channels in = channels out
MEDIAN_TOLERANCE = 0.05  # a family whose held-out configurations miss by more than this (median) is refined
MAX_TOLERANCE = 0.20  # ... or one of which misses by more than this
HELD_OUT_SHARE = 0.02  # of a family's interpolated configurations, measured to check the interpolation
HELD_OUT_MIN, HELD_OUT_MAX = 2, 12  # per family


def _family_key(cfg: LayerConfig) -> LayerConfig | None:
    """The configuration with its channel counts taken out; None for one measured in full."""
    if cfg.extra or cfg.detail or cfg.op in ("concat",) or cfg.op.startswith("other:"):
        return None
    depthwise = cfg.op == "conv" and cfg.groups == cfg.cin == cfg.cout and cfg.groups > 1
    if cfg.op not in ("conv", "gemm") and not cfg.op.startswith(ONE_AXIS_OPS):
        return None
    return replace(cfg, cin=0, cout=0, groups=0 if depthwise else cfg.groups, template=None)


@dataclass
class Family:
    """Units alike but for their widths; `one_axis`: their widths in and out are one (channels)."""

    key: LayerConfig
    members: list[LayerConfig] = field(default_factory=list)

    @property
    def one_axis(self) -> bool:
        return all(c.cin == c.cout for c in self.members)

    @property
    def depthwise(self) -> bool:
        return self.key.op == "conv" and self.key.groups == 0

    def axes(self) -> tuple[list[int], list[int]]:
        """The distinct widths in (and out) its members take."""
        ins = sorted({c.cin for c in self.members})
        return ins, ins if self.one_axis else sorted({c.cout for c in self.members})

    def at(self, cin: int, cout: int) -> LayerConfig:
        """The family's unit at these widths (a grid point need not be a member)."""
        return replace(self.key, cin=cin, cout=cout, groups=cin if self.depthwise else self.key.groups)

    def grid(self, points: int) -> list[LayerConfig]:
        """The configurations measured to interpolate the family: `points` widths per axis, evenly
        spaced over its widths, both ends included (every member where there are no more)."""
        ins, outs = self.axes()
        gi, go = _spaced(ins, points), _spaced(outs, points)
        if self.one_axis:
            return [self.at(c, c) for c in gi]
        return [self.at(i, o) for i in gi for o in go]

    def interpolate(self, cfg: LayerConfig, ms: dict[str, float], points: int) -> float:
        """`cfg`'s latency from the measured grid `ms` (key -> ms): linear on one axis, bilinear on two."""
        ins, outs = self.axes()
        gi = _spaced(ins, points)
        i0, i1, ti = _bracket(gi, cfg.cin)
        if self.one_axis:
            return (1 - ti) * ms[self.at(i0, i0).key] + ti * ms[self.at(i1, i1).key]
        o0, o1, to = _bracket(_spaced(outs, points), cfg.cout)
        low = (1 - to) * ms[self.at(i0, o0).key] + to * ms[self.at(i0, o1).key]
        high = (1 - to) * ms[self.at(i1, o0).key] + to * ms[self.at(i1, o1).key]
        return (1 - ti) * low + ti * high


def _spaced(values: Sequence[int], points: int) -> list[int]:
    if len(values) <= points:
        return list(values)
    return sorted({values[int(round(i))] for i in np.linspace(0, len(values) - 1, points)})


def _bracket(grid: Sequence[int], v: int) -> tuple[int, int, float]:
    """The grid values around `v` and its position between them (0..1)."""
    j = int(np.searchsorted(grid, v))
    if j < len(grid) and grid[j] == v:
        return v, v, 0.0
    lo, hi = grid[max(j - 1, 0)], grid[min(j, len(grid) - 1)]
    return lo, hi, (v - lo) / (hi - lo) if hi != lo else 0.0


def families(configs: Sequence[LayerConfig], points: int) -> tuple[list[Family], list[LayerConfig]]:
    """The families worth sampling (more members than their grid), and the configurations measured
    in full (the rest)."""
    grouped: dict[LayerConfig, Family] = {}
    full: list[LayerConfig] = []
    for cfg in configs:
        key = _family_key(cfg)
        if key is None:
            full.append(cfg)
        else:
            grouped.setdefault(key, Family(key)).members.append(cfg)
    sampled = []
    for fam in grouped.values():
        if len(fam.members) > len(fam.grid(points)):
            sampled.append(fam)
        else:
            full.extend(fam.members)
    return sampled, full


@dataclass
class SamplePlan:
    """Which configurations a sampled profile measures, and how each family is refined."""

    points: int  # widths per axis of a family's first grid
    families: list[Family]
    full: list[LayerConfig]
    level: dict[int, int] = field(default_factory=dict)  # family index -> grid points now (0: measured in full)

    @classmethod
    def of(cls, configs: Sequence[LayerConfig], points: int) -> SamplePlan:
        fams, full = families(configs, points)
        return cls(points, fams, full, {i: points for i in range(len(fams))})

    def to_measure(self) -> list[LayerConfig]:
        """Everything measured at the current levels: the full configurations and every grid."""
        out = list(self.full)
        for i, fam in enumerate(self.families):
            out += fam.members if self.level[i] == 0 else fam.grid(self.level[i])
        return _unique(out)

    def held_out(self, seed: int, *, only=None) -> list[tuple[int, LayerConfig]]:
        """Per interpolated family (of `only`, where given), a random share of its members off its
        grid: (family index, config) pairs. The same for the same grids and seed, so a resumed
        profile finds them measured."""
        rng = np.random.default_rng(seed)
        out = []
        for i, fam in enumerate(self.families):
            if self.level[i] == 0 or (only is not None and i not in only):
                continue
            grid = {c.key for c in fam.grid(self.level[i])}
            rest = [c for c in fam.members if c.key not in grid]
            k = min(len(rest), HELD_OUT_MAX, max(HELD_OUT_MIN, int(round(HELD_OUT_SHARE * len(rest)))))
            if k:
                out += [(i, rest[j]) for j in sorted(rng.choice(len(rest), size=k, replace=False))]
        return out

    def interpolated(self, ms: dict[str, float]) -> dict[str, float]:
        """Every member of an interpolated family that was not measured: its interpolated ms."""
        out = {}
        for i, fam in enumerate(self.families):
            if self.level[i]:
                for c in fam.members:
                    if c.key not in ms:
                        out[c.key] = fam.interpolate(c, ms, self.level[i])
        return out

    def refine(self, errors: dict[int, list[float]]) -> list[int]:
        """Families whose held-out errors are over the tolerance get a grid twice as fine (measured
        in full once it would hold most of them); the families refined."""
        worse = [
            i
            for i, errs in errors.items()
            if errs and (np.median(errs) > MEDIAN_TOLERANCE or max(errs) > MAX_TOLERANCE) and self.level[i]
        ]
        for i in worse:
            finer = 2 * self.level[i] - 1
            self.level[i] = 0 if len(self.families[i].grid(finer)) * 2 >= len(self.families[i].members) else finer
        return worse


def _unique(configs: Sequence[LayerConfig]) -> list[LayerConfig]:
    seen: dict[str, LayerConfig] = {}
    for c in configs:
        seen.setdefault(c.key, c)
    return list(seen.values())


def held_out_errors(pairs, predicted: dict[str, float], ms: dict[str, float]) -> dict[int, list[float]]:
    """Per family, the relative errors of the interpolation on its held-out configurations."""
    errors: dict[int, list[float]] = defaultdict(list)
    for i, cfg in pairs:
        if ms[cfg.key] > 0:
            errors[i].append(abs(predicted[cfg.key] - ms[cfg.key]) / ms[cfg.key])
    return errors
