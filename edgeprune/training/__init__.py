"""Training, evaluation, BatchNorm recalibration and distillation."""

from edgeprune.training.distill import DistillConfig, distillation_loss, finetune_checkpoint
from edgeprune.training.evaluate import accuracy, recalibrate_bn, recalibrate_bn_on
from edgeprune.training.train import Recipe, fit, resume_path, resume_position, train

__all__ = [
    "DistillConfig",
    "Recipe",
    "accuracy",
    "distillation_loss",
    "finetune_checkpoint",
    "fit",
    "recalibrate_bn",
    "recalibrate_bn_on",
    "resume_path",
    "resume_position",
    "train",
]
