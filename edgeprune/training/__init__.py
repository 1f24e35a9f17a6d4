"""Training, evaluation, BatchNorm recalibration and distillation."""

from edgeprune.training.batches import TrainData, default_input
from edgeprune.training.distill import CheckpointStore, FinetuneResult, FinetuneStore, finetune_model
from edgeprune.training.evaluate import accuracy, recalibrate_bn, recalibrate_bn_on
from edgeprune.training.losses import DistillConfig, distilled, output_matching, soft_targets
from edgeprune.training.train import Recipe, check_input, fit, resume_path, resume_position, train

__all__ = [
    "CheckpointStore",
    "DistillConfig",
    "FinetuneResult",
    "FinetuneStore",
    "Recipe",
    "TrainData",
    "accuracy",
    "check_input",
    "default_input",
    "distilled",
    "finetune_model",
    "fit",
    "output_matching",
    "recalibrate_bn",
    "recalibrate_bn_on",
    "resume_path",
    "resume_position",
    "soft_targets",
    "train",
]
