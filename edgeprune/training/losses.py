"""Task-level losses for distilling a pruned network from its dense parent.

Classification: alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) *
CE(labels): the dense network supervises the pruned one (the full-network supervision of
stage-wise pruning, SP), and the labels keep it honest. Any other task: the outputs matched
(`output_matching`), which needs no labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Loss = Callable[[Any, Any, Any], torch.Tensor]  # (student_out, teacher_out, batch) -> loss


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the distillation term


def soft_targets(teacher_logits: torch.Tensor, config: DistillConfig = DistillConfig()) -> torch.Tensor:
    return F.softmax(teacher_logits / config.temperature, dim=1)


def distilled(logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels),
    given the teacher's `soft_targets`: the dense network supervises the pruned one (the
    full-network supervision of stage-wise pruning, SP), and the labels keep it honest."""
    T, alpha = config.temperature, config.alpha
    kd = F.kl_div(F.log_softmax(logits / T, dim=1), target, reduction="batchmean") * T * T
    return alpha * kd + (1 - alpha) * F.cross_entropy(logits, y) if alpha < 1 else kd


def classification_distillation(config: DistillConfig = DistillConfig()) -> Loss:
    def loss(student_out, teacher_out, batch):
        return distilled(student_out, soft_targets(teacher_out, config), batch[1], config)

    return loss


def output_matching(student_out, teacher_out, batch: Any) -> torch.Tensor:
    """Distillation for any task: each output tensor's squared error to the dense model's, relative
    to the dense output's own variance (so outputs of any scale weigh alike)."""
    from edgeprune.models.onnx import flatten_outputs

    pairs = list(zip(flatten_outputs(student_out), flatten_outputs(teacher_out)))
    losses = [F.mse_loss(s.float(), t.float()) / (t.float().var() + 1e-6) for s, t in pairs]
    return torch.stack(losses).mean()
