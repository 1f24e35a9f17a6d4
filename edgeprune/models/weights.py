"""Weights as users bring them: an edgeprune checkpoint, a plain state dict (or a training script's
`{"state_dict": ...}` / `{"model": ...}` wrapper), torchvision's pretrained weights from the local
hub cache, or, only by explicit opt-in, a whole pickled module.

Nothing is downloaded: torchvision weights missing from the cache are a one-line error saying
which file to put where.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.models.reference import ModelRef, head_outputs, replace_head
from edgeprune.runs import file_sha256

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
TORCHVISION = "torchvision:"


@dataclass
class LoadedModel:
    """A model with its weights, and what it takes to build it again."""

    model: nn.Module
    ref: ModelRef
    source: str  # what the weights were: a path, zoo:NAME, torchvision:ENUM, or "random"
    checkpoint: object | None = None  # the edgeprune Checkpoint, where the weights were one
    transforms: dict | None = None  # torchvision weights: their input size and normalisation


def torchvision_weights(spec: str):
    """torchvision's weights enum member for `torchvision:ResNet18_Weights.IMAGENET1K_V1`, and its model name."""
    import torchvision

    name = spec[len(TORCHVISION) :]
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise EdgepruneError(
            f"unknown torchvision weights {name!r}; name them as torchvision does, e.g. ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    for model in torchvision.models.list_models(module=torchvision.models):
        if torchvision.models.get_model_weights(model) is type(weights):
            return weights, model
    raise EdgepruneError(f"no torchvision classifier takes {name}")


def _torchvision_state(weights) -> dict:
    """The weights' file from the local torch hub cache (never downloaded)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        raise EdgepruneError(
            f"torchvision weights {type(weights).__name__}.{weights.name} are not in the local cache: put "
            f"{weights.url.rsplit('/', 1)[-1]} (from {weights.url}) at {path}; edgeprune downloads nothing"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def unwrap_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside what a training script saved (a bare one, or one under a usual key),
    with DataParallel's `module.` prefix removed."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None or not all(isinstance(v, torch.Tensor) for v in inner.values()):
            keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
            raise EdgepruneError(f"{where} holds no state dict (found: {keys}); save model.state_dict() instead")
        sd = inner
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `model` exactly, or say in one line which keys are missing, unexpected or
    of another shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise EdgepruneError(
            f"{where} does not fit the model: keys {'; '.join(parts)}; check --model and its arguments "
            "(model_kwargs), or --num-classes"
        )
    model.load_state_dict(state)


def _read(path: Path, trust_pickle: bool):
    """What the file holds: loaded with weights_only, or (opt-in) unpickled as it is."""
    if not path.is_file():
        raise EdgepruneError(f"weights {path} do not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        pickled = "Unsupported global" in str(e) or "Unsupported class" in str(e)
        if not pickled:
            raise EdgepruneError(f"{path} is corrupt or not a PyTorch file ({reason[:120]})") from None
    if not trust_pickle:
        raise EdgepruneError(
            f"{path} holds a pickled Python object, not a state dict; unpickling runs code from the file: pass "
            "--trust-pickle (trust_pickle=True) if you trust it, or save model.state_dict() instead"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True
    except (ModuleNotFoundError, AttributeError) as e:
        raise EdgepruneError(
            f"unpickling {path} needs the code that defines its classes ({e}): put its package on PYTHONPATH, or "
            "save model.state_dict() and give --model"
        ) from None


def load_model(
    model: str | None = None,
    weights: str | os.PathLike | None = None,
    *,
    model_kwargs: dict | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    trust_pickle: bool = False,
    log=None,
) -> LoadedModel:
    """The model named by `model` (see ModelRef) with `weights`; `num_classes` replaces the
    classifier head where it differs from the weights' (a pretrained model for the user's classes)."""
    from edgeprune.checkpoint import FORMAT, checkpoint_from_payload
    from edgeprune.zoo import resolve_weights

    say = log or (lambda s: None)
    if weights is not None and str(weights).startswith(TORCHVISION):
        return _from_torchvision(model, str(weights), num_classes, in_channels, say)
    if weights is None:
        ref = ModelRef.parse(model, kwargs=model_kwargs, num_classes=num_classes, in_channels=in_channels)
        return LoadedModel(ref.build(), ref, "random")
    path = resolve_weights(str(weights))
    obj, pickled = _read(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = checkpoint_from_payload(obj, path)
        if model and ModelRef.parse(model, kwargs=model_kwargs).name != ckpt.ref.name:
            raise EdgepruneError(f"checkpoint {weights} holds {ckpt.model!r}, not {model!r}")
        net = ckpt.build()
        ref = ckpt.ref
        if num_classes is not None and ckpt.plan is None and head_outputs(net) != num_classes:
            say(f"classifier head {replace_head(net, num_classes)} replaced: {num_classes} classes")
            ref = ModelRef(ref.name, ref.kwargs, num_classes, ref.in_channels, ref.sha256)
        return LoadedModel(net, ref, str(weights), ckpt)
    if pickled:
        net = obj.get("model") if isinstance(obj, dict) else obj
        if not isinstance(net, nn.Module):
            raise EdgepruneError(f"{path} holds a {type(obj).__name__}, not a pickled torch.nn.Module")
        ref = ModelRef(f"pickle:{path.resolve()}", sha256=file_sha256(path))
        net = net.eval()
        if num_classes is not None and head_outputs(net) != num_classes:
            say(f"classifier head {replace_head(net, num_classes)} replaced: {num_classes} classes")
            ref = ModelRef(ref.name, num_classes=num_classes, sha256=ref.sha256)
        return LoadedModel(net, ref, str(weights))
    if not model:
        raise EdgepruneError(
            f"{weights} is a plain state dict: name its architecture with --model (a name, file.py:factory "
            "or package.module:factory)"
        )
    state = unwrap_state_dict(obj, str(weights))
    ref = ModelRef.parse(model, kwargs=model_kwargs, in_channels=in_channels)
    net = ref.build()
    load_state(net, state, str(weights))
    if num_classes is not None and head_outputs(net) != num_classes:
        say(f"classifier head {replace_head(net, num_classes)} replaced: {num_classes} classes")
        ref = ModelRef(ref.name, ref.kwargs, num_classes, ref.in_channels)
    return LoadedModel(net.eval(), ref, str(weights))


def _from_torchvision(model, spec, num_classes, in_channels, say) -> LoadedModel:
    weights, name = torchvision_weights(spec)
    if model and model != name:
        raise EdgepruneError(f"{spec} are weights for {name}, not {model}")
    categories = len(weights.meta.get("categories") or []) or 1000
    net = ModelRef(name, num_classes=categories).build()
    load_state(net, _torchvision_state(weights), spec)
    if in_channels not in (None, 3):
        from edgeprune.models.registry import replace_stem

        replace_stem(net, in_channels)
        say(f"input stem replaced: {in_channels} input channels, not 3 (its weights start untrained)")
    if num_classes is not None and num_classes != categories:
        say(f"classifier head {replace_head(net, num_classes)} replaced: {num_classes} classes, not {categories}")
    ref = ModelRef(name, num_classes=num_classes or categories, in_channels=in_channels)
    t = weights.transforms()
    transforms = {
        "size": int(t.crop_size[0]),
        "resize": int(t.resize_size[0]),
        "mean": list(t.mean),
        "std": list(t.std),
    }
    return LoadedModel(net.eval(), ref, spec, transforms=transforms)
