"""Finetuning a pruned network distilled from its dense parent, for any task.

Training is `fit` (cosine schedule, resumable mid-epoch) with the task's distillation loss
(`loss(student_out, teacher_out, batch)`); after every epoch the task's held-out score is taken
and the best epoch's weights are kept. Where they are kept is a `FinetuneStore`: in memory for a
model passed in Python, or a run folder's checkpoint (`CheckpointStore`), which makes an
interrupted finetune resumable.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgeprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgeprune.training.losses import DistillConfig
from edgeprune.training.train import Recipe, Step, fit, resume_path


def distillation_step(teacher: nn.Module, task) -> Step:
    """One step of the task's distillation: the dense model's outputs on the batch as the target."""
    teacher.eval()

    def step(model: nn.Module, batch):
        x = task.input_of(batch)
        with torch.no_grad():
            target = teacher(x)
        out = model(x)
        right = None
        if task.classification and isinstance(out, torch.Tensor):
            right = (out.argmax(1) == batch[1]).sum()
        return task.loss(out, target, batch), right

    return step


@dataclass
class FinetuneResult:
    model: nn.Module  # the best epoch's weights, in eval mode
    history: list[dict]  # {"epoch", "score"} per epoch, 0 = before finetuning
    best_epoch: int
    score: float  # the best held-out score
    recipe: dict = field(default_factory=dict)
    qat: dict | None = None  # what a quantization-aware finetune after it found (pipeline/qat.py)


class FinetuneStore:
    """Where a finetune keeps its best weights and history: here, in memory."""

    state_file: Path | None = None

    def __init__(self) -> None:
        self.best: dict | None = None
        self.history: list[dict] = []
        self.best_epoch = 0

    def load(self, model: nn.Module) -> bool:
        """Restore the best weights kept so far into `model`; whether there were any."""
        if self.best is None:
            return False
        model.load_state_dict(self.best)
        return True

    def keep(self, model: nn.Module, epoch: int) -> None:
        self.best = copy.deepcopy(model.state_dict())
        self.best_epoch = epoch

    def record(self) -> None:
        """The history changed, the best weights did not."""

    def finish(self, model: nn.Module, meta: dict) -> None:
        """The finetune is done: `model` holds the best weights."""


class CheckpointStore(FinetuneStore):
    """A run folder's `finetuned.pt` (an edgeprune checkpoint shaped like `like`, the pruned one):
    always the best epoch so far, its history in the metadata, `finished` once done; the position
    of an interrupted finetune in `finetuned.pt.resume`."""

    def __init__(self, path: str | os.PathLike, like: Checkpoint, recipe: Recipe, distill: DistillConfig) -> None:
        super().__init__()
        self.path, self.like, self.recipe, self.distill = Path(path), like, recipe, distill
        self.state_file = resume_path(self.path)
        if self.path.is_file():
            meta = load_checkpoint(self.path).meta
            self.history, self.best_epoch = meta.get("history", []), meta.get("best_epoch", 0)

    def load(self, model: nn.Module) -> bool:
        if not self.path.is_file():
            return False
        model.load_state_dict(load_checkpoint(self.path).state_dict)
        return True

    def keep(self, model: nn.Module, epoch: int) -> None:
        self.best_epoch = epoch
        self._save(model.state_dict(), {})

    def record(self) -> None:
        kept = load_checkpoint(self.path)
        self._save(kept.state_dict, kept.meta)

    def finish(self, model: nn.Module, meta: dict) -> None:
        self._save(model.state_dict(), {**meta, "finished": True})

    def finished(self) -> Checkpoint | None:
        if self.path.is_file() and (done := load_checkpoint(self.path)).meta.get("finished"):
            return done
        return None

    def _save(self, state: dict, extra: dict) -> None:
        drop = ("history", "test_accuracy", "heldout_accuracy", "test_score", "heldout_score", "finished")
        meta = {
            **{k: v for k, v in self.like.meta.items() if k not in drop},
            **extra,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "finetune_recipe": asdict(self.recipe),
            "distillation": asdict(self.distill),
        }
        state = {k: v.detach().cpu() for k, v in state.items()}
        like = self.like
        save_checkpoint(
            Checkpoint(like.model, like.num_classes, like.input_shape, like.dataset, state, meta, like.plan, like.ref),
            self.path,
        )


def finetune_model(
    student: nn.Module,
    *,
    teacher: nn.Module,
    task,
    recipe: Recipe,
    store: FinetuneStore | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FinetuneResult:
    """Finetune `student` distilled from `teacher` on the task's training batches; keeps the epoch
    with the best held-out score. A store that holds an interrupted finetune resumes it."""
    store = store or FinetuneStore()
    device = torch.device(device)
    model = student.to(device)
    teacher = teacher.to(device)
    if not store.history:
        store.history.append({"epoch": 0, "score": task.score(model)})
        store.keep(model, 0)

    def keep_best(epoch: int, net: nn.Module) -> None:
        score = task.score(net)
        store.history[:] = [h for h in store.history if h["epoch"] < epoch]  # an epoch redone after a kill
        best = max(h["score"] for h in store.history)
        store.history.append({"epoch": epoch, "score": score})
        if score >= best:
            store.keep(net, epoch)
        else:
            store.record()
        net.train()

    fit(
        model,
        task.train,
        recipe,
        state_file=store.state_file,
        step=distillation_step(teacher, task),
        progress=progress,
        description="finetune (distilled)",
        on_epoch_end=keep_best,
        device=device,
    )
    if store.state_file is not None:
        store.state_file.unlink(missing_ok=True)
    store.load(model)
    model.eval()
    best = max(h["score"] for h in store.history)
    return FinetuneResult(model, store.history, store.best_epoch, best, asdict(recipe))
