"""MACs and parameter counts of any plan, computed from keep-counts without building the model.

One forward pass of the base model records each layer's shape; each group says by how many
channels it shrinks each layer's input and output. Counting a plan is then a few vector ops,
fast enough to sit inside a search loop (the FLOPs-constrained baseline uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class CostModel:
    names: list[str]
    kind: np.ndarray  # 0 conv, 1 linear, 2 norm
    out0: np.ndarray
    in0: np.ndarray
    groups0: np.ndarray
    depthwise: np.ndarray
    kernel: np.ndarray  # kh * kw
    spatial: np.ndarray  # output positions per sample (Hout * Wout, or tokens for linear)
    has_bias: np.ndarray
    a_out: np.ndarray  # layers x groups: output channels removed per channel pruned from the group
    a_in: np.ndarray
    widths: np.ndarray
    other_params: int  # parameters outside conv/linear/norm layers that no group prunes, counted whole
    gate: np.ndarray  # per layer, the group whose keep-count 0 removes its residual block (-1: none)
    # parameters outside any layer that a group prunes (ConvNeXt's layer scale): their size per
    # channel, their channels, and how their channels fall with each group's removed channels
    free_per_channel: np.ndarray = None
    free_c0: np.ndarray = None
    a_free: np.ndarray = None

    @classmethod
    def from_space(cls, space) -> CostModel:
        model = space.base
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, *NORMS))}
        spatial = _output_positions(model, layers, space.input_shape)
        names = [n for n in layers if n in spatial]
        index = {n: i for i, n in enumerate(names)}
        L, G = len(names), len(space.groups)
        a_out, a_in = np.zeros((L, G)), np.zeros((L, G))
        for g in space.groups:
            for d in g.layers:
                if d.layer in index:
                    (a_out if d.dim == "out" else a_in)[index[d.layer], g.index] = d.factor
        rows = [_layer_row(layers[n]) for n in names]
        kind, out0, in0, groups0, dw, kernel, bias = zip(*rows) if rows else ([],) * 7
        counted = sum(p.numel() for n in names for p in layers[n].parameters(recurse=False))
        total = sum(p.numel() for p in model.parameters())
        free_per_channel, free_c0, a_free, free_params = _free_parameters(space)
        counted += free_params
        gate = [-1 if g is None else g for g in map(space.gate_of, names)]
        arr = np.asarray
        return cls(
            names,
            arr(kind),
            arr(out0),
            arr(in0),
            arr(groups0),
            arr(dw, bool),
            arr(kernel),
            arr([spatial[n] for n in names]),
            arr(bias, bool),
            a_out,
            a_in,
            arr(space.widths),
            total - counted,
            arr(gate, int),
            free_per_channel,
            free_c0,
            a_free,
        )

    def _shapes(self, counts):
        """Per-layer (out, in, groups) channels for keep-counts (G,) or many plans (N, G)."""
        removed = self.widths - np.asarray(counts)
        out = self.out0 - removed @ self.a_out.T
        inp = np.where(self.depthwise, out, self.in0 - removed @ self.a_in.T)
        groups = np.maximum(np.where(self.depthwise, out, self.groups0), 1)  # >= 1: a removed block has 0 channels
        norm = self.kind == 2
        inp = np.where(norm, out, inp)
        return out, inp, groups

    def _alive(self, counts) -> np.ndarray:
        """Per layer, 1 unless the plan removes the residual block it lies in."""
        counts = np.asarray(counts)
        kept = np.take(counts, np.maximum(self.gate, 0), axis=-1) > 0
        return np.where(self.gate >= 0, kept, True)

    def macs_many(self, counts) -> np.ndarray:
        """MACs of each plan (N x G keep-counts), vectorised: what a search's repair calls."""
        out, inp, groups = self._shapes(np.atleast_2d(counts))
        per = out * (inp / groups) * self.kernel * self.spatial * self._alive(np.atleast_2d(counts))
        return np.round((per * (self.kind != 2)).sum(-1))

    def macs(self, counts: Sequence[int]) -> int:
        return int(self.macs_many(counts)[0])

    def params_many(self, counts) -> np.ndarray:
        """Parameters of each plan (N x G keep-counts), vectorised (a latency calibration's weights term)."""
        counts = np.atleast_2d(counts)
        out, inp, groups = self._shapes(counts)
        weights = np.where(self.kind == 2, out, out * (inp / groups) * self.kernel)
        norm_affine = (self.kind == 2) & (weights > 0)
        weights = np.where(norm_affine, out * np.where(self.has_bias, 2, 1), weights)
        bias = np.where((self.kind != 2) & self.has_bias, out, 0)
        free = 0.0
        if self.a_free is not None and len(self.a_free):
            free = ((self.free_c0 - (self.widths - counts) @ self.a_free.T) * self.free_per_channel).sum(-1)
        return np.round(((weights + bias) * self._alive(counts)).sum(-1) + free) + self.other_params

    def params(self, counts: Sequence[int]) -> int:
        return int(self.params_many(counts)[0])


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of conv and linear layers measured by hooks on a real forward pass (the reference)."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def _free_parameters(space) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Parameters outside any layer that a group prunes (ConvNeXt's layer scale): their size per
    channel, their channels, how their channels fall with each group's removed channels, and how
    many weights they hold in all."""
    free = dict(space.base.named_parameters())
    names = sorted({d.layer for g in space.groups for d in g.layers if d.dim == "param" and d.layer in free})
    a_free = np.zeros((len(names), len(space.groups)))
    for g in space.groups:
        for d in g.layers:
            if d.dim == "param" and d.layer in names:
                a_free[names.index(d.layer), g.index] = d.factor
    first = [int(np.flatnonzero(row)[0]) for row in a_free]
    c0 = np.array([a_free[i, g] * space.groups[g].width for i, g in enumerate(first)])
    per_channel = np.array([free[n].numel() for n in names]) / np.maximum(c0, 1)
    return per_channel, c0, a_free, sum(free[n].numel() for n in names)


def _output_positions(model: nn.Module, layers: dict[str, nn.Module], input_shape) -> dict[str, int]:
    """Per layer, the positions its output channels are computed at (H*W for a conv; tokens for a
    linear layer): a layer's MACs are its per-position MACs times this. Layers the forward pass
    does not reach are absent."""
    spatial: dict[str, int] = {}
    hooks = []
    for name, m in layers.items():

        def hook(mod, inp, out, name=name):
            channels = out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]
            spatial[name] = int(out[0].numel() // channels) if out.dim() > 1 else 1

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(torch.randn(*input_shape))
    finally:
        for h in hooks:
            h.remove()
    return spatial


def _layer_row(m: nn.Module) -> tuple[int, int, int, int, bool, int, bool]:
    """(kind: 0 conv / 1 linear / 2 norm, channels out, in, groups, depthwise, kernel area, has bias)."""
    if isinstance(m, nn.Conv2d):
        dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        return 0, m.out_channels, m.in_channels, m.groups, dw, m.kernel_size[0] * m.kernel_size[1], m.bias is not None
    if isinstance(m, nn.Linear):
        return 1, m.out_features, m.in_features, 1, False, 1, m.bias is not None
    c = m.num_features if hasattr(m, "num_features") else getattr(m, "num_channels", 0)
    if isinstance(m, nn.LayerNorm):
        c = int(np.prod(m.normalized_shape))
    return 2, c, c, 1, False, 1, sum(p.numel() for p in m.parameters(recurse=False)) > c
