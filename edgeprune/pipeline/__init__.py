"""The pipeline's stages, model in / model out (prune, finetune, export, validate), their run-folder
faces (prune_run, finetune_run, export_run, validate_run: what the CLI calls), and `run`, which
chains them."""

from edgeprune.pipeline.export import export, export_run
from edgeprune.pipeline.finetune import finetune, finetune_run
from edgeprune.pipeline.prune import PruneResult, prune, prune_run
from edgeprune.pipeline.run import QUICKSTART, run_pipeline
from edgeprune.pipeline.settings import PruneSettings
from edgeprune.pipeline.validate import validate, validate_run


def run_quickstart(**kwargs) -> dict:
    """The built-in quickstart: shipped resnet20, Fashion-MNIST, ONNX Runtime, half the dense latency."""
    return run_pipeline(None, **kwargs)


__all__ = [
    "QUICKSTART",
    "PruneResult",
    "PruneSettings",
    "export",
    "export_run",
    "finetune",
    "finetune_run",
    "prune",
    "prune_run",
    "run_pipeline",
    "run_quickstart",
    "validate",
    "validate_run",
]
