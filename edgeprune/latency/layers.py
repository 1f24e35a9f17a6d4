"""Layer configurations: a model as the runtime executes it, one unit per fused op.

The dense model is exported to ONNX once (BN folded into convs by the exporter). Its graph is
read into units: a conv with its fused activation, an add (with activation), pooling, a gemm,
etc. Each unit's channel counts are linear in the plan's keep-counts (a conv's output follows
its group; element-wise ops pass channels through; concat adds them), so the units of any plan
are computed without exporting it. A unit's key holds op, channels in/out, kernel, stride,
padding, groups, input HxW and fusion; keys, not layer names, so one table serves every model
that shares shapes.

With depth pruning, each unit inside a removable residual block (its convs, and the add that
joins the block's branch) knows the group whose keep-count 0 removes it: a removed block's units
are simply absent from the plan's configurations.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, shape_inference
from torch import nn

from edgeprune.errors import EdgepruneError

ACTIVATIONS = {
    "Relu": "relu",
    "Clip": "relu6",
    "HardSwish": "hswish",
    "Sigmoid": "sigmoid",
    "HardSigmoid": "hsigmoid",
    "LeakyRelu": "lrelu",
    "Tanh": "tanh",
    "Gelu": "gelu",
    "Swish": "silu",
}
SKIPPED = {
    "Identity",
    "Constant",
    "Flatten",
    "Reshape",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "ConstantOfShape",
    "Dropout",
}
POOLS = {"GlobalAveragePool", "MaxPool", "AveragePool", "GlobalMaxPool", "ReduceMean"}


@dataclass(frozen=True)
class LayerConfig:
    """One unit as the runtime executes it; `key` is its identity in a latency table."""

    op: str  # conv, gemm, add, mul, concat, pool:<OnnxOp>, act:<name>, other:<OnnxOp>
    cin: int
    cout: int
    h: int = 1
    w: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    act: str = ""
    extra: tuple[int, ...] = ()  # op-specific (second operand's shape for binary ops, concat part sizes)

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
        return k + (f"|{self.act}" if self.act else "")


@dataclass
class _Tensor:
    """Channel count of a tensor as c0 - a . removed (removed = width - keep per group)."""

    c0: int
    a: np.ndarray


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


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class ModelLayers:
    """The units of a model and how their channels follow a plan's keep-counts."""

    def __init__(self, space, onnx_model: onnx.ModelProto) -> None:
        self.space = space
        cost = space.cost
        graph = shape_inference.infer_shapes(onnx_model).graph
        shapes = {}
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            shapes[vi.name] = dims
        inits = {i.name for i in graph.initializer}
        consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        G = len(space.groups)
        zero = np.zeros(G)
        tensors: dict[str, _Tensor] = {graph.input[0].name: _Tensor(shapes[graph.input[0].name][1], zero)}
        # torch layers in call order, to pair with the ONNX Conv / Gemm nodes (the exporter emits them in that order)
        order = _call_order(space.base, space.input_shape)
        modules = dict(space.base.named_modules())
        convs = [n for n in order if isinstance(modules[n], nn.Conv2d)]
        linears = [n for n in order if isinstance(modules[n], nn.Linear)]
        layer_index = {n: i for i, n in enumerate(cost.names)}
        units: list[_Unit] = []
        fused: set[str] = set()
        tensor_gate: dict[str, int] = {}  # outputs of a removable block's convs -> its gate group
        for node in graph.node:
            op = node.op_type
            if node.name in fused:
                continue
            ins = [i for i in node.input if i and i not in inits and i in tensors]
            out = node.output[0] if node.output else None
            if op in SKIPPED or not ins:
                if ins and out:
                    tensors[out] = tensors[ins[0]]
                continue
            shape_in = shapes.get(ins[0], [])
            h, w = (shape_in[2], shape_in[3]) if len(shape_in) == 4 else (1, 1)
            unit = _Unit(op, ins, out, h, w)
            if op == "Conv":
                if not convs:
                    raise EdgepruneError("ONNX graph has more Conv nodes than the model has Conv2d layers")
                unit.layer = convs.pop(0)
                unit.op = "conv"
                unit.attrs = {
                    "kernel": tuple(_attr(node, "kernel_shape", [1, 1])),
                    "stride": tuple(_attr(node, "strides", [1, 1])),
                    "pads": tuple(_attr(node, "pads", [0, 0, 0, 0])),
                }
                if tuple(_attr(node, "dilations", [1, 1])) != (1, 1):
                    unit.attrs["extra"] = tuple(_attr(node, "dilations", [1, 1]))
                unit.groups0 = _attr(node, "group", 1)
                i = layer_index[unit.layer]
                unit.depthwise = bool(cost.depthwise[i])
                tensors[out] = _Tensor(int(cost.out0[i]), cost.a_out[i])
            elif op in ("Gemm", "MatMul") and linears:
                unit.layer = linears.pop(0)
                unit.op = "gemm"
                i = layer_index[unit.layer]
                tensors[out] = _Tensor(int(cost.out0[i]), cost.a_out[i])
            elif op == "Concat":
                unit.op = "concat"
                parts = [tensors[t] for t in ins]
                tensors[out] = _Tensor(sum(p.c0 for p in parts), sum(p.a for p in parts))
            else:
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
                else:
                    unit.op = f"other:{op}"
                main = max((tensors[t] for t in ins), key=lambda t: t.c0)
                tensors[out] = main
            if unit.layer is not None:
                unit.gate = space.gate_of(unit.layer)
            elif unit.op == "add":  # the add that joins a removable block's branch goes with the block
                unit.gate = next((tensor_gate[t] for t in ins if t in tensor_gate), None)
            if unit.gate is not None and unit.op != "add":
                tensor_gate[out] = unit.gate
            # fuse a following activation that is the only consumer (what ORT / OpenVINO do)
            nxt = consumers.get(out, [])
            if unit.op in ("conv", "add", "gemm") and len(nxt) == 1 and nxt[0].op_type in ACTIVATIONS:
                unit.act = ACTIVATIONS[nxt[0].op_type]
                fused.add(nxt[0].name)
                tensors[nxt[0].output[0]] = tensors[out]
                if out in tensor_gate:
                    tensor_gate[nxt[0].output[0]] = tensor_gate[out]
            if unit.op in ("mul", "add") and len(ins) == 2:
                other = shapes.get(ins[1], [])
                unit.attrs["extra"] = (1,) if len(other) == 4 and other[2] * other[3] == 1 and h * w > 1 else ()
            units.append(unit)
        if convs or linears:
            raise EdgepruneError(
                f"could not pair {len(convs)} conv and {len(linears)} linear layers with the ONNX graph"
            )
        self.units = units
        self.tensors = tensors
        self.c0 = {name: t.c0 for name, t in tensors.items()}
        names = sorted({t for u in units for t in u.inputs + [u.output]})
        self._tindex = {n: i for i, n in enumerate(names)}
        self._c0 = np.array([tensors[n].c0 for n in names])
        self._a = np.stack([tensors[n].a for n in names]) if names else np.zeros((0, G))

    @classmethod
    def from_model(cls, space) -> ModelLayers:
        from edgeprune.export import export_onnx

        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(space.base, space.input_shape, Path(d) / "dense.onnx")
            return cls(space, onnx.load(str(path)))

    def channels(self, counts) -> dict[str, int]:
        removed = np.asarray(self.space.widths) - np.asarray(counts)
        ch = self._c0 - self._a @ removed
        return {n: int(round(ch[i])) for n, i in self._tindex.items()}

    def configs(self, counts=None) -> list[LayerConfig]:
        """The units of the model pruned to `counts` (default: dense)."""
        counts = self.space.full_counts() if counts is None else counts
        ch = self.channels(counts)
        return [self._config(u, ch) for u in self.units if u.gate is None or counts[u.gate] > 0]

    def unit_grid(self, u_index: int, limit: int = 20000) -> tuple[list[int], list[LayerConfig | None]]:
        """The groups unit `u_index` depends on, and its configuration for every combination of
        their allowed keep-counts (itertools.product order, the other groups at full width);
        None where the combination removes the unit's block."""
        u = self.units[u_index]
        tnames = u.inputs + [u.output]
        involved = {int(g) for t in tnames for g in np.flatnonzero(self._a[self._tindex[t]])}
        involved = sorted(involved | ({u.gate} if u.gate is not None else set()))
        options = [self.space.groups[g].allowed for g in involved]
        combos = int(np.prod([len(o) for o in options])) if options else 1
        if combos > limit:
            raise EdgepruneError(f"unit {u_index} ({u.op}) has {combos} reachable configurations (limit {limit})")
        full = np.asarray(self.space.full_counts())
        configs = []
        for choice in itertools.product(*options) if options else [()]:
            counts = full.copy()
            counts[involved] = choice
            removed = u.gate is not None and counts[u.gate] == 0
            configs.append(None if removed else self._unit_config(u, counts))
        return involved, configs

    def reachable(self, limit: int = 20000) -> list[LayerConfig]:
        """Every distinct unit configuration any plan of the space can produce."""
        seen: dict[str, LayerConfig] = {}
        for u_index in range(len(self.units)):
            for cfg in self.unit_grid(u_index, limit)[1]:
                if cfg is not None:
                    seen.setdefault(cfg.key, cfg)
        return list(seen.values())

    def _unit_config(self, u: _Unit, counts) -> LayerConfig:
        removed = np.asarray(self.space.widths) - counts
        tensors = u.inputs + [u.output]
        return self._config(
            u, {t: int(round(self._c0[self._tindex[t]] - self._a[self._tindex[t]] @ removed)) for t in tensors}
        )

    @staticmethod
    def _config(u: _Unit, ch: dict[str, int]) -> LayerConfig:
        """The configuration of unit `u` given the channel counts of its tensors."""
        cin, cout = ch[u.inputs[0]], ch[u.output]
        extra = tuple(ch[t] for t in u.inputs) if u.op == "concat" else tuple(u.attrs.get("extra", ()))
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
            extra,
        )


def _call_order(model: nn.Module, input_shape) -> list[str]:
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


# ----- single-unit ONNX models, what the profiler measures -----


def _act_nodes(act: str, x: str, out: str, inits: list, prefix: str = "") -> list:
    if act == "relu6":
        inits += [
            numpy_helper.from_array(np.array(0.0, np.float32), f"{prefix}lo"),
            numpy_helper.from_array(np.array(6.0, np.float32), f"{prefix}hi"),
        ]
        return [helper.make_node("Clip", [x, f"{prefix}lo", f"{prefix}hi"], [out])]
    if act == "silu":
        return [helper.make_node("Sigmoid", [x], [f"{prefix}sig"]), helper.make_node("Mul", [x, f"{prefix}sig"], [out])]
    op = {v: k for k, v in ACTIVATIONS.items()}[act]
    return [helper.make_node(op, [x], [out])]


def _unit_graph(cfg: LayerConfig, rng: np.random.Generator, prefix: str, out: str):
    """Nodes and initialisers of one unit reading "x" and writing `out`; its input shape."""
    inits: list = []
    nodes: list = []
    shape = (1, cfg.cin, cfg.h, cfg.w) if cfg.op != "gemm" else (1, cfg.cin)
    body_out = out if not cfg.act else f"{prefix}pre"

    def const(name, arr):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{prefix}{name}"))
        return f"{prefix}{name}"

    if cfg.op == "conv":
        w = const("W", rng.standard_normal((cfg.cout, cfg.cin // cfg.groups, *cfg.kernel)) * 0.1)
        b = const("B", rng.standard_normal(cfg.cout) * 0.1)
        nodes.append(
            helper.make_node(
                "Conv",
                ["x", w, b],
                [body_out],
                kernel_shape=list(cfg.kernel),
                strides=list(cfg.stride),
                pads=list(cfg.pads),
                group=cfg.groups,
                dilations=list(cfg.extra or (1, 1)),
            )
        )
    elif cfg.op == "gemm":
        w = const("W", rng.standard_normal((cfg.cout, cfg.cin)) * 0.1)
        b = const("B", rng.standard_normal(cfg.cout) * 0.1)
        nodes.append(helper.make_node("Gemm", ["x", w, b], [body_out], transB=1))
    elif cfg.op in ("add", "mul", "sub", "div"):
        other = (1, cfg.cin, 1, 1) if cfg.extra == (1,) else shape
        k = const("K", rng.standard_normal(other) * 0.1 + 1.0)
        nodes.append(helper.make_node(cfg.op.capitalize(), ["x", k], [body_out]))
    elif cfg.op == "concat":
        parts = list(cfg.extra)
        names = ["x"] + [const(f"P{j}", rng.standard_normal((1, c, cfg.h, cfg.w))) for j, c in enumerate(parts[1:])]
        shape = (1, parts[0], cfg.h, cfg.w)
        nodes.append(helper.make_node("Concat", names, [body_out], axis=1))
    elif cfg.op.startswith("pool:"):
        op = cfg.op.split(":", 1)[1]
        kw = (
            {}
            if op.startswith("Global") or op == "ReduceMean"
            else {"kernel_shape": list(cfg.kernel), "strides": list(cfg.stride), "pads": list(cfg.pads)}
        )
        if op == "ReduceMean":
            inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), f"{prefix}axes"))
            nodes.append(helper.make_node(op, ["x", f"{prefix}axes"], [body_out], keepdims=1))
        else:
            nodes.append(helper.make_node(op, ["x"], [body_out], **kw))
    elif cfg.op.startswith("act:"):
        nodes += _act_nodes(cfg.op.split(":", 1)[1], "x", body_out, inits, prefix)
    else:
        raise EdgepruneError(f"cannot build a single-unit model for op {cfg.op!r}")
    if cfg.act:
        nodes += _act_nodes(cfg.act, body_out, out, inits, prefix)
    return nodes, inits, shape


def unit_model(cfg: LayerConfig, *, seed: int = 0, copies: int = 1) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A one-unit ONNX model for `cfg` and its input shape.

    With `copies` > 1: that many copies of the unit (each with its own weights) read the same
    input and their outputs are summed. The difference to the one-copy model, per copy, is what
    the unit costs inside a graph: the runtime's per-call overhead and the conversions of the
    model's input and output (e.g. OpenVINO's planar <-> blocked reorders, which a whole model
    pays once, not once per layer) are paid once in both models and cancel; the sum joins the
    copies the way a residual add joins a branch (fused into the conv where the runtime can)."""
    if copies < 1:
        raise EdgepruneError(f"copies must be at least 1, got {copies}")
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    outs = ["y"] if copies == 1 else [f"c{j}_y" for j in range(copies)]
    for j, out in enumerate(outs):
        n, i, shape = _unit_graph(cfg, rng, "" if copies == 1 else f"c{j}_", out)
        nodes += n
        inits += i
    if copies > 1:
        nodes.append(helper.make_node("Sum", outs, ["y"]))
    graph = helper.make_graph(
        nodes,
        "unit",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeprune")
    model.ir_version = 8
    inferred = shape_inference.infer_shapes(model)  # give the output its shape (the checker requires one)
    model.graph.output[0].type.CopyFrom(inferred.graph.output[0].type)
    return model, shape
