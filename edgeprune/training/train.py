"""Supervised training: SGD + cosine schedule, standard augmentation, resumable mid-epoch.

The resume file beside the output checkpoint holds model and optimizer state and the position
(epoch, batch); batch order and augmentation are functions of (seed, epoch, batch), so a resumed
run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune.checkpoint import Checkpoint, atomic_torch_save, save_checkpoint
from edgeprune.checks import POSITIVE, POSITIVE_OR_NONE, Rule, check_values
from edgeprune.data import Dataset, load_dataset
from edgeprune.errors import EdgepruneError, Interrupted
from edgeprune.progress import progress_bar
from edgeprune.training.batches import Batch, TrainData, default_input
from edgeprune.training.evaluate import accuracy

RECIPE_RULES = {
    "epochs": POSITIVE,
    "batch_size": POSITIVE,
    "lr": Rule(float, lo=0, lo_open=True),
    "momentum": Rule(float, lo=0, hi=1, hi_open=True),
    "weight_decay": Rule(float, lo=0),
    "nesterov": Rule(bool),
    "label_smoothing": Rule(float, lo=0, hi=1, hi_open=True),
    "warmup_epochs": Rule(float, lo=0),
    "seed": Rule(int, lo=0),  # numpy's and torch's generators take no negative seed
    "max_batches_per_epoch": POSITIVE_OR_NONE,
}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the result of a training run (stored in the checkpoint)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0
    max_batches_per_epoch: int | None = None  # for smoke runs on a subset

    def __post_init__(self) -> None:  # a bad value is one line here, not a NaN loss an epoch later
        for name, value in check_values(dict(self.__dict__), RECIPE_RULES, where="train").items():
            object.__setattr__(self, name, value)  # as the rule reads it: epochs=2.0 is 2

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        warm = int(self.warmup_epochs * steps_per_epoch)
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * self.lr * (1 + math.cos(math.pi * t))


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def resume_position(state_file: Path, recipe: Recipe | None = None) -> tuple[int, int] | None:
    """(epoch, batch) where an interrupted training stopped (epochs done, batches of the next), or
    None where there is no readable resume file, or (with `recipe`) one fit would refuse as written
    with another recipe (fit then starts over, or says what is wrong)."""
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if recipe is not None and state.get("recipe") != asdict(recipe):
            return None
        return int(state["epoch"]), int(state["batch"])
    except Exception:  # missing or damaged: fit says which
        return None


def sgd(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """The recipe's SGD, with no weight decay on BN/bias parameters (standard practice, and it keeps
    BN scales usable as a criterion)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)


STATUS_EVERY = 25  # batches between progress-line updates of the running loss and accuracy

# one training step's loss, and how many of the batch it predicted right (None: not a classifier)
Step = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor | None]]


def cross_entropy_step(label_smoothing: float = 0.0) -> Step:
    """Supervised classification: cross-entropy on (images, labels) batches."""
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def step(model: nn.Module, batch: Batch):
        x, y = batch
        logits = model(x)
        return ce(logits, y), (logits.argmax(1) == y).sum()

    return step


def to_device(batch: Batch, device) -> Batch:
    """A batch (tensors, or tuples, lists and dicts of them) moved to `device`."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def fit(
    model: nn.Module,
    data: Dataset | TrainData,
    recipe: Recipe,
    *,
    state_file: Path | None = None,
    step: Step | None = None,
    save_every_s: float = 120.0,
    progress: bool = True,
    description: str = "train",
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Train `model` in place following `recipe`; resumes from `state_file` when it exists.

    `step(model, batch) -> (loss, correct)` replaces cross-entropy (distillation: training/distill.py).
    With `device`, batches are moved there (the model must already be on it).
    """
    torch.manual_seed(recipe.seed)
    train = data if isinstance(data, TrainData) else TrainData(data, batch_size=recipe.batch_size)
    run = _FitRun(model, recipe, train, state_file, step or cross_entropy_step(recipe.label_smoothing), device)
    epoch, batch = run.resume()
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(description, total=run.total, completed=epoch * run.per_epoch + batch, status="")
        try:
            while epoch < recipe.epochs:
                run.epoch(epoch, batch, lambda **kw: bar.update(task, advance=1, **kw), save_every_s)
                epoch, batch = epoch + 1, 0
                if on_epoch_end is not None:  # before the state is saved: a kill in between redoes the epoch
                    on_epoch_end(epoch, model)
                run.save(epoch, 0)
        except KeyboardInterrupt:
            done = bar.tasks[0].completed
            run.save(int(done // run.per_epoch), int(done % run.per_epoch))
            kept = f"saved in {state_file}" if state_file else "not saved (no resume file)"
            raise Interrupted(f"training stopped at step {int(done)}/{run.total}, {kept}") from None
    return model


class _FitRun:
    """One `fit`: the model, its optimizer and schedule, and the resume file they are saved to."""

    def __init__(self, model, recipe: Recipe, train: TrainData, state_file: Path | None, step: Step, device) -> None:
        self.model, self.recipe, self.train, self.state_file, self.step = model, recipe, train, state_file, step
        self.device = device
        self.opt = sgd(model, recipe)
        self.per_epoch = len(train)
        if recipe.max_batches_per_epoch:
            self.per_epoch = min(self.per_epoch, recipe.max_batches_per_epoch)
        self.total = self.per_epoch * recipe.epochs
        self.last_save = time.monotonic()

    def resume(self) -> tuple[int, int]:
        """(epoch, batch) to start from: the resume file's, loaded into the model and optimizer, or (0, 0)."""
        if self.state_file is None or not self.state_file.exists():
            return 0, 0
        try:
            state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        except Exception:
            raise EdgepruneError(f"resume file {self.state_file} is damaged; delete it to start over") from None
        if state.get("recipe") != asdict(self.recipe):
            raise EdgepruneError(
                f"resume file {self.state_file} was written with a different recipe; rerun with the same options, "
                "or delete it (--restart) to start over"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        return state["epoch"], state["batch"]

    def save(self, epoch: int, batch: int) -> None:
        self.last_save = time.monotonic()
        if self.state_file is not None:
            state = {"recipe": asdict(self.recipe), "model": self.model.state_dict(), "epoch": epoch, "batch": batch}
            atomic_torch_save({**state, "optimizer": self.opt.state_dict()}, self.state_file)

    def epoch(self, epoch: int, start: int, advance: Callable, save_every_s: float) -> None:
        """Train one epoch from batch `start`, calling `advance(status=...)` after each batch and
        saving the resume file every `save_every_s`."""
        recipe, opt, device = self.recipe, self.opt, self.device
        self.model.train()
        # running sums stay on the model's device: reading them every step (.item()) would make
        # the host wait for the accelerator at each batch instead of queueing the next one
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        seen, counted = 0, True
        batches = self.train.batches(seed=recipe.seed, epoch=epoch, start=start, limit=self.per_epoch)
        for b, item in enumerate(batches, start=start):
            item = to_device(item, device)
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(epoch * self.per_epoch + b, self.total, self.per_epoch)
            loss, right = self.step(self.model, item)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(default_input(item))
            loss_sum += loss.detach() * n
            counted = counted and right is not None
            if right is not None:
                correct += right
            seen += n
            if b % STATUS_EVERY == 0 or b + 1 == self.per_epoch:
                status = f"epoch {epoch + 1}/{recipe.epochs} loss {loss_sum.item() / seen:.3f}"
                advance(status=status + (f" acc {correct.item() / seen:.3f}" if counted else ""))
            else:
                advance()
            if time.monotonic() - self.last_save > save_every_s:
                self.save(epoch, b + 1)


def train(
    *,
    model: str,
    data: str | Dataset,
    out: str | os.PathLike,
    recipe: Recipe | None = None,
    restart: bool = False,
    data_root: str | None = None,
    weights: str | None = None,
    model_kwargs: dict | None = None,
    trust_pickle: bool = False,
    progress: bool = True,
    log=None,
) -> Checkpoint:
    """Train `model` (a name, file.py:factory or package.module:factory) on `data` and write a
    checkpoint to `out`; resumes an interrupted run. With `weights` (e.g. torchvision's pretrained
    ones) training starts from them, the classifier head replaced where the data's classes differ."""
    from edgeprune.models.weights import load_model

    recipe = recipe or Recipe()
    dataset = data if isinstance(data, Dataset) else load_dataset(data, root=data_root)
    out = Path(out)
    state_file = resume_path(out)
    if restart:
        state_file.unlink(missing_ok=True)
    torch.manual_seed(recipe.seed)  # initialisation is part of the recipe
    loaded = load_model(
        model,
        weights,
        model_kwargs=model_kwargs,
        num_classes=dataset.num_classes,
        in_channels=dataset.input_shape[0],
        trust_pickle=trust_pickle,
        log=log,
    )
    net = loaded.model
    check_input(net, (1, *dataset.input_shape), where=f"{loaded.ref.name} on {dataset.name}")
    started = time.monotonic()
    fit(net, dataset, recipe, state_file=state_file, progress=progress, description=f"train {loaded.ref.id}")
    meta = {
        "recipe": asdict(recipe),
        "initial_weights": loaded.source,
        "data_options": dataset.options,
        "test_accuracy": accuracy(net, dataset, "test"),
        "heldout_accuracy": accuracy(net, dataset, "heldout"),
        "train_seconds_this_session": round(time.monotonic() - started, 1),
        "threads": torch.get_num_threads(),
    }
    ckpt = Checkpoint(
        loaded.ref.name, dataset.num_classes, dataset.input_shape, dataset.name, net.state_dict(), meta, ref=loaded.ref
    )
    save_checkpoint(ckpt, out)
    state_file.unlink(missing_ok=True)
    return ckpt


def check_input(model: nn.Module, shape: tuple[int, ...], *, where: str) -> None:
    """One forward pass at `shape`: a model that cannot take the data's images says so in one line."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*shape))
    except Exception as e:
        raise EdgepruneError(
            f"{where}: the model cannot take inputs of shape {list(shape)} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:140]}); check the input size, channels and model arguments"
        ) from None
