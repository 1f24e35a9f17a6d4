"""Quantization-aware finetuning: train through the rounding the shipped int8 file will apply.

The int8 file is made by post-training quantization (formats/quantize.py): weights int8,
symmetric, per output channel; activations uint8, per tensor, min-max ranges. Where that costs
too much accuracy, a short finetune with the same rounding simulated in torch (fake quantization,
straight-through gradients) moves the weights to where the rounding does little harm.

The result is still a float model, and the export quantizes it again the usual way: the file's
QDQ placement, fusions and latency stay those the int8 tables measured (a graph exported from
torch's own fake-quant nodes would place them differently). Its weights are left on their int8
grid, which that second quantization keeps exactly: a symmetric per-channel scale follows any
per-channel factor, so folding BatchNorm into the conv changes no rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

WEIGHT_LEVELS = 127  # int8 weights in [-127, 127], symmetric (onnxruntime's per-channel weights)
ACTIVATION_LEVELS = 255  # uint8 activations in [0, 255], affine
RANGE_MOMENTUM = 0.01  # how fast an activation range follows the training batches' min and max
QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # what onnxruntime's QDQ makes int8 kernels of


class PerChannelInt8(nn.Module):
    """A weight as its int8 kernel sees it: each output channel rounded to 255 levels of its own
    largest magnitude (a parametrization: the float weight stays the trained one)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
        scale = (absmax / WEIGHT_LEVELS).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WEIGHT_LEVELS, WEIGHT_LEVELS)


class ActivationRange:
    """The uint8 rounding of one layer's input (a forward pre-hook): the range is the inputs'
    min and max (always holding 0, as onnxruntime's), taken exactly while calibrating, followed
    by a moving average while training, fixed in eval mode."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.calibrating = False

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif self.calibrating:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            self.lo, self.hi = self.lo.lerp(lo, RANGE_MOMENTUM), self.hi.lerp(hi, RANGE_MOMENTUM)

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if self.calibrating or module.training:
            self.observe(x)
        if self.lo is None or self.hi is None:
            return None
        scale = ((self.hi - self.lo) / ACTIVATION_LEVELS).clamp_min(1e-12).float()
        zero = (-self.lo / scale).round().clamp(0, ACTIVATION_LEVELS).int()
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, ACTIVATION_LEVELS), *args[1:])


class FakeQuantization:
    """Int8 rounding simulated on every conv and linear layer of `model` (in place), until
    `remove()`: weights per channel (a parametrization), inputs per tensor (a pre-hook). Not
    simulated: the rounding of a residual sum's inputs and output (a function in the model's
    forward, not a module to hook) and of the outputs (a small share: the inputs' and the weights'
    rounding make most of an int8 file's difference from the float model, tests/test_qat.py)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
        if not self.layers:
            raise ValueError("the model has no conv or linear layer to quantize")
        self.ranges = [ActivationRange() for _ in self.layers]
        self.hooks = [m.register_forward_pre_hook(r) for m, r in zip(self.layers, self.ranges)]
        for m in self.layers:
            parametrize.register_parametrization(m, "weight", PerChannelInt8())

    @torch.no_grad()
    def calibrate(self, inputs: Iterable[torch.Tensor]) -> None:
        """Each input range: the min and max over `inputs` (the export's calibration images)."""
        training = self.model.training
        self.model.eval()
        for r in self.ranges:
            r.calibrating = True
        try:
            for x in inputs:
                self.model(x)
        finally:
            for r in self.ranges:
                r.calibrating = False
            self.model.train(training)

    def remove(self) -> nn.Module:
        """The model with plain float weights again, left on their int8 grid; hooks gone."""
        for h in self.hooks:
            h.remove()
        for m in self.layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return self.model


def quantization_aware_finetune(
    model: nn.Module,
    *,
    teacher: nn.Module,
    task,
    recipe,
    calibration: list[torch.Tensor],
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Finetune `model` (in place) distilled from `teacher` through simulated int8 rounding, its
    input ranges first calibrated on `calibration` (batches of the export's calibration images);
    returns the FinetuneResult, its model back to float weights left on their int8 grid. Its
    held-out scores are the simulation's: the shipped file's are the caller's to take."""
    from edgeprune.training.distill import finetune_model

    simulated = FakeQuantization(model)
    try:
        simulated.calibrate(x.to(device) for x in calibration)
        result = finetune_model(model, teacher=teacher, task=task, recipe=recipe, device=device, progress=progress)
    finally:
        simulated.remove()
    result.model = model.eval()
    return result
