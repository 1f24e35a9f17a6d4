"""The pipeline's stages (prune, finetune, export, validate) and `run`, which chains them."""

from edgeprune.pipeline.export import export_run
from edgeprune.pipeline.finetune import finetune
from edgeprune.pipeline.prune import PruneConfig, prune
from edgeprune.pipeline.run import QUICKSTART, run_pipeline
from edgeprune.pipeline.validate import validate


def run_quickstart(**kwargs) -> dict:
    """The built-in quickstart: shipped resnet20, Fashion-MNIST, ONNX Runtime, half the dense latency."""
    return run_pipeline(None, **kwargs)


__all__ = [
    "QUICKSTART",
    "PruneConfig",
    "export_run",
    "finetune",
    "prune",
    "run_pipeline",
    "run_quickstart",
    "validate",
]
