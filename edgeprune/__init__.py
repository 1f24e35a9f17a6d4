"""edgeprune: prune CNNs to a millisecond budget measured on the target device.

The public API mirrors the CLI; names are imported lazily so `import edgeprune` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    # the used-by line, model in / model out
    "profile": "edgeprune.latency.profiler",
    "predict": "edgeprune.latency.check",
    "prune": "edgeprune.pipeline",
    "finetune": "edgeprune.pipeline",
    "export": "edgeprune.pipeline",
    "validate": "edgeprune.pipeline",
    "restore": "edgeprune.checkpoint",
    # what they take and give
    "Budget": "edgeprune.search.budget",
    "PruneSettings": "edgeprune.pipeline",
    "PruneResult": "edgeprune.pipeline",
    "Task": "edgeprune.task",
    "LatencyTable": "edgeprune.latency.table",
    "Device": "edgeprune.devices",
    "ModelRef": "edgeprune.models.reference",
    "load_model": "edgeprune.models.weights",
    # run folders, the CLI's face of the same functions
    "prune_run": "edgeprune.pipeline",
    "finetune_run": "edgeprune.pipeline",
    "export_run": "edgeprune.pipeline",
    "validate_run": "edgeprune.pipeline",
    "run_quickstart": "edgeprune.pipeline",
    "run_pipeline": "edgeprune.pipeline",
    # models, data, training
    "build_model": "edgeprune.models",
    "list_models": "edgeprune.models",
    "load_dataset": "edgeprune.data",
    "train": "edgeprune.training",
    "Recipe": "edgeprune.training",
    "accuracy": "edgeprune.training",
    "Checkpoint": "edgeprune.checkpoint",
    "load_checkpoint": "edgeprune.checkpoint",
    "save_checkpoint": "edgeprune.checkpoint",
    "export_onnx": "edgeprune.models.onnx",
    "EdgepruneError": "edgeprune.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgeprune' has no attribute {name!r}")
