"""Checkpoints: a state dict plus the metadata needed to rebuild and trust it.

Never a pickled module: loading uses ``torch.load(weights_only=True)`` and rebuilds the
architecture from the model name (and, for a pruned model, its plan).
"""

from __future__ import annotations

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

FORMAT = "edgeprune.checkpoint"
FORMAT_VERSION = 1


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
    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    dataset: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # set for pruned models

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode."""
        from edgeprune.models import build_model

        model = build_model(self.model, num_classes=self.num_classes, in_channels=self.input_shape[0])
        if self.plan is not None:
            from edgeprune.pruning.plan import Plan

            model = Plan.from_dict(self.plan).apply(model, inplace=True)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise EdgepruneError(f"checkpoint weights do not fit model {self.model!r}: {first}") from None
        return model.eval()


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
        raise EdgepruneError(f"{path} is not an edgeprune checkpoint (no '{FORMAT}' header)")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise EdgepruneError(f"{path} was written by a newer edgeprune (format {payload['version']}); upgrade")
    return Checkpoint(
        model=payload["model"],
        num_classes=int(payload["num_classes"]),
        input_shape=tuple(payload["input_shape"]),
        dataset=payload["dataset"],
        state_dict=payload["state_dict"],
        meta=payload.get("meta", {}),
        plan=payload.get("plan"),
    )
