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


def simplify_and_check(path: str | os.PathLike) -> dict:
    """Simplify the ONNX file in place with onnxslim (constant folding, dead nodes, fused patterns),
    then run the ONNX checker on the result (full check, shapes included); returns what was done."""
    import onnx
    import onnxslim

    path = Path(path)
    model = onnx.load(str(path))
    nodes_before = len(model.graph.node)
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # keep the exporter's graph: simplification is an optimisation, not a must
        slim, note = model, f"onnxslim failed ({str(e).splitlines()[0][:100]}); graph kept as exported"
    else:
        note = "simplified with onnxslim"
    try:
        onnx.checker.check_model(slim, full_check=True)
    except Exception as e:
        raise EdgepruneError(f"the exported ONNX file fails the ONNX checker: {str(e).splitlines()[0][:200]}") from None
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(slim, str(tmp))
    os.replace(tmp, path)
    return {
        "opset": next((o.version for o in slim.opset_import if o.domain in ("", "ai.onnx")), None),
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "simplifier": f"onnxslim {onnxslim.__version__}",
        "note": note,
        "nodes": {"exported": nodes_before, "simplified": len(slim.graph.node)},
        "checker": "passed (full_check)",
    }
