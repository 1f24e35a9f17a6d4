"""The dependency graph, from torch-pruning, with clear errors for patterns it cannot follow."""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

from edgeprune.errors import EdgepruneError

ROOT_TYPES = (nn.Conv2d, nn.Linear)


def _named_neighbour(DG: tp.DependencyGraph, node) -> str:
    """The nearest named layer before `node` (torch-pruning's op nodes have no names)."""
    seen, frontier = set(), [node]
    while frontier:
        n = frontier.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        name = DG._module2name.get(n.module)
        if name:
            return name
        frontier.extend(n.inputs)
    return "?"


def _failing_reshape(DG: tp.DependencyGraph) -> str | None:
    from torch_pruning.dependency import index_mapping

    for node in list(DG.module2node.values()):
        if node.type == tp.ops.OPTYPE.RESHAPE:
            try:
                index_mapping.update_reshape_index_mapping(DG, node)
            except ZeroDivisionError:
                return _named_neighbour(DG, node)
    return None


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, or a one-line error naming what it cannot handle."""
    DG = tp.DependencyGraph()
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # torch-pruning traces through autograd
            warnings.simplefilter("ignore")
            DG.build_dependency(model.eval(), example_inputs=example_input)
    except ZeroDivisionError:
        where = _failing_reshape(DG)
        raise EdgepruneError(
            f"cannot prune this model: a reshape after layer {where!r} mixes channels across groups (a channel "
            "shuffle, as in ShuffleNet), which torch-pruning's dependency graph cannot follow anywhere in the "
            "model (holding layers at full width does not help); prune another architecture (e.g. "
            "mobilenet_v3_small or regnet_x_400mf for a small, fast one)"
        ) from None
    except Exception as e:
        raise EdgepruneError(
            f"cannot build the channel dependency graph: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        ) from None
    return DG


def is_out_fn(DG: tp.DependencyGraph, fn) -> bool:
    return DG.is_out_channel_pruning_fn(fn)


def module_name(DG: tp.DependencyGraph, module: nn.Module) -> str | None:
    return DG._module2name.get(module)
