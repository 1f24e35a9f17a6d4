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

    layer: str  # a layer's name (or, for dim "param", a parameter's outside any layer)
    dim: str  # "out", "in", or "param" (a free parameter that runs along the group's channels)
    factor: float = 1.0  # a concatenation's part: its share of the group (see ChannelGroup.parts)


@dataclass
class ChannelGroup:
    index: int
    root: str  # the layer whose output channels define the group
    width: int
    channel_groups: int  # grouped convs split the channels into this many equal parts
    layers: list[LayerDim]
    allowed: list[int]  # allowed keep-counts, ascending; the last is the full width
    block: str | None = None  # with depth pruning: the residual block that keep-count 0 removes
    # where the group's channels are a concatenation of layers' outputs (an SE block or a residual
    # add after an Inception-style concat couples them all): each part's width, in channel order.
    # Every part keeps the same share of its channels, so each layer's width stays linear in the
    # group's keep-count (what the cost model and the latency table count on)
    parts: list[int] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return len(self.allowed) > 1

    def part_counts(self, count: int) -> list[int]:
        """What each part of a concatenated group keeps when the group keeps `count`."""
        return [w * count // self.width for w in self.parts] if self.parts else [count]

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


# keep-counts one group may take at most: a 3072-wide layer at step 8 would have 384, and a layer
# reading one such group and writing another 384 x 96 configurations to profile; 64 levels (1.6 %
# of the width apart) are finer than any search or table needs
MAX_LEVELS = 64


def allowed_counts(
    width: int,
    *,
    step: int,
    min_keep_ratio: float,
    channel_groups: int = 1,
    parts: Sequence[int] = (),
    max_levels: int = MAX_LEVELS,
) -> list[int]:
    """Keep-counts that are multiples of the channel step (and of the conv groups), at least
    `min_keep_ratio` of the width, plus the full width, `max_levels` at most (a wide group's
    counts are then multiples of a multiple of the step). Where the width is below the step,
    only the full width: fewer channels than one step buy no latency on the device. A
    concatenated group (`parts`) keeps the same share of every part, each a multiple of the step."""
    if len(parts) > 1:
        if channel_groups > 1:
            return [width]  # grouped convs inside a concatenated group: held whole
        lo = math.ceil(min_keep_ratio * width - 1e-9)
        fits = [k for k in range(1, width) if all(k * w % width == 0 and k * w // width % step == 0 for w in parts)]
        fits = [k for k in fits if k >= lo and min(parts) * k // width > 0] + [width]
        return fits[::-1][:: -(-len(fits) // max_levels)][::-1]  # thinned from the full width down
    lo = max(channel_groups, math.ceil(min_keep_ratio * width - 1e-9))
    multiple = math.lcm(step, channel_groups)
    if multiple > width:
        multiple = channel_groups if step <= 1 else width
    multiple *= max(1, -(-width // (multiple * max_levels)))
    counts = [k for k in range(multiple, width, multiple) if k >= lo]
    return counts + [width]


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The layers that produce the network's outputs (every output of a tuple or dict: a
    classifier, each head of a detector): their output channels are the model's contract with
    its user, never pruned. Found by walking back from each output, through the ops that carry
    channels along (reshape, activation, upsampling, add, concat...), to the first conv or linear
    layer on each path."""
    from edgeprune.models.onnx import flatten_outputs

    produced: dict[object, nn.Module] = {}  # grad_fn of a layer's output -> the layer
    hooks = [
        m.register_forward_hook(lambda mod, i, o: produced.__setitem__(o.grad_fn, mod))
        for m in model.modules()
        if isinstance(m, ROOT_TYPES)
    ]
    try:
        with torch.enable_grad():
            outputs = flatten_outputs(model.eval()(example_input.detach().clone().requires_grad_(True)))
    finally:
        for h in hooks:
            h.remove()
    found: list[nn.Module] = []
    seen: set[int] = set()
    frontier = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while frontier:
        fn = frontier.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if fn in produced:
            if all(produced[fn] is not f for f in found):
                found.append(produced[fn])
            continue
        frontier.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


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
    """Each layer the group's channels run through, with how many of its channels one group
    channel is (a flatten before a linear layer: H x W of them; a concatenation's part: its share)."""
    dims: dict[tuple[str, str], float] = {}
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Parameter):  # a parameter outside any layer (ConvNeXt's layer scale)
            name = DG._param_to_name.get(module)
            if name is not None:
                dims[(name, "param")] = max(dims.get((name, "param"), 0.0), len(idxs) / width)
            continue
        name = module_name(DG, module)
        if name is None or not isinstance(
            module, (*ROOT_TYPES, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
        ):
            continue
        dim = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
        dims[(name, dim)] = max(dims.get((name, dim), 0.0), len(idxs) / width)
    return [LayerDim(n, d, f) for (n, d), f in dims.items()]


def _concat_parts(DG: tp.DependencyGraph, group, width: int) -> list[int] | None:
    """The parts of a group whose channels concatenate layers' outputs: each conv or linear layer
    that produces only a slice of the group's channels is a part. [] where no layer does; None
    where the slices do not tile the channels in contiguous runs (the group is then held whole)."""
    slices = set()
    for item in group.items:
        dep = item.dep
        if isinstance(dep.target.module, ROOT_TYPES) and DG.is_out_channel_pruning_fn(dep.handler):
            covered = tuple(sorted(set(int(i) for i in item.root_idxs)))
            if len(covered) < width:
                slices.add(covered)
    if not slices:
        return []
    ordered = sorted(slices)
    flat = [i for s in ordered for i in s]
    if flat != list(range(width)) or any(s != tuple(range(s[0], s[-1] + 1)) for s in ordered):
        return None
    return [len(s) for s in ordered]


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
    The layers producing the model's outputs (`output_layers`) and the network input are never
    pruned. With `depth`, the inner group of every removable residual block also allows 0
    channels: the block removed.
    """
    if step < 1:
        raise EdgepruneError(f"channel step must be >= 1, got {step}")
    if not 0.0 < min_keep_ratio <= 1.0:
        raise EdgepruneError(f"min keep ratio must be in (0, 1], got {min_keep_ratio}")
    model.eval()
    DG = build_graph(model, example_input)
    names = dict(model.named_modules())
    ignored = output_layers(model, example_input)
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
        parts = _concat_parts(DG, group, width)
        allowed = (
            [width]
            if parts is None
            else allowed_counts(width, step=step, min_keep_ratio=min_keep_ratio, channel_groups=ch, parts=parts)
        )
        groups.append(
            ChannelGroup(
                index=len(groups),
                root=module_name(DG, root),
                width=width,
                channel_groups=ch,
                layers=_layer_dims(DG, group, width),
                allowed=allowed,
                parts=parts or [],
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
