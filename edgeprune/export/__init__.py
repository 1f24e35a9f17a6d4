"""Export of (pruned) models to the formats devices run, with parity checks."""

from edgeprune.export.onnx import export_onnx, simplify_and_check
from edgeprune.export.openvino import onnx_to_openvino
from edgeprune.export.package import (
    FORMATS,
    TOLERANCE,
    check_parity,
    export_model,
    parity_failures,
    parity_verdict,
    parse_formats,
)
from edgeprune.export.tensorrt import onnx_to_engine

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "check_parity",
    "export_model",
    "export_onnx",
    "onnx_to_engine",
    "onnx_to_openvino",
    "parity_failures",
    "parity_verdict",
    "parse_formats",
    "simplify_and_check",
]
