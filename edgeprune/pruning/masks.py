"""Channel masks: run the unpruned model as if a group kept only some channels, or a soft mix of widths.

A group's channels reach the rest of the network only through the layers that read them (a conv's
or linear layer's input channels, torch-pruning's in-channel dependencies, concatenations and
flattens mapped to their positions). Multiplying those inputs by a 0/1 vector therefore computes
exactly what the pruned model computes (in eval mode, where BatchNorm works channel by channel):
that is what lets a supernet share its weights across widths and a differentiable search mix
widths with weights it can learn (a soft vector, the expectation of the hard ones).

Which channels a keep-count keeps is the space's criterion on the base model (`PrunableSpace.plan`),
fixed when the masks are built: `keep_matrix(g)` holds, for each allowed keep-count of group g,
its 0/1 vector. Removing a whole residual block (keep-count 0 of its inner group, with depth
pruning) is not a channel mask, since a masked branch still adds its BatchNorm's shift: it is a gate
z on the block, z * block(x) + (1 - z) * x, which at z = 0 is the identity the plan puts there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.pruning.graph import ROOT_TYPES, module_name
from edgeprune.pruning.space import PrunableSpace


@dataclass(frozen=True)
class Reader:
    """A layer reading a group's channels: positions in its input, and the group channel at each."""

    layer: str
    group: int
    positions: torch.Tensor  # (n,) long: indices along the layer's input dimension 1
    channels: torch.Tensor  # (n,) long: the group's channel feeding each position


class ChannelMasks:
    """The readers of every variable group of `space`, and each group's keep vectors by allowed count."""

    def __init__(self, space: PrunableSpace, *, groups: list[int], criterion: str = "l2", depth: bool = False) -> None:
        if not depth and any(space.groups[g].allowed[0] == 0 for g in groups):
            raise EdgepruneError(
                "this searcher or proxy cannot remove whole residual blocks: search without --depth, or use another"
            )
        self.space, self.groups, self.criterion = space, list(groups), criterion
        self.gated = [g for g in self.groups if space.groups[g].allowed[0] == 0]  # block removers
        self.readers = [r for g in self.groups for r in _readers(space, g)]
        self._keep: dict[int, torch.Tensor] = {}

    def keep_matrix(self, g: int) -> torch.Tensor:
        """(allowed counts, width) 0/1: row i keeps what the plan keeping `allowed[i]` channels keeps."""
        if g not in self._keep:
            group = self.space.groups[g]
            crit = self.space.criterion(self.criterion)
            rows = torch.zeros(len(group.allowed), group.width)
            for i, k in enumerate(group.allowed):
                if k:  # 0: the block is removed (a gate), no channel kept
                    rows[i, crit.select(group, k) if k < group.width else slice(None)] = 1.0
            self._keep[g] = rows
        return self._keep[g]

    def hard(self, counts) -> dict[int, torch.Tensor]:
        """The 0/1 vector of each variable group at the plan's keep-count."""
        out = {}
        for g in self.groups:
            allowed = self.space.groups[g].allowed
            if int(counts[g]) not in allowed:
                raise EdgepruneError(f"group {g} cannot keep {counts[g]} channels; allowed: {allowed}")
            out[g] = self.keep_matrix(g)[allowed.index(int(counts[g]))]
        return out

    def hard_gates(self, counts) -> dict[int, torch.Tensor]:
        """Each block-removing group's gate: 0 where the plan removes its block, else 1."""
        return {g: torch.tensor(float(int(counts[g]) > 0)) for g in self.gated}

    @contextlib.contextmanager
    def applied(
        self, model: nn.Module, masks: Mapping[int, torch.Tensor], gates: Mapping[int, torch.Tensor] | None = None
    ) -> Iterator[nn.Module]:
        """`model` (the base or a copy of it: same layer names) with its groups' readers masked, and
        the blocks of `gates` gated, while inside."""
        modules = dict(model.named_modules())
        by_layer: dict[str, list[Reader]] = {}
        for r in self.readers:
            if r.group in masks:
                by_layer.setdefault(r.layer, []).append(r)
        handles = [
            modules[layer].register_forward_pre_hook(_MaskInput(readers, masks)) for layer, readers in by_layer.items()
        ]
        handles += [
            modules[self.space.groups[g].block].register_forward_hook(_Gate(z)) for g, z in (gates or {}).items()
        ]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()


class _MaskInput:
    """A forward pre-hook multiplying a layer's input channels by the masks of the groups feeding them."""

    def __init__(self, readers: list[Reader], masks: Mapping[int, torch.Tensor]) -> None:
        self.readers, self.masks = readers, masks

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        scale = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        for r in self.readers:
            mask = self.masks[r.group].to(x.device, x.dtype)
            scale = scale.index_put((r.positions.to(x.device),), mask[r.channels.to(x.device)])
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * scale.view(shape), *args[1:])


class _Gate:
    """A forward hook mixing a residual block's output with its input: z * block(x) + (1 - z) * x."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        z = self.z.to(out.device, out.dtype)
        return z * out + (1 - z) * args[0]


def _readers(space: PrunableSpace, g: int) -> list[Reader]:
    """Where group g's channels are read: every conv/linear input that torch-pruning couples to them."""
    group = space.groups[g]
    DG = space.graph
    module = dict(space.base.named_modules())[group.root]
    tp_group = DG.get_pruning_group(
        module, DG.get_pruner_of_module(module).prune_out_channels, list(range(group.width))
    )
    found: dict[str, tuple[list[int], list[int]]] = {}
    for item in tp_group.items:
        dep, target = item.dep, item.dep.target.module
        if not isinstance(target, ROOT_TYPES) or DG.is_out_channel_pruning_fn(dep.handler):
            continue
        if isinstance(target, nn.Conv2d) and target.groups > 1 and target.groups == target.in_channels:
            continue  # a depthwise conv's input is its output: masked where that is read
        name = module_name(DG, target)
        positions, channels = found.setdefault(name, ([], []))
        for idx, root in zip(item.idxs, item.root_idxs):
            positions.append(int(idx))
            channels.append(int(root))
    return [
        Reader(n, g, torch.tensor(p, dtype=torch.long), torch.tensor(c, dtype=torch.long))
        for n, (p, c) in found.items()
    ]
