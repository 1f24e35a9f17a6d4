"""Training, evaluation and BatchNorm recalibration."""

from edgeprune.training.evaluate import accuracy, recalibrate_bn
from edgeprune.training.train import Recipe, fit, train

__all__ = ["Recipe", "accuracy", "fit", "recalibrate_bn", "train"]
