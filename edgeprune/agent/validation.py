"""What the agent accepts: well-formed, self-contained ONNX models with standard ops only."""

from __future__ import annotations

import onnx

ALLOWED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}  # built into the runtimes; no op libraries


class Rejected(ValueError):
    """The request is refused with HTTP 400 and this message."""


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _tensors(model: onnx.ModelProto):
    """Every tensor a model carries, wherever it sits: initializers (dense and sparse), node
    attributes (single and lists, sparse too), in every subgraph and local function."""

    def of_sparse(sparse: onnx.SparseTensorProto):
        yield sparse.values
        yield sparse.indices

    def of_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from of_sparse(attr.sparse_tensor)
                for sparse in attr.sparse_tensors:
                    yield from of_sparse(sparse)

    graphs = [model.graph] + [g for t in model.training_info for g in (t.initialization, t.algorithm)]
    for graph in (sub for top in graphs for sub in _graphs(top)):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from of_sparse(sparse)
        yield from of_nodes(graph.node)
    for function in model.functions:
        yield from of_nodes(function.node)


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0


def check_model(data: bytes, input_shape: list[int]) -> onnx.ModelProto:
    """Parse and vet `data`; raise Rejected with a one-line reason."""
    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise Rejected(f"not a valid ONNX model (cannot parse: {str(e).splitlines()[0][:120]})") from None
    if not model.graph.node:
        raise Rejected("not a valid ONNX model (the graph has no nodes)")
    # before the checker: it resolves external paths from this process's folder, and its answers
    # would tell a client which files exist on the device
    if any(_external(t) for t in _tensors(model)):
        raise Rejected("the model references external data; send a self-contained model")
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain not in ALLOWED_DOMAINS:
                raise Rejected(
                    f"node {node.name or node.op_type!r} uses custom-op domain {node.domain!r}; not accepted"
                )
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise Rejected(f"the model imports custom-op domain {opset.domain!r}; not accepted")
    if model.functions:
        raise Rejected("models with local functions are not accepted")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise Rejected(f"not a valid ONNX model ({str(e).strip().splitlines()[0][:160]})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise Rejected(f"the model must have exactly one input, it has {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != len(input_shape) or any(d is not None and d != s for d, s in zip(dims, input_shape)):
        shown = [d if d is not None else "?" for d in dims]
        raise Rejected(f"input shape {list(input_shape)} does not match the model's input {shown}")
    if min(input_shape) < 1:
        raise Rejected(f"input shape {list(input_shape)} has a non-positive size")
    return model
