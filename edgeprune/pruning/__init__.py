"""Structured channel pruning."""

from edgeprune.pruning.uniform import classifier_layers, prune_uniform

__all__ = ["classifier_layers", "prune_uniform"]
