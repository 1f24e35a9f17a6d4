"""Model registry: built-ins for small inputs and torchvision classifiers by name."""

from edgeprune.models.registry import BUILTINS, build_model, list_models

__all__ = ["BUILTINS", "build_model", "list_models"]
