"""The formats devices run (ONNX, OpenVINO IR, TensorRT engine, and int8 ONNX / IR), written and
checked against PyTorch; the `export` stage (edgeprune/pipeline/export.py) uses them."""

from edgeprune.formats.onnx import export_onnx, simplify_and_check
from edgeprune.formats.openvino import onnx_to_openvino
from edgeprune.formats.package import (
    FORMATS,
    TOLERANCE,
    calibration_inputs,
    check_parity,
    export_model,
    parity_failures,
    parity_verdict,
    parse_formats,
)
from edgeprune.formats.quantize import is_quantized, quantize_int8
from edgeprune.formats.tensorrt import onnx_to_engine

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "calibration_inputs",
    "check_parity",
    "export_model",
    "export_onnx",
    "is_quantized",
    "onnx_to_engine",
    "onnx_to_openvino",
    "parity_failures",
    "parity_verdict",
    "parse_formats",
    "quantize_int8",
    "simplify_and_check",
]
