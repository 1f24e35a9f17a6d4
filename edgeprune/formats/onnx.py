"""PyTorch -> ONNX for shipping: the conversion lives in edgeprune.models.onnx (the latency side
uses it too); shipping adds simplification and the checker."""

from edgeprune.models.onnx import DEFAULT_OPSET, export_onnx, flatten_outputs, output_names, simplify_and_check

__all__ = ["DEFAULT_OPSET", "export_onnx", "flatten_outputs", "output_names", "simplify_and_check"]
