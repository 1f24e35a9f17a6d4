"""edgeprune: prune CNNs to a millisecond budget measured on the target device.

The public API mirrors the CLI; names are imported lazily so `import edgeprune` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "build_model": "edgeprune.models",
    "list_models": "edgeprune.models",
    "load_dataset": "edgeprune.data",
    "train": "edgeprune.training",
    "Recipe": "edgeprune.training",
    "accuracy": "edgeprune.training",
    "Checkpoint": "edgeprune.checkpoint",
    "load_checkpoint": "edgeprune.checkpoint",
    "save_checkpoint": "edgeprune.checkpoint",
    "export_onnx": "edgeprune.export",
    "run_quickstart": "edgeprune.pipeline",
    "run_pipeline": "edgeprune.pipeline",
    "finetune": "edgeprune.pipeline",
    "export_run": "edgeprune.pipeline",
    "validate": "edgeprune.pipeline",
    "profile": "edgeprune.latency.profiler",
    "EdgepruneError": "edgeprune.errors",
    "prune": "edgeprune.pipeline",
    "PruneConfig": "edgeprune.pipeline",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgeprune' has no attribute {name!r}")
