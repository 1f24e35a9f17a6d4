"""Export of (pruned) models to the formats devices run."""

from edgeprune.export.onnx import export_onnx

__all__ = ["export_onnx"]
