"""Single-unit ONNX models: what the profiler measures for one LayerConfig.

Each unit reads one input `x` shaped as in the model (channels set to the configuration's) and
writes `y`. The common ops (conv, gemm, element-wise, concat, pooling, activations, batch norm)
are built from the key alone; any other op is rebuilt from its node in the dense model (a
`NodeTemplate`: the op, its attributes and constants, with channel-sized constants cut to the
configuration's channels), so a table covers every op the model runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

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


@dataclass
class NodeTemplate:
    """An op of the dense model, to rebuild at other channel counts: its attributes and inputs
    ("x": the unit's input; "": an absent optional input; an array: a constant), the rank of its
    input and which axis holds the channels (1, or the last after a transpose to channels-last)."""

    op_type: str
    attributes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    shape: tuple[int, ...] = ()
    axis: int = 1

    def digest(self) -> str:
        """What distinguishes two nodes of this op beyond channels and size (attributes, small
        constants, layout): part of the configuration's key."""
        h = hashlib.sha256(self.op_type.encode())
        for a in self.attributes:
            h.update(a.SerializeToString())
        for i in self.inputs:
            h.update(i.encode() or b"-" if isinstance(i, str) else self._const_id(np.asarray(i)))
        h.update(f"{len(self.shape)}/{self.axis}".encode())
        return h.hexdigest()[:8]

    def _channel_dim(self, arr: np.ndarray) -> int | None:
        """Where `arr` (broadcast against the input, aligned right) runs along the channels, if it does."""
        pos = arr.ndim - (len(self.shape) - self.axis)
        return pos if arr.ndim and 0 <= pos < arr.ndim and arr.shape[pos] == self.shape[self.axis] else None

    def _const_id(self, arr: np.ndarray) -> bytes:
        """A constant's identity apart from the channels: its shape (channels as -1), and its values
        where small and not per channel (a scale factor, a permutation)."""
        pos = self._channel_dim(arr)
        shape = [(-1 if i == pos else d) for i, d in enumerate(arr.shape)]
        return str(shape).encode() + (arr.tobytes() if pos is None and arr.size <= 16 else b"")

    def channel_cut(self, arr: np.ndarray, channels: int) -> np.ndarray:
        """`arr` with its channel dimension (if it has one) cut to `channels`."""
        pos = self._channel_dim(arr)
        return arr if pos is None else np.take(arr, range(channels), axis=pos)


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


def _template_nodes(cfg, rng, const) -> tuple[list, tuple[int, ...]]:
    t: NodeTemplate = cfg.template
    shape = list(t.shape)
    shape[t.axis] = cfg.cin
    names = []
    for j, i in enumerate(t.inputs):
        if isinstance(i, str):
            names.append(i)
        else:
            arr = t.channel_cut(np.asarray(i), cfg.cin)
            names.append(const(f"T{j}", arr, keep_dtype=True))
    node = helper.make_node(t.op_type, names, ["body"])
    node.attribute.extend(t.attributes)
    return [node], tuple(shape)


def _unit_graph(cfg, rng: np.random.Generator, prefix: str, out: str):
    """Nodes and initialisers of one unit reading "x" and writing `out`; its input shape."""
    return _UnitGraph(cfg, rng, prefix, out).build()


class _UnitGraph:
    """The ONNX nodes of one layer unit: the op its configuration names, then its activation."""

    def __init__(self, cfg, rng: np.random.Generator, prefix: str, out: str) -> None:
        self.cfg, self.rng, self.prefix, self.out = cfg, rng, prefix, out
        self.inits: list = []
        self.nodes: list = []
        self.tokens = cfg.op == "gemm" and cfg.h * cfg.w > 1  # a linear layer over a channels-last map
        c = cfg
        self.shape = (1, c.cin, c.h, c.w) if c.op != "gemm" else (1, c.h, c.w, c.cin) if self.tokens else (1, c.cin)
        self.body_out = out if not cfg.act else f"{prefix}pre"

    def const(self, name, arr, keep_dtype=False) -> str:
        arr, name = np.asarray(arr), f"{self.prefix}{name}"
        self.inits.append(numpy_helper.from_array(arr if keep_dtype else arr.astype(np.float32), name))
        return name

    def build(self):
        cfg = self.cfg
        if cfg.op in ("conv", "gemm", "bn", "concat"):
            getattr(self, f"_{cfg.op}")()
        elif cfg.op in ("add", "mul", "sub", "div"):
            other = (1, cfg.cin, 1, 1) if cfg.extra == (1,) else self.shape
            k = self.const("K", self.rng.standard_normal(other) * 0.1 + 1.0)
            self.nodes.append(helper.make_node(cfg.op.capitalize(), ["x", k], [self.body_out]))
        elif cfg.op.startswith("pool:"):
            self._pool(cfg.op.split(":", 1)[1])
        elif cfg.op.startswith("act:"):
            self.nodes += _act_nodes(cfg.op.split(":", 1)[1], "x", self.body_out, self.inits, self.prefix)
        elif cfg.template is not None:
            built, self.shape = _template_nodes(cfg, self.rng, self.const)
            built[0].output[0] = self.body_out
            self.nodes += built
        else:
            raise EdgepruneError(
                f"cannot build a single-unit model for op {cfg.op!r} without the model it comes from; profile the model"
            )
        if cfg.act:
            self.nodes += _act_nodes(cfg.act, self.body_out, self.out, self.inits, self.prefix)
        return self.nodes, self.inits, self.shape

    def _conv(self) -> None:
        cfg, rng = self.cfg, self.rng
        w = self.const("W", rng.standard_normal((cfg.cout, cfg.cin // cfg.groups, *cfg.kernel)) * 0.1)
        b = self.const("B", rng.standard_normal(cfg.cout) * 0.1)
        self.nodes.append(
            helper.make_node(
                "Conv",
                ["x", w, b],
                [self.body_out],
                kernel_shape=list(cfg.kernel),
                strides=list(cfg.stride),
                pads=list(cfg.pads),
                group=cfg.groups,
                dilations=list(cfg.extra or (1, 1)),
            )
        )

    def _gemm(self) -> None:
        cfg, rng, p = self.cfg, self.rng, self.prefix
        if self.tokens:
            w = self.const("W", rng.standard_normal((cfg.cin, cfg.cout)) * 0.1)
            b = self.const("B", rng.standard_normal(cfg.cout) * 0.1)
            self.nodes += [
                helper.make_node("MatMul", ["x", w], [f"{p}mm"]),
                helper.make_node("Add", [f"{p}mm", b], [self.body_out]),
            ]
        else:
            w = self.const("W", rng.standard_normal((cfg.cout, cfg.cin)) * 0.1)
            b = self.const("B", rng.standard_normal(cfg.cout) * 0.1)
            self.nodes.append(helper.make_node("Gemm", ["x", w, b], [self.body_out], transB=1))

    def _bn(self) -> None:
        n, rng = self.cfg.cin, self.rng
        values = (("S", rng.uniform(0.5, 1.5, n)), ("B", rng.standard_normal(n)), ("M", rng.standard_normal(n)))
        params = [self.const(name, v) for name, v in (*values, ("V", rng.uniform(0.5, 1.5, n)))]
        self.nodes.append(helper.make_node("BatchNormalization", ["x", *params], [self.body_out]))

    def _concat(self) -> None:
        """The total split evenly over the parts (a copy's cost is its bytes)."""
        cfg = self.cfg
        n = max(1, cfg.extra[0] if cfg.extra else 1)
        sizes = [cfg.cout // n] * n
        sizes[0] += cfg.cout - sum(sizes)
        parts = [self.const(f"P{j}", self.rng.standard_normal((1, c, cfg.h, cfg.w))) for j, c in enumerate(sizes[1:])]
        self.shape = (1, sizes[0], cfg.h, cfg.w)
        self.nodes.append(helper.make_node("Concat", ["x", *parts], [self.body_out], axis=1))

    def _pool(self, op: str) -> None:
        cfg = self.cfg
        if op == "ReduceMean":
            axes = self.const("axes", np.array([2, 3], np.int64), keep_dtype=True)
            self.nodes.append(helper.make_node(op, ["x", axes], [self.body_out], keepdims=1))
            return
        kw = (
            {}
            if op.startswith("Global")
            else {"kernel_shape": list(cfg.kernel), "strides": list(cfg.stride), "pads": list(cfg.pads)}
        )
        self.nodes.append(helper.make_node(op, ["x"], [self.body_out], **kw))


def unit_model(
    cfg, *, seed: int = 0, copies: int = 1, reduced: bool = False, pooled: bool = False
) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A one-unit ONNX model for `cfg` (a LayerConfig) and its input shape.

    With `copies` > 1: that many copies of the unit (each with its own weights) read the same
    input and their outputs are summed. The difference to the one-copy model, per copy, is what
    the unit costs inside a graph: the runtime's per-call overhead and the conversions of the
    model's input and output (e.g. OpenVINO's planar <-> blocked reorders, which a whole model
    pays once, not once per layer) are paid once in both models and cancel.

    `reduced` (the in-context measurement, UNIT_CONTEXT): each copy's output is summed to a scalar
    as soon as it is written, and the scalars are added. A copy then costs its unit plus one read
    of its output, as a layer in a graph costs its compute plus its consumer's read, and only one
    copy's output is live at a time, as in a graph. Summing the whole outputs instead keeps all K
    alive to the end: a 96 x 112 x 112 map is 4.8 MB, four are past this VM's cache, and the
    mobilenet_v2 expand conv measured 0.89 ms a copy that way against 0.47 ms reduced, while the
    whole model moved by what the reduced units predict (bench/README.md).

    `pooled` (with `reduced`, for an int8 device): a 4-d output is averaged over its map by a
    GlobalAveragePool before the sum. Quantized, that pool runs in int8 on the int8 map as the next
    layer of a graph would read it; a ReduceSum would first dequantize the whole map to fp32 (and
    ONNX Runtime transpose it out of its int8 layout), which a graph of int8 layers never does."""
    if copies < 1:
        raise EdgepruneError(f"copies must be at least 1, got {copies}")
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    named = copies > 1 or reduced
    outs = [f"c{j}_y" for j in range(copies)] if named else ["y"]
    for j, out in enumerate(outs):
        n, i, shape = _unit_graph(cfg, rng, f"c{j}_" if named else "", out)
        nodes += n
        inits += i
    if reduced:
        if pooled and len(shape) == 4 and cfg.op != "gemm" and cfg.template is None:  # a map in, a map out
            nodes += [helper.make_node("GlobalAveragePool", [out], [f"{out}_pool"]) for out in outs]
            outs = [f"{out}_pool" for out in outs]
        nodes += [helper.make_node("ReduceSum", [out], [f"{out}_sum"], keepdims=0) for out in outs]
        outs = [f"{out}_sum" for out in outs]
    if named:
        nodes.append(helper.make_node("Sum" if len(outs) > 1 else "Identity", outs, ["y"]))
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
