"""Layer configurations: a model as the runtime executes it, one unit per fused op.

The dense model is exported to ONNX once (BN folded into convs by the exporter). Its graph is
read into units: a conv with its fused activation, an add (with activation), pooling, a gemm,
a batch norm the exporter could not fold, and any other op the model runs. Each tensor's channel
count is linear in the plan's keep-counts (a conv's output follows its group, a concatenation's
part its share of it; element-wise ops pass channels through; concat adds them; a flatten
multiplies them by the positions it folds in), so the units of any plan are computed without
exporting it. A unit's key holds op, channels in/out, kernel, stride, padding, groups, input
HxW (the positions besides the channels, whichever axis holds them) and fusion; keys, not layer
names, so one table serves every model that shares shapes.

A unit's configuration depends on the channel counts of its input and output only (a concat's on
its total), so the configurations a unit can reach are enumerated over the distinct values those
counts take, not over every combination of the groups behind them: a DenseNet conv that reads a
concatenation of twenty groups has as many configurations as its input takes widths.

With depth pruning, each unit inside a removable residual block (its convs, and the add that
joins the block's branch) knows the group whose keep-count 0 removes it: a removed block's units
are simply absent from the plan's configurations.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.latency.units import ACTIVATIONS, NodeTemplate, unit_model  # noqa: F401  (unit_model: re-exported)

SKIPPED = {
    "Identity",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "ConstantOfShape",
    "Dropout",
}
FOLDS = {"Flatten", "Reshape"}  # free in the runtime; a fold to 2-D multiplies the channels (see _fold)
POOLS = {"GlobalAveragePool", "MaxPool", "AveragePool", "GlobalMaxPool", "ReduceMean"}
LIMIT = 20000  # configurations one unit may reach before the space is too fine to profile


@dataclass(frozen=True)
class LayerConfig:
    """One unit as the runtime executes it; `key` is its identity in a latency table."""

    op: str  # conv, gemm, bn, add, mul, concat, pool:<OnnxOp>, act:<name>, other:<OnnxOp>
    cin: int
    cout: int
    h: int = 1
    w: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    act: str = ""
    extra: tuple[int, ...] = ()  # op-specific (binary ops: a per-channel second operand; concat: its parts)
    detail: str = ""  # other ops: a digest of their attributes, constants and layout (NodeTemplate)
    template: NodeTemplate | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        k = f"{self.op}|c{self.cin}>{self.cout}|{self.h}x{self.w}"
        if self.op == "conv" or self.op.startswith("pool"):
            k += f"|k{self.kernel[0]}x{self.kernel[1]}|s{self.stride[0]}x{self.stride[1]}|p" + ",".join(
                map(str, self.pads)
            )
        if self.op == "conv":
            k += "|g" + ("dw" if self.groups == self.cin == self.cout and self.groups > 1 else str(self.groups))
        if self.extra:
            k += "|x" + ",".join(map(str, self.extra))
        if self.detail:
            k += f"|{self.detail}"
        return k + (f"|{self.act}" if self.act else "")


@dataclass
class _Tensor:
    """Channel count of a tensor as c0 - a . removed (removed = width - keep per group); `axis`:
    the dimension that holds the channels (1, or the last of a channels-last map)."""

    c0: float
    a: np.ndarray
    axis: int = 1


@dataclass
class _Unit:
    op: str
    inputs: list[str]  # tensor names whose channels matter (first = main input)
    output: str
    h: int
    w: int
    attrs: dict = field(default_factory=dict)
    act: str = ""
    layer: str | None = None  # the torch layer (conv/gemm) whose out channels the cost model knows
    groups0: int = 1
    depthwise: bool = False
    gate: int | None = None  # the group whose keep-count 0 removes this unit (depth pruning)
    template: NodeTemplate | None = None

    @property
    def forms(self) -> list[str]:
        """The tensors whose channel counts the unit's configuration reads."""
        if self.op == "concat":
            return [self.output]
        return [self.inputs[0]] if self.inputs[0] == self.output else [self.inputs[0], self.output]


@dataclass
class UnitGrid:
    """The configurations one unit reaches: over the distinct channel counts of its `forms`
    (`values`, ascending, one array per form), `configs` maps index tuples to configurations;
    `removable`: whether some plan removes the unit (its block's gate at 0)."""

    forms: list[str]
    values: list[np.ndarray]
    configs: dict[tuple[int, ...], LayerConfig]
    removable: bool = False


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _spatial(shape: list[int], axis: int) -> tuple[int, int]:
    """The positions besides batch and channels, as H x W (1 x 1 for a vector, D x rest beyond 2-D)."""
    rest = [d for i, d in enumerate(shape) if i not in (0, axis)]
    if not rest:
        return 1, 1
    return rest[0], int(np.prod(rest[1:])) if len(rest) > 1 else 1


class ModelLayers:
    """The units of a model and how their channels follow a plan's keep-counts."""

    def __init__(self, space, onnx_model: onnx.ModelProto) -> None:
        self.space = space
        graph = shape_inference.infer_shapes(onnx_model).graph
        self._shapes = {
            vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
        }
        self._consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self._consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self._consumers.setdefault(i, []).append(n)
        first = graph.input[0].name
        self.tensors: dict[str, _Tensor] = {first: _Tensor(self._shapes[first][1], np.zeros(len(space.groups)))}
        order = _call_order(space.base, space.input_shape)
        modules = dict(space.base.named_modules())
        self._convs = [n for n in order if isinstance(modules[n], nn.Conv2d)]
        self._linears = [n for n in order if isinstance(modules[n], nn.Linear)]
        self._layer_index = {n: i for i, n in enumerate(space.cost.names)}
        self._fused: set[str] = set()
        self._tensor_gate: dict[str, int] = {}  # outputs of a removable block's convs -> its gate group
        self.units: list[_Unit] = []
        for node in graph.node:
            self._read(node)
        if self._convs or self._linears:
            raise EdgepruneError(
                f"could not pair {len(self._convs)} conv and {len(self._linears)} linear layers with the ONNX graph"
            )
        names = sorted({t for u in self.units for t in u.inputs + [u.output]})
        self._tindex = {n: i for i, n in enumerate(names)}
        self._c0 = np.array([self.tensors[n].c0 for n in names], float)
        self._a = np.stack([self.tensors[n].a for n in names]) if names else np.zeros((0, len(space.groups)))
        self.c0 = {name: t.c0 for name, t in self.tensors.items()}

    # ----- reading the graph -----
    def _read(self, node) -> None:
        op = node.op_type
        if op == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                self._consts[node.output[0]] = numpy_helper.to_array(value.t)
            return
        if node.name in self._fused:
            return
        ins = [i for i in node.input if i and i in self.tensors]
        out = node.output[0] if node.output else None
        if op in SKIPPED or not ins:
            if ins and out:
                self.tensors[out] = self.tensors[ins[0]]
            return
        if op in FOLDS:
            self.tensors[out] = self._fold(self.tensors[ins[0]], ins[0], out)
            self._check(node, out)
            return
        main = self.tensors[ins[0]]
        h, w = _spatial(self._shapes.get(ins[0], []), main.axis)
        unit = _Unit(op, ins, out, h, w)
        if op == "Transpose":
            perm = list(_attr(node, "perm", []))
            self.tensors[out] = _Tensor(main.c0, main.a, perm.index(main.axis) if main.axis in perm else main.axis)
            unit.op, unit.template = "other:Transpose", self._template(node, ins[0])
        elif op == "Conv":
            self._conv(node, unit)
        elif op in ("Gemm", "MatMul") and self._linears:
            unit.layer, unit.op = self._linears.pop(0), "gemm"
            self.tensors[out] = self._layer_tensor(unit.layer, axis=main.axis)
        elif op == "Concat":
            unit.op = "concat"
            parts = [self.tensors[t] for t in ins]
            self.tensors[out] = _Tensor(sum(p.c0 for p in parts), sum(p.a for p in parts), main.axis)
            unit.attrs["extra"] = (len(parts),)
        else:
            self._elementwise(node, unit)
        self._check(node, out)
        self._gate(unit, ins, out)
        self._fuse_activation(unit, out)
        self.units.append(unit)

    def _check(self, node, out: str) -> None:
        """The channels counted for `out` must be the channels the graph gives it: where an op moves
        channels in a way this reading does not follow, refuse rather than key a wrong table."""
        shape, t = self._shapes.get(out, []), self.tensors[out]
        if len(shape) >= 2 and t.axis < len(shape) and shape[t.axis] and shape[t.axis] != round(t.c0):
            raise EdgepruneError(
                f"the latency side cannot follow channels through the {node.op_type} node {node.name or out!r} "
                f"({round(t.c0)} channels expected, the graph has {shape[t.axis]}), so no latency table can cover "
                "this model; prune it against FLOPs instead (--cost flops), or prune a model without that op"
            )

    def _conv(self, node, unit: _Unit) -> None:
        if not self._convs:
            raise EdgepruneError("ONNX graph has more Conv nodes than the model has Conv2d layers")
        unit.layer, unit.op = self._convs.pop(0), "conv"
        unit.attrs = {
            "kernel": tuple(_attr(node, "kernel_shape", [1, 1])),
            "stride": tuple(_attr(node, "strides", [1, 1])),
            "pads": tuple(_attr(node, "pads", [0, 0, 0, 0])),
        }
        if tuple(_attr(node, "dilations", [1, 1])) != (1, 1):
            unit.attrs["extra"] = tuple(_attr(node, "dilations", [1, 1]))
        unit.groups0 = _attr(node, "group", 1)
        unit.depthwise = bool(self.space.cost.depthwise[self._layer_index[unit.layer]])
        self.tensors[unit.output] = self._layer_tensor(unit.layer)

    def _elementwise(self, node, unit: _Unit) -> None:
        op, ins = node.op_type, unit.inputs
        if op in POOLS:
            unit.op = f"pool:{op}"
            unit.attrs = {
                "kernel": tuple(_attr(node, "kernel_shape", [1, 1])),
                "stride": tuple(_attr(node, "strides", [1, 1])),
                "pads": tuple(_attr(node, "pads", [0, 0, 0, 0])),
            }
        elif op in ACTIVATIONS:
            unit.op = f"act:{ACTIVATIONS[op]}"
        elif op in ("Add", "Mul", "Sub", "Div"):
            unit.op = op.lower()
            if len(ins) == 2:
                other = self._shapes.get(ins[1], [])
                per_channel = len(other) == 4 and other[2] * other[3] == 1 and unit.h * unit.w > 1
                unit.attrs["extra"] = (1,) if per_channel else ()
        elif op == "BatchNormalization":
            unit.op = "bn"
        else:
            unit.op, unit.template = f"other:{op}", self._template(node, ins[0])
        self.tensors[unit.output] = max((self.tensors[t] for t in ins), key=lambda t: t.c0)

    def _template(self, node, main: str) -> NodeTemplate:
        """The node, to rebuild at other channel counts: other runtime inputs become random constants."""
        inputs: list = []
        for i in node.input:
            if i == main:
                inputs.append("x")
            elif not i:
                inputs.append("")
            elif i in self._consts:
                inputs.append(self._consts[i])
            else:
                shape = [max(d, 1) for d in self._shapes.get(i, [1])]
                inputs.append(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        shape = tuple(self._shapes.get(main, []))
        return NodeTemplate(node.op_type, list(node.attribute), inputs, shape, self.tensors[main].axis)

    def _fold(self, t: _Tensor, src: str, out: str) -> _Tensor:
        """A flatten to 2-D folds every position into the channels (what the next linear layer reads)."""
        shape, before = self._shapes.get(out, []), self._shapes.get(src, [])
        if len(shape) == 2 and len(before) > 2 and t.c0:
            factor = float(np.prod(before[1:])) / t.c0
            return _Tensor(t.c0 * factor, t.a * factor, 1)
        return t

    def _layer_tensor(self, layer: str, axis: int = 1) -> _Tensor:
        i = self._layer_index[layer]
        return _Tensor(float(self.space.cost.out0[i]), self.space.cost.a_out[i], axis)

    def _gate(self, unit: _Unit, ins: list[str], out: str) -> None:
        if unit.layer is not None:
            unit.gate = self.space.gate_of(unit.layer)
        elif unit.op == "add":  # the add that joins a removable block's branch goes with the block
            unit.gate = next((self._tensor_gate[t] for t in ins if t in self._tensor_gate), None)
        if unit.gate is not None and unit.op != "add":
            self._tensor_gate[out] = unit.gate

    def _fuse_activation(self, unit: _Unit, out: str) -> None:
        """Fuse a following activation that is the only consumer (what ORT / OpenVINO do)."""
        nxt = self._consumers.get(out, [])
        if unit.op in ("conv", "add", "gemm") and len(nxt) == 1 and nxt[0].op_type in ACTIVATIONS:
            unit.act = ACTIVATIONS[nxt[0].op_type]
            self._fused.add(nxt[0].name)
            self.tensors[nxt[0].output[0]] = self.tensors[out]
            if out in self._tensor_gate:
                self._tensor_gate[nxt[0].output[0]] = self._tensor_gate[out]

    @classmethod
    def from_model(cls, space) -> ModelLayers:
        from edgeprune.models.onnx import export_onnx

        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(space.base, space.input_shape, Path(d) / "dense.onnx")
            return cls(space, onnx.load(str(path)))

    # ----- channel counts and configurations -----
    def channels(self, counts) -> dict[str, int]:
        removed = np.asarray(self.space.widths) - np.asarray(counts)
        ch = self._c0 - self._a @ removed
        return {n: int(round(ch[i])) for n, i in self._tindex.items()}

    def configs(self, counts=None) -> list[LayerConfig]:
        """The units of the model pruned to `counts` (default: dense)."""
        counts = self.space.full_counts() if counts is None else counts
        ch = self.channels(counts)
        return [self._config(u, ch) for u in self.units if u.gate is None or counts[u.gate] > 0]

    def signature(self) -> str:
        """The dense model's units, hashed: which model a table's calibration was fitted on."""
        import hashlib

        return hashlib.sha256("\n".join(c.key for c in self.configs()).encode()).hexdigest()[:16]

    def form(self, tensor: str) -> tuple[float, np.ndarray]:
        """A tensor's channel count as (c0, a): c0 - a . removed."""
        i = self._tindex[tensor]
        return self._c0[i], self._a[i]

    def unit_grid(self, u_index: int, limit: int = LIMIT) -> UnitGrid:
        """Every configuration unit `u_index` reaches, over the distinct values of its forms."""
        u = self.units[u_index]
        forms = u.forms
        rows = np.stack([self.form(t)[1] for t in forms])
        involved = [int(g) for g in np.flatnonzero(np.abs(rows).sum(0))]
        states = {tuple(int(round(self.form(t)[0])) for t in forms)}
        for g in involved:
            group = self.space.groups[g]
            steps = {tuple(int(round(v)) for v in rows[:, g] * (group.width - k)) for k in group.allowed if k > 0}
            states = {tuple(s - d for s, d in zip(state, step)) for state in states for step in steps}
            if len(states) > limit:
                raise self._too_many(u, len(states), limit)
        values = [np.array(sorted({s[f] for s in states})) for f in range(len(forms))]
        configs = {}
        for state in states:
            index = tuple(int(np.searchsorted(v, s)) for v, s in zip(values, state))
            configs[index] = self._config(
                u, dict(zip(forms, state)) | {t: state[0] for t in u.inputs if t not in forms}
            )
        removable = u.gate is not None and 0 in self.space.groups[u.gate].allowed
        return UnitGrid(forms, values, configs, removable)

    def _too_many(self, u: _Unit, n: int, limit: int) -> EdgepruneError:
        where = f"layer {u.layer}" if u.layer else f"a {u.op} unit (number {self.units.index(u)})"
        return EdgepruneError(
            f"{where} reaches {n} configurations or more (limit {limit}): too many to profile; profile and prune "
            f"at a coarser channel step (--step {2 * self.space.step}: each group then takes fewer widths)"
        )

    def reachable(self, limit: int = LIMIT) -> list[LayerConfig]:
        """Every distinct unit configuration any plan of the space can produce."""
        seen: dict[str, LayerConfig] = {}
        for u_index in range(len(self.units)):
            for cfg in self.unit_grid(u_index, limit).configs.values():
                seen.setdefault(cfg.key, cfg)
        return list(seen.values())

    @staticmethod
    def _config(u: _Unit, ch: dict[str, int]) -> LayerConfig:
        """The configuration of unit `u` given the channel counts of its tensors."""
        cin, cout = ch[u.inputs[0]], ch[u.output]
        if u.op == "concat":
            cin = cout
        return LayerConfig(
            u.op,
            cin,
            cout,
            u.h,
            u.w,
            u.attrs.get("kernel", (1, 1)),
            u.attrs.get("stride", (1, 1)),
            u.attrs.get("pads", (0, 0, 0, 0)),
            cin if u.depthwise else u.groups0,
            u.act,
            tuple(u.attrs.get("extra", ())),
            u.template.digest() if u.template is not None else "",
            u.template,
        )


def _call_order(model: nn.Module, input_shape) -> list[str]:
    import torch

    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(*input_shape))
    finally:
        for h in hooks:
            h.remove()
    return order
