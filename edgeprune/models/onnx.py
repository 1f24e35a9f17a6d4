"""PyTorch -> ONNX, one self-contained file, for any model: one output, a tuple, or a dict.

The latency side (profiling, whole-model measurements) and the shipping side (export) both turn
models into ONNX files; the conversion lives here, below both.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgepruneError

DEFAULT_OPSET = 17


def flatten_outputs(out) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors (a tensor, or tuples, lists and dicts of them,
    nested; dicts in insertion order), the order the ONNX exporter writes them in."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    raise EdgepruneError(
        f"the model returns a {type(out).__name__}; edgeprune handles tensors and tuples, lists or dicts of them"
    )


def output_names(out, prefix: str = "") -> list[str]:
    """Names of the flattened outputs: `output` for a single tensor, `output_0`, ... for a sequence,
    the keys (made identifier-safe) for a dict, joined with `.` where nested."""
    if isinstance(out, torch.Tensor):
        return [prefix or "output"]
    if isinstance(out, dict):
        items = [(re.sub(r"[^A-Za-z0-9_]", "_", str(k)), v) for k, v in out.items()]
    else:
        items = [(f"output_{i}" if not prefix else str(i), v) for i, v in enumerate(out)]
    return [n for key, v in items for n in output_names(v, f"{prefix}.{key}" if prefix else key)]


def example_tensor(example: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The example input as a tensor (a shape gives random values: latency does not depend on them)."""
    if isinstance(example, torch.Tensor):
        return example
    return torch.randn(*[int(d) for d in example])


# The TorchScript exporter keeps its state in module globals: one export at a time in a process
# (devices profiled at once export from several threads).
_ONE_EXPORT = threading.Lock()


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export `model` (eval mode, the example's fixed input shape) to a single ONNX file at `path`.

    Uses the TorchScript-based exporter (``dynamo=False``): it writes one file with the weights
    inside, which is what devices and the agent receive. The input is named `input`; outputs
    as `output_names` gives them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= 2**31:
        raise EdgepruneError(
            f"the model's weights ({size / 2**30:.1f} GiB) exceed what one ONNX file holds (2 GiB): too large for "
            "an edge device; prune a smaller model"
        )
    x = example_tensor(example_input)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _ONE_EXPORT, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            names = output_names(model(x))
            torch.onnx.export(
                model, (x,), str(tmp), input_names=["input"], output_names=names, opset_version=opset, dynamo=False
            )
    except EdgepruneError:
        raise
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise EdgepruneError(f"ONNX export failed: {str(e).strip().splitlines()[0][:200]}") from None
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
