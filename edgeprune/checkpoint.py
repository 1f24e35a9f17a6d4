"""Checkpoints: a state dict plus the metadata needed to rebuild and trust it.

Never a pickled module: loading uses ``torch.load(weights_only=True)`` and rebuilds the
architecture from its reference (a name, the user's `file.py:factory` with its arguments, ...:
see models/reference.py) and, for a pruned model, its plan.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.models.reference import ModelRef

FORMAT = "edgeprune.checkpoint"
FORMAT_VERSION = 2  # 2: the model reference (factory, arguments, head) beside the name


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """The weights' identity (names and values): what ties a run folder's files to its model."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    from edgeprune import __version__

    return {
        "edgeprune": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


@dataclass
class Checkpoint:
    model: str  # the reference's name (a registry name, or file.py:factory, ...)
    num_classes: int | None
    input_shape: tuple[int, ...]  # one sample's shape, without the batch dimension
    dataset: str | None  # the data set's name, where it has one (None: the user's own data)
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # set for pruned models
    ref: ModelRef | None = None  # default: the registry name with these classes and input channels

    def __post_init__(self) -> None:
        if self.ref is None:
            self.ref = ModelRef(self.model, num_classes=self.num_classes, in_channels=self.input_shape[0])
        self.model = self.ref.name

    def build(self, *, trust_pickle: bool = False) -> nn.Module:
        """The model with these weights, in eval mode (built from its reference)."""
        return self.restore(self.ref.build(trust_pickle=trust_pickle), inplace=True)

    def restore(self, base: nn.Module, *, inplace: bool = False) -> nn.Module:
        """These weights on `base`, the dense model (built by the caller where edgeprune cannot
        build it: a model passed in Python), pruned by the plan first where there is one."""
        model = base.eval()
        if self.plan is not None:
            from edgeprune.pruning.plan import Plan

            model = Plan.from_dict(self.plan).apply(model, inplace=inplace)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise EdgepruneError(f"checkpoint weights do not fit model {self.model!r}: {first}") from None
        return model.eval()

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The input shape with a batch of one."""
        return (1, *self.input_shape)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write `obj` to `path` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(), **ckpt.meta}
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **asdict(ckpt), "meta": meta}
    payload["ref"] = ckpt.ref.to_dict()
    payload["input_shape"] = list(ckpt.input_shape)
    payload["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()}
    atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"checkpoint {path} does not exist; train one with `edgeprune train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise EdgepruneError(f"checkpoint {path} is corrupt or not an edgeprune checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EdgepruneError(
            f"{path} is not an edgeprune checkpoint (no '{FORMAT}' header); a plain state dict loads with "
            "--model NAME --weights FILE"
        )
    return checkpoint_from_payload(payload, path)


def checkpoint_from_payload(payload: dict, path) -> Checkpoint:
    """A Checkpoint from what `torch.load` read (format 1, from before model references, too)."""
    if payload.get("version", 0) > FORMAT_VERSION:
        raise EdgepruneError(f"{path} was written by a newer edgeprune (format {payload['version']}); upgrade")
    classes = payload.get("num_classes")
    return Checkpoint(
        model=payload["model"],
        num_classes=None if classes is None else int(classes),
        input_shape=tuple(payload["input_shape"]),
        dataset=payload.get("dataset"),
        state_dict=payload["state_dict"],
        meta=payload.get("meta", {}),
        plan=payload.get("plan"),
        ref=ModelRef.from_dict(payload["ref"]) if payload.get("ref") else None,
    )


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The checkpoint at `path` (a pruned or finetuned one) restored onto `model`, its dense base as
    the caller builds it: `restore(MyNet(), "runs/x/finetuned.pt")` (ModelOpt's `restore` pattern)."""
    return load_checkpoint(path).restore(model)
