"""Inference runtimes behind one interface."""

from edgeprune.backends.base import Backend
from edgeprune.backends.onnxruntime import OnnxRuntimeBackend

__all__ = ["Backend", "OnnxRuntimeBackend"]
