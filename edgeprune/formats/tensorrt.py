"""ONNX -> serialized TensorRT engine (fp16 or fp32), built where TensorRT runs."""

from __future__ import annotations

import os
from pathlib import Path


def onnx_to_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp16") -> Path:
    """Build and write the engine. An engine only runs on the GPU model and TensorRT version that
    built it: build it on the target (or one like it). Where TensorRT is missing this raises the
    backend's one-line error saying what to install and where."""
    from edgeprune.backends import TensorRtBackend

    engine = TensorRtBackend(precision=precision).build_engine(onnx_path)
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(engine)
    return engine_path
