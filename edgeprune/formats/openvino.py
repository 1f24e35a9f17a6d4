"""ONNX -> OpenVINO IR (model.xml + model.bin), full-precision weights."""

from __future__ import annotations

import os
from pathlib import Path

from edgeprune.errors import EdgepruneError


def onnx_to_openvino(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> Path:
    """Convert with OpenVINO's own converter; weights stay fp32 (the device profile picks the
    inference precision, so the IR must not have decided it already)."""
    try:
        import openvino as ov
    except ImportError:
        raise EdgepruneError("OpenVINO is not installed here: pip install openvino") from None
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    except Exception as e:
        raise EdgepruneError(f"OpenVINO cannot convert {onnx_path}: {str(e).strip().splitlines()[0][:200]}") from None
    return xml_path
