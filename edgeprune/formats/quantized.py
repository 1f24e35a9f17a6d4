"""A candidate scored as it will run in int8: the quantized ONNX file, run by ONNX Runtime.

An int8 search must rank plans by what ships, and PTQ does not cost every plan alike: a thin
layer's activation range is coarser per channel, a pruned residual sum quantizes differently. Two
ways could score that: fake-quantization in torch (fast, but a second implementation of ONNX
Runtime's QDQ placement, fusions and rounding, which would drift from the file) or the file
itself. This is the file itself: the candidate, BatchNorm recalibrated, is exported, quantized
by `quantize_int8` with the export's own calibration (the same training images, never held-out or
test ones), and ONNX Runtime computes its outputs on the held-out images. It costs about a second
more per candidate than the fp32 proxy (an export and a calibration pass), and its score is the
shipped file's, not an estimate. OpenVINO runs the same QDQ graph (its FakeQuantize reading of the
pairs): one score serves both runtimes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCH = 64  # images per runtime call (the file's fixed batch; a last, shorter chunk is padded)


class QuantizedModel(nn.Module):
    """`model` quantized to int8 and run by ONNX Runtime: a module the task's score calls like
    the torch model (outputs on the CPU; tensor outputs only)."""

    def __init__(self, model: nn.Module, calibration: list[np.ndarray], *, threads: int | None = None) -> None:
        from edgeprune.backends import OnnxRuntimeBackend
        from edgeprune.formats.quantize import quantize_int8
        from edgeprune.models.onnx import export_onnx

        super().__init__()
        self._where = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # the task's score asks its device
        sample = calibration[0]
        self.shape = (BATCH, *sample.shape[1:])
        images = np.concatenate(calibration)
        chunks = [images[i : i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)] or [_padded(images)]
        with tempfile.TemporaryDirectory(prefix="edgeprune-int8-proxy-") as tmp:
            fp32 = export_onnx(model.cpu().eval(), self.shape, Path(tmp) / "m.onnx")
            int8 = quantize_int8(fp32, Path(tmp) / "m.int8.onnx", calibration=chunks)
            self.run = OnnxRuntimeBackend(threads=threads or torch.get_num_threads()).session(int8, self.shape)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().numpy().astype(np.float32, copy=False)
        out = [self.run(_padded(x[i : i + BATCH]))[: len(x[i : i + BATCH])] for i in range(0, len(x), BATCH)]
        return torch.from_numpy(np.concatenate(out))


def _padded(x: np.ndarray) -> np.ndarray:
    """`x` padded with zero images to the file's batch."""
    if len(x) == BATCH:
        return np.ascontiguousarray(x)
    pad = np.zeros((BATCH - len(x), *x.shape[1:]), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate([x, pad]))


class Int8Runner:
    """Model -> the model as its int8 file runs (QuantizedModel), calibrated on `calibration`: what
    an int8 search's proxy scores (the pipeline gives it to the proxy; picklable for Ray workers)."""

    def __init__(self, calibration: list[np.ndarray]) -> None:
        self.calibration = calibration

    def __call__(self, model: nn.Module) -> nn.Module:
        return QuantizedModel(model, self.calibration)
