"""A one-shot width supernet as the accuracy proxy (SP, "stage-wise channel pruning").

The BN-recalibration proxy scores a plan on weights trained for the dense network only; the
distilled-steps proxy trains every candidate a little, at a cost per candidate. A supernet pays
once: a copy of the dense model is trained so that every width the space allows works with
shared weights, and a candidate is then scored at the BN proxy's cost, on those weights
(`SupernetEvaluator`: slice the supernet by the plan, recalibrate BatchNorm, score).

Training runs the unpruned weights with channel masks (edgeprune/pruning/masks.py: a masked
forward computes what the pruned model computes, and the masks keep the channels the plan would
keep, chosen by the criterion on the dense model), so slicing the trained supernet by a plan
gives exactly the sub-network that was trained. Each SGD step follows the sandwich rule (SP v2,
BigNAS): the full width, the smallest width and `widths_per_step` random widths (each group's
keep-count drawn uniformly from its allowed counts), every one distilled from the frozen dense
model's outputs with the task's loss (SP's full-net supervision), the gradients of the sandwich
accumulated, then one optimizer step. The full and the smallest widths every step train every
channel fairly: the widest ones through the full net, the first ones through the tiny net.

Stage-wise: the variable groups are split, in the order the network runs them, into `stages`
contiguous chunks, and the step budget into as many equal parts. In stage s the widths of the
groups of stages 0..s are sampled and the later ones stay full. Cumulative, not stage s alone:
a search prunes every group at once, so the weights of a stage must learn to work on inputs
that earlier stages have already pruned; sampling stage s alone would train the last stage only
on full-width inputs, which no plan feeds it. The order (earliest first) starts with the
groups whose pruning every later layer sees, and ends on the whole space, so the final steps,
at the lowest learning rate of one cosine schedule over the budget, train the distribution the
search samples from.

A trained supernet is saved (atomically) with a key: the dense weights' hash, the groups, the
criterion, the training settings and the data. A resumed run whose key matches loads it instead
of training again; any change trains a new one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.checkpoint import atomic_torch_save, state_hash
from edgeprune.checks import POSITIVE, Rule, check_values
from edgeprune.errors import EdgepruneError
from edgeprune.progress import progress_bar
from edgeprune.pruning.masks import ChannelMasks
from edgeprune.pruning.space import PrunableSpace
from edgeprune.search.proxy import ProxyEvaluator
from edgeprune.training.evaluate import recalibrate_bn_on
from edgeprune.training.train import Recipe, sgd, to_device

FORMAT = "edgeprune.supernet"
FORMAT_VERSION = 1

# each setting's rule, under the name SupernetEvaluator's keyword gives it (what an error names)
SETTING_RULES = {
    "supernet_steps": POSITIVE,
    "supernet_lr": Rule(float, lo=0, lo_open=True),
    "widths_per_step": Rule(int, lo=0),
    "stages": POSITIVE,
    "seed": Rule(int, lo=0),
}
KEYWORDS = {"steps": "supernet_steps", "lr": "supernet_lr"}


@dataclass(frozen=True)
class SupernetSettings:
    """What decides a trained supernet (part of its key).

    steps: SGD steps in all (one batch each, the whole sandwich on it), split equally over the stages.
    lr: the peak learning rate of one cosine schedule over all steps (the recipe's SGD, nesterov).
    widths_per_step: random widths per step besides the full and the smallest ones.
    stages: contiguous chunks of the variable groups, in network order (1: plain one-shot training).
    seed: the order of the batches and the random widths.
    """

    steps: int = 300
    lr: float = 0.05
    widths_per_step: int = 2
    stages: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        given = {KEYWORDS.get(k, k): v for k, v in self.__dict__.items()}
        fields = {v: k for k, v in KEYWORDS.items()}
        for name, value in check_values(given, SETTING_RULES, where="supernet", as_flag=False).items():
            object.__setattr__(self, fields.get(name, name), value)

    def stage_at(self, step: int, stages: int) -> int:
        """The stage that training step `step` belongs to (equal shares of the budget)."""
        return min(step * stages // self.steps, stages - 1)


def network_order(space: PrunableSpace, groups: Sequence[int]) -> list[int]:
    """`groups` in the order their root layers first run in a forward pass (group indices follow
    the dependency graph, not the network: resnet20's layer3 shortcut is group 0)."""
    modules = dict(space.base.named_modules())
    first: dict[int, int] = {}
    handles = []
    for g in groups:
        hook = _first_call(first, g)
        handles.append(modules[space.groups[g].root].register_forward_hook(hook))
    try:
        with torch.no_grad():
            space.base.eval()(torch.randn(*space.input_shape))
    finally:
        for h in handles:
            h.remove()
    return sorted(groups, key=lambda g: (first.get(g, len(first)), g))


def _first_call(first: dict[int, int], g: int) -> Callable:
    def hook(module, args, output) -> None:
        first.setdefault(g, len(first))

    return hook


def split_stages(order: Sequence[int], stages: int) -> list[list[int]]:
    """`order` cut into `stages` contiguous chunks of near-equal size (fewer where there are fewer groups)."""
    chunks = np.array_split(np.asarray(order, dtype=int), min(stages, len(order)))
    return [[int(g) for g in c] for c in chunks]


class WidthSampler:
    """The sandwich of one step: channel masks of the full, the smallest and random widths of the
    active groups (the other groups stay full: no mask)."""

    def __init__(self, masks: ChannelMasks, seed: int) -> None:
        self.masks = masks
        self.rng = np.random.default_rng(seed)

    def sandwich(self, active: Sequence[int], n: int) -> list[dict[int, torch.Tensor]]:
        full: dict[int, torch.Tensor] = {}
        smallest = {g: self.masks.keep_matrix(g)[0] for g in active}
        rand = [self.random(active) for _ in range(n)]
        return [full, smallest, *rand]

    def random(self, active: Sequence[int]) -> dict[int, torch.Tensor]:
        out = {}
        for g in active:
            rows = self.masks.keep_matrix(g)
            out[g] = rows[int(self.rng.integers(len(rows)))]
        return out


class Supernet:
    """A copy of the dense model trained as a width supernet of `space` (see the module's docstring);
    `model` holds its weights, to be sliced by plans of the space."""

    def __init__(
        self,
        space: PrunableSpace,
        task,
        settings: SupernetSettings = SupernetSettings(),
        *,
        criterion: str = "l2",
        device: str = "cpu",
    ) -> None:
        refuse_depth(space)
        variable = [g.index for g in space.groups if g.prunable]
        if not variable:
            raise EdgepruneError("the supernet proxy needs a prunable channel group; this space has none")
        self.space, self.task, self.settings = space, task, settings
        self.criterion, self.device = criterion, device
        self.masks = ChannelMasks(space, groups=variable, criterion=criterion)
        self.stages = split_stages(network_order(space, variable), settings.stages)
        self.model = copy.deepcopy(space.base).eval()
        self.seconds = 0.0  # training time spent here (0 where loaded)

    def key(self) -> str:
        """What the trained weights depend on: dense weights, groups, criterion, settings, data."""
        data = self.task.dataset
        blob = {
            "format": FORMAT_VERSION,
            "dense": state_hash(self.space.base.state_dict()),
            "groups": [[g.root, g.width, g.allowed] for g in self.space.groups],
            "criterion": self.criterion,
            "settings": asdict(self.settings),
            "data": [getattr(data, "name", None), getattr(data, "options", None), self.task.train.batch_size],
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def ready(
        self, path: str | Path | None = None, *, progress: bool = False, log: Callable[[str], None] | None = None
    ) -> Supernet:
        """Load the supernet from `path` where its key matches, else train it (and save it there)."""
        log = log or (lambda line: None)
        key = self.key()
        if path is not None and self.load(path, key):
            log(f"supernet: loaded from {path} (key {key})")
            return self
        self.train(progress=progress)
        log(f"supernet: {self.settings.steps} steps in {len(self.stages)} stages trained in {self.seconds:.0f} s")
        if path is not None:
            self.save(path, key)
        return self

    def load(self, path: str | Path, key: str) -> bool:
        """Whether `path` held this supernet (its key) and its weights are now in `model`."""
        try:
            saved = torch.load(Path(path), map_location="cpu", weights_only=True)
            if saved.get("format") != FORMAT or saved.get("key") != key:
                return False
            self.model.load_state_dict(saved["state_dict"])
        except Exception:  # missing, damaged or of another format: train again
            return False
        self.model.eval()
        return True

    def save(self, path: str | Path, key: str) -> None:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        blob = {"format": FORMAT, "key": key, "settings": asdict(self.settings), "seconds": self.seconds}
        atomic_torch_save({**blob, "state_dict": state}, Path(path))

    def train(self, *, progress: bool = False) -> None:
        """`settings.steps` sandwich steps, stage by stage, one cosine schedule over all of them."""
        cfg, stages = self.settings, self.stages
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = self.model.to(self.device).train()
        teacher = self._teacher()
        recipe = Recipe(epochs=1, lr=cfg.lr)
        opt = sgd(model, recipe)
        sampler = WidthSampler(self.masks, cfg.seed)
        batches = self._batches()
        with progress_bar(enabled=progress) as bar:
            bar_id = bar.add_task("supernet", total=cfg.steps, status="")
            for step in range(cfg.steps):
                stage = cfg.stage_at(step, len(stages))
                active = [g for chunk in stages[: stage + 1] for g in chunk]
                for group in opt.param_groups:
                    group["lr"] = recipe.lr_at(step, cfg.steps, cfg.steps)
                opt.zero_grad(set_to_none=True)
                loss = self._sandwich(model, teacher, next(batches), sampler.sandwich(active, cfg.widths_per_step))
                opt.step()
                bar.update(bar_id, advance=1, status=f"stage {stage + 1}/{len(stages)} loss {loss:.3f}")
        self.model = model.cpu().eval()  # plans apply on the CPU, as to the dense base; compute moves the copy
        self.seconds = time.perf_counter() - t0

    def _sandwich(self, model: nn.Module, teacher: nn.Module, batch, widths: list[dict[int, torch.Tensor]]) -> float:
        """Gradients of every width's distillation loss on `batch`, accumulated (their mean); the mean loss."""
        batch = to_device(batch, self.device)
        x = self.task.input_of(batch)
        with torch.no_grad():
            target = teacher(x)
        total = 0.0
        for masks in widths:
            with self.masks.applied(model, masks):
                loss = self.task.loss(model(x), target, batch) / len(widths)
            loss.backward()
            total += float(loss.detach())
        return total

    def _teacher(self) -> nn.Module:
        """The frozen dense model, where the supernet trains."""
        base = self.space.base.eval()
        if torch.device(self.device) == next(base.parameters()).device:
            return base
        return copy.deepcopy(base).to(self.device).eval()

    def _batches(self) -> Iterator:
        """The task's training batches, epoch after epoch, in the seed's order."""
        epoch = 0
        while True:
            seen = 0
            for batch in self.task.train.batches(seed=self.settings.seed, epoch=epoch):
                seen += 1
                yield batch
            if not seen:
                raise EdgepruneError("the task has no training batches to train the supernet on")
            epoch += 1


def refuse_depth(space: PrunableSpace) -> None:
    """A plan removing residual blocks is not a width of the supernet: one line saying so."""
    if space.depth or any(g.allowed[0] == 0 for g in space.groups):
        raise EdgepruneError(
            "the supernet proxy scores widths only, not plans that remove residual blocks: "
            "search without --depth, or use the BN-recalibration or distilled-steps proxy"
        )


class SupernetEvaluator(ProxyEvaluator):
    """The proxy on the supernet's weights: slice the trained supernet by the plan (its channels are
    the criterion's on the dense model, the ones the masks trained), train `train_steps` where
    asked, recalibrate BatchNorm (the supernet's running statistics mix every width), score.

    Takes ProxyEvaluator's arguments, plus the supernet's: `supernet_steps`, `supernet_lr`,
    `widths_per_step`, `stages` (SupernetSettings; `seed` is shared), `state_path` (where the
    trained supernet is saved and found again), `progress` and `log`. The supernet is trained (or
    loaded) here, in the constructor; `supernet_seconds` is what training took (0 where loaded).
    Scores on this process only: Ray workers (`pool`) build the plain proxy from the dense model.
    """

    def __init__(
        self,
        space: PrunableSpace,
        task,
        *,
        criterion: str = "l2",
        calibration_batches: int = 10,
        seed: int = 0,
        train_steps: int = 0,
        train_lr: float = 0.05,
        as_run=None,
        device: str = "cpu",
        supernet_steps: int = 300,
        supernet_lr: float = 0.05,
        widths_per_step: int = 2,
        stages: int = 3,
        state_path: str | Path | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        refuse_depth(space)
        settings = SupernetSettings(
            steps=supernet_steps, lr=supernet_lr, widths_per_step=widths_per_step, stages=stages, seed=seed
        )
        super().__init__(
            space,
            task,
            criterion=criterion,
            calibration_batches=calibration_batches,
            seed=seed,
            train_steps=train_steps,
            train_lr=train_lr,
            as_run=as_run,
            device=device,
        )
        self.supernet = Supernet(space, task, settings, criterion=criterion, device=device)
        self.supernet.ready(state_path, progress=progress, log=log)
        self.supernet_seconds = self.supernet.seconds

    @property
    def pool(self):
        return None

    @pool.setter
    def pool(self, value) -> None:
        if value is None:
            return
        close = getattr(value, "close", None)
        if close is not None:
            close()
        raise EdgepruneError(
            "the supernet proxy scores in this process only (Ray workers score the BN proxy): run without a cluster"
        )

    @torch.no_grad()
    def compute(self, plan) -> float:
        """Score `plan` (no cache): the supernet pruned to it, trained where asked, BN recalibrated."""
        model = plan.apply(self.supernet.model).to(self.device)
        if self.train_batches:
            with torch.enable_grad():
                self._train(model)
        recalibrate_bn_on(model, (to_device(x, self.device) for x in self.calibration))
        return self.score(model)
