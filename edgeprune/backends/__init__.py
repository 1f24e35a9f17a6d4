"""Inference runtimes behind one interface."""

from __future__ import annotations

import inspect

from edgeprune.backends.base import Backend
from edgeprune.backends.onnxruntime import OnnxRuntimeBackend
from edgeprune.backends.openvino import OpenVinoBackend
from edgeprune.backends.tensorrt import TensorRtBackend
from edgeprune.errors import EdgepruneError, choices_error

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (OnnxRuntimeBackend, OpenVinoBackend, TensorRtBackend)}


def make_backend(name: str, **options) -> Backend:
    """A runtime by name with the profile's options; clear errors for unknown names/options."""
    if name not in BACKENDS:
        raise choices_error("backend", name, list(BACKENDS))
    cls = BACKENDS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = set(options) - set(params)
    if unknown:
        raise EdgepruneError(f"{name} does not take option(s) {sorted(unknown)}; it takes: {', '.join(params)}")
    if name != "tensorrt" and not cls.available():
        raise EdgepruneError(f"{name} is not installed here: pip install {cls.package}")
    return cls(**options)


__all__ = ["BACKENDS", "Backend", "OnnxRuntimeBackend", "OpenVinoBackend", "TensorRtBackend", "make_backend"]
