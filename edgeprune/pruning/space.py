"""The prunable space of a model: its coupled channel groups and the keep-counts each allows.

A group is every channel that must go together (a conv's filters, the BN after it, the inputs
of the layers that read them, across residual adds, depthwise convs and concatenations), as
torch-pruning's dependency graph finds them. A search candidate is one keep-count per group.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.pruning.blocks import residual_blocks
from edgeprune.pruning.graph import ROOT_TYPES, build_graph, module_name


@dataclass(frozen=True)
class LayerDim:
    """One layer dimension a group's channels run through: `factor` entries per group channel."""

    layer: str
    dim: str  # "out" or "in"
    factor: int = 1


@dataclass
class ChannelGroup:
    index: int
    root: str  # the layer whose output channels define the group
    width: int
    channel_groups: int  # grouped convs split the channels into this many equal parts
    layers: list[LayerDim]
    allowed: list[int]  # allowed keep-counts, ascending; the last is the full width
    block: str | None = None  # with depth pruning: the residual block that keep-count 0 removes

    @property
    def prunable(self) -> bool:
        return len(self.allowed) > 1

    def snap(self, count: float) -> int:
        """The allowed keep-count nearest to `count` (ties go to the larger)."""
        allowed = np.asarray(self.allowed)
        return int(allowed[np.argmin(np.abs(allowed - count) - 1e-9 * allowed)])

    def floor(self, count: float) -> int:
        """The largest allowed keep-count not above `count` (or the smallest allowed)."""
        fitting = [k for k in self.allowed if k <= count + 1e-9]
        return fitting[-1] if fitting else self.allowed[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(x) for x in self.layers]
        return d


def allowed_counts(width: int, *, step: int, min_keep_ratio: float, channel_groups: int = 1) -> list[int]:
    """Keep-counts that are multiples of the channel step (and of the conv groups), at least
    `min_keep_ratio` of the width, plus the full width. Where the width is below the step, only
    the full width: fewer channels than one step buy no latency on the device."""
    lo = max(channel_groups, math.ceil(min_keep_ratio * width - 1e-9))
    multiple = math.lcm(step, channel_groups)
    if multiple > width:
        multiple = channel_groups if step <= 1 else width
    counts = [k for k in range(multiple, width, multiple) if k >= lo]
    return counts + [width]


def classifier_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The layer that produces the network output: never pruned."""
    with torch.no_grad():
        out_features = model.eval()(example_input).shape[-1]
    layers = [m for m in model.modules() if isinstance(m, ROOT_TYPES)]
    heads = [m for m in layers if getattr(m, "out_features", getattr(m, "out_channels", None)) == out_features]
    return heads[-1:] if heads else layers[-1:]


@dataclass
class PrunableSpace:
    """Channel groups of a base model. Keeps a reference to the model to select channels from it."""

    groups: list[ChannelGroup]
    input_shape: tuple[int, ...]
    step: int
    min_keep_ratio: float
    exclude: list[str] = field(default_factory=list)
    depth: bool = False  # whether plans may remove whole residual blocks (see pruning/blocks.py)
    base: nn.Module | None = field(default=None, repr=False)
    graph: tp.DependencyGraph | None = field(default=None, repr=False)
    _criteria: dict = field(default_factory=dict, repr=False)
    _cost: object = field(default=None, repr=False)

    # ----- counts -----
    @property
    def widths(self) -> list[int]:
        return [g.width for g in self.groups]

    def full_counts(self) -> list[int]:
        return self.widths

    def min_counts(self) -> list[int]:
        return [g.allowed[0] for g in self.groups]

    def counts_from_ratios(self, ratios: Sequence[float] | float, *, mode: str = "snap") -> list[int]:
        """Keep ratios (one per group, or one for all) mapped onto allowed keep-counts."""
        if isinstance(ratios, (int, float)):
            ratios = [float(ratios)] * len(self.groups)
        if len(ratios) != len(self.groups):
            raise EdgepruneError(f"expected {len(self.groups)} keep ratios, got {len(ratios)}")
        fn = {"snap": ChannelGroup.snap, "floor": ChannelGroup.floor}[mode]
        return [fn(g, r * g.width) for g, r in zip(self.groups, ratios)]

    def check_counts(self, counts: Sequence[int]) -> list[int]:
        if len(counts) != len(self.groups):
            raise EdgepruneError(f"a plan for this space needs {len(self.groups)} keep-counts, got {len(counts)}")
        for g, k in zip(self.groups, counts):
            if int(k) not in g.allowed:
                raise EdgepruneError(f"group {g.index} ({g.root}) cannot keep {k} channels; allowed: {g.allowed}")
        return [int(k) for k in counts]

    # ----- cost -----
    @property
    def cost(self):
        if self._cost is None:
            from edgeprune.pruning.cost import CostModel

            self._cost = CostModel.from_space(self)
        return self._cost

    def macs(self, counts: Sequence[int] | None = None) -> int:
        """Multiply-accumulates of one forward pass with these keep-counts (default: dense)."""
        return self.cost.macs(self.full_counts() if counts is None else counts)

    def params(self, counts: Sequence[int] | None = None) -> int:
        return self.cost.params(self.full_counts() if counts is None else counts)

    # ----- plans -----
    def criterion(self, name: str, **kwargs):
        from edgeprune.pruning.criteria import make_criterion

        # data batches are keyed by identity (the same list gives the same feature clusters)
        key = (name, tuple(sorted((k, id(v) if k == "data" else v) for k, v in kwargs.items())))
        if key not in self._criteria:
            self._criteria[key] = make_criterion(name, self, **kwargs)
        return self._criteria[key]

    def plan(self, counts: Sequence[int] | Mapping[str, int], *, criterion: str = "l1", **criterion_kwargs):
        """The plan keeping `counts` channels per group, chosen by `criterion` on the base model."""
        from edgeprune.pruning.plan import Plan

        if isinstance(counts, Mapping):
            counts = [counts.get(g.root, g.width) for g in self.groups]
        counts = self.check_counts(counts)
        crit = self.criterion(criterion, **criterion_kwargs)
        keep, drop = {}, []
        for g, k in zip(self.groups, counts):
            if k == 0:
                keep[g.root], drop = [], drop + [g.block]
            elif k < g.width:
                keep[g.root] = sorted(int(i) for i in crit.select(g, k))
        return Plan(
            input_shape=tuple(self.input_shape),
            widths={g.root: g.width for g in self.groups},
            keep=keep,
            criterion=criterion,
            step=self.step,
            exclude=list(self.exclude),
            drop=drop,
        )

    def uniform(self, keep_ratio: float, *, criterion: str = "l1", **kw):
        return self.plan(self.counts_from_ratios(keep_ratio), criterion=criterion, **kw)

    @property
    def gates(self) -> dict[int, str]:
        """Group index -> the residual block its keep-count 0 removes (empty without depth pruning)."""
        return {g.index: g.block for g in self.groups if g.block is not None}

    def gate_of(self, layer: str) -> int | None:
        """The group whose keep-count 0 removes the block `layer` lies in (None: no such block)."""
        return next((g for g, block in self.gates.items() if layer.startswith(block + ".")), None)

    def counts_of(self, plan) -> list[int]:
        return [len(plan.keep[g.root]) if g.root in plan.keep else g.width for g in self.groups]

    def describe(self) -> list[dict]:
        return [g.to_dict() for g in self.groups]


def _layer_dims(DG: tp.DependencyGraph, group, width: int) -> list[LayerDim]:
    dims: dict[tuple[str, str], int] = {}
    for dep, idxs in group:
        module = dep.target.module
        name = module_name(DG, module)
        if name is None or not isinstance(
            module, (*ROOT_TYPES, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
        ):
            continue
        dim = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
        factor = max(1, len(idxs) // width)
        dims[(name, dim)] = max(dims.get((name, dim), 0), factor)
    return [LayerDim(n, d, f) for (n, d), f in dims.items()]


def _channel_groups(DG: tp.DependencyGraph, group) -> int:
    counts = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            counts.append(m.groups)
    return max(counts)


def space(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    step: int = 8,
    min_keep_ratio: float = 0.1,
    exclude: Sequence[str] = (),
    depth: bool = False,
) -> PrunableSpace:
    """The prunable space of `model`: coupled channel groups and their allowed keep-counts.

    `exclude` holds layer names or glob patterns (e.g. ``"features.0.*"``) whose channels stay.
    The classifier's outputs and the network input are never pruned. With `depth`, the inner
    group of every removable residual block also allows 0 channels: the block removed.
    """
    if step < 1:
        raise EdgepruneError(f"channel step must be >= 1, got {step}")
    if not 0.0 < min_keep_ratio <= 1.0:
        raise EdgepruneError(f"min keep ratio must be in (0, 1], got {min_keep_ratio}")
    model.eval()
    DG = build_graph(model, example_input)
    names = dict(model.named_modules())
    ignored = list(classifier_layers(model, example_input))
    for pattern in exclude:
        matched = [m for n, m in names.items() if n and fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise EdgepruneError(
                f"exclude pattern {pattern!r} matches no layer (e.g. {next(iter(names.keys() - {''}))})"
            )
        ignored.extend(matched)
    groups = []
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        width = DG.get_out_channels(root)
        if not width:
            continue
        ch = _channel_groups(DG, group)
        groups.append(
            ChannelGroup(
                index=len(groups),
                root=module_name(DG, root),
                width=width,
                channel_groups=ch,
                layers=_layer_dims(DG, group, width),
                allowed=allowed_counts(width, step=step, min_keep_ratio=min_keep_ratio, channel_groups=ch),
            )
        )
    if not groups:
        raise EdgepruneError("the model has no prunable channel groups (every layer is excluded or the classifier)")
    if depth:
        _allow_block_removal(groups, model)
    return PrunableSpace(groups, tuple(example_input.shape), step, min_keep_ratio, list(exclude), depth, model, DG)


def _allow_block_removal(groups: list[ChannelGroup], model: nn.Module) -> None:
    """Give the inner group of each removable residual block the keep-count 0."""
    by_layer = {d.layer: g for g in groups for d in g.layers if d.dim == "out"}
    found = 0
    for block in residual_blocks(model):
        g = by_layer.get(block.inner)
        if g is None or not all(d.layer.startswith(block.name + ".") for d in g.layers):
            continue  # excluded, or its channels reach outside the block
        g.block = block.name
        g.allowed = [0, *g.allowed]
        found += 1
    if not found:
        raise EdgepruneError(
            "depth pruning found no removable residual block in this model (recognised: ResNet basic blocks and "
            "MobileNetV2 inverted residuals with an identity shortcut); prune without --depth"
        )
