"""PyTorch -> ONNX, one self-contained file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgepruneError

DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export `model` (eval mode, fixed input shape) to a single ONNX file at `path`.

    Uses the TorchScript-based exporter (``dynamo=False``): it writes one file with the weights
    inside, which is what devices and the agent receive.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = torch.randn(*input_shape)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(tmp), input_names=["input"], output_names=["output"], opset_version=opset, dynamo=False
            )
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise EdgepruneError(f"ONNX export failed: {str(e).splitlines()[0][:200]}") from None
    os.replace(tmp, path)
    return path
