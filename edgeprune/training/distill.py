"""Finetuning a pruned network with knowledge distillation from its dense parent.

The loss is alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels):
the dense network supervises the pruned one (the full-network supervision of stage-wise pruning,
SP), and the labels keep it honest. Training is `fit` (cosine schedule, resumable mid-epoch);
after every epoch the held-out accuracy is measured and the best epoch's weights are kept.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgeprune.data import Dataset
from edgeprune.errors import EdgepruneError
from edgeprune.training.evaluate import accuracy
from edgeprune.training.train import Recipe, fit


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the distillation term


def soft_targets(teacher_logits: torch.Tensor, config: DistillConfig = DistillConfig()) -> torch.Tensor:
    return F.softmax(teacher_logits / config.temperature, dim=1)


def distilled(logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """The loss above, given the teacher's `soft_targets` (they can be computed once and kept)."""
    T, alpha = config.temperature, config.alpha
    kd = F.kl_div(F.log_softmax(logits / T, dim=1), target, reduction="batchmean") * T * T
    return alpha * kd + (1 - alpha) * F.cross_entropy(logits, y) if alpha < 1 else kd


def distillation_loss(teacher: nn.Module, config: DistillConfig = DistillConfig()):
    teacher.eval()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = soft_targets(teacher(x), config)
        return distilled(logits, target, y, config)

    return loss


def finetune_checkpoint(
    *,
    student: Checkpoint,
    teacher: Checkpoint,
    data: Dataset,
    out: str | os.PathLike,
    recipe: Recipe,
    distill: DistillConfig = DistillConfig(),
    heldout_limit: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Checkpoint:
    """Finetune `student` (a pruned checkpoint) distilled from `teacher`; writes the best epoch to `out`.

    Resumable: a `.resume` file beside `out` holds the position; `out` always holds the best epoch
    so far (by held-out accuracy), with the per-epoch history in its metadata."""
    out = Path(out)
    state_file = out.with_name(out.name + ".resume")
    history = []
    if out.is_file():
        previous = load_checkpoint(out)
        if previous.meta.get("finished"):
            return previous
        history = previous.meta.get("history", [])
    device = torch.device(device)
    model = student.build().to(device)
    teach = teacher.build().to(device)
    if not history:
        history.append(
            {"epoch": 0, "heldout_accuracy": accuracy(model, data, "heldout", limit=heldout_limit, device=device)}
        )

    def keep_best(epoch: int, net: nn.Module) -> None:
        acc = accuracy(net, data, "heldout", limit=heldout_limit, device=device)
        history[:] = [h for h in history if h["epoch"] < epoch]  # an epoch redone after a kill replaces itself
        best = max(h["heldout_accuracy"] for h in history)
        history.append({"epoch": epoch, "heldout_accuracy": acc})
        if acc >= best or not out.is_file():
            _save(net, student, out, history, recipe, distill, best_epoch=epoch)
        else:  # keep the best weights, record the epoch
            kept = load_checkpoint(out)
            kept.meta["history"] = history
            save_checkpoint(kept, out)
        net.train()

    if not out.is_file():
        _save(model, student, out, history, recipe, distill, best_epoch=0)
    fit(
        model,
        data,
        recipe,
        state_file=state_file,
        loss_fn=distillation_loss(teach, distill),
        progress=progress,
        description="finetune (distilled)",
        on_epoch_end=keep_best,
        device=device,
    )
    state_file.unlink(missing_ok=True)
    best = load_checkpoint(out)
    net = best.build().to(device)
    best.meta["test_accuracy"] = accuracy(net, data, "test", device=device)
    best.meta["heldout_accuracy"] = max(h["heldout_accuracy"] for h in history)
    best.meta["teacher_test_accuracy"] = teacher.meta.get("test_accuracy")
    best.meta["finished"] = True
    save_checkpoint(best, out)
    return best


def _save(net, student: Checkpoint, out: Path, history, recipe: Recipe, distill: DistillConfig, *, best_epoch: int):
    if student.plan is None:
        raise EdgepruneError("finetune expects a pruned checkpoint (one with a plan)")
    meta = {
        **{k: v for k, v in student.meta.items() if k not in ("history", "test_accuracy", "heldout_accuracy")},
        "history": history,
        "best_epoch": best_epoch,
        "finetune_recipe": asdict(recipe),
        "distillation": asdict(distill),
    }
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_checkpoint(
        Checkpoint(student.model, student.num_classes, student.input_shape, student.dataset, state, meta, student.plan),
        out,
    )
