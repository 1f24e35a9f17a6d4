"""Turn what a user types (a model name or `file.py:factory`, weights in any usual form, a data
set, an input size) into a model, its reference, its data and its example input: the one place
the CLI and config files do it, before calling the library's model-in functions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeprune.checks import POSITIVE_OR_NONE, check_values
from edgeprune.errors import EdgepruneError
from edgeprune.models import BUILTINS

DATA_SHAPES = {"fashion-mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32)}
# how a user names a model and its data: `resolve`'s arguments, the keys of a config file
MODEL_OPTIONS = (
    "model",
    "model_kwargs",
    "weights",
    "num_classes",
    "trust_pickle",
    "data",
    "data_root",
    "image_size",
    "mean",
    "std",
)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise EdgepruneError(f"input shape {text!r} is not a list of integers like 1,3,224,224") from None
    if len(shape) < 2 or min(shape) < 1:
        raise EdgepruneError(f"input shape {text!r} must be N,C,H,W with positive sizes, e.g. 1,3,224,224")
    return shape


SHAPE_RULES = {"num_classes": POSITIVE_OR_NONE, "image_size": POSITIVE_OR_NONE}


def parse_floats(text: str | list | None, what: str, *, positive: bool = False) -> list[float] | None:
    """R,G,B (or a list) as finite numbers (`positive`: above 0, a std divides by them)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in (text if isinstance(text, list) else str(text).split(","))]
    except (TypeError, ValueError):
        values = []
    if not values or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "positive numbers" if positive else "numbers"
        raise EdgepruneError(f"--{what} {text!r} is not a list of {kind} like 0.485,0.456,0.406")
    return values


def parse_model_args(items: list[str] | dict | None) -> dict:
    """`--model-arg width=16 --model-arg pretrained=false` (values read as YAML scalars) -> kwargs."""
    import yaml

    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise EdgepruneError(f"--model-arg {item!r} must be NAME=VALUE, e.g. --model-arg width=16")
        out[key] = yaml.safe_load(value)
    return out


@dataclass
class Resolved:
    """A model the user named, with what the pipeline needs around it."""

    model: nn.Module
    ref: object  # ModelRef
    shape: tuple[int, ...]  # the example input's shape, batch of one
    source: str  # where the weights came from ("random" where none)
    data: object | None = None  # the Dataset, where one was named or the checkpoint has one
    data_name: str | None = None
    data_options: dict = field(default_factory=dict)
    checkpoint: object | None = None
    args: str = ""  # the CLI arguments that name this model (advice commands repeat them)

    @property
    def id(self) -> str:
        return self.ref.id


def _cli_args(model, weights, kwargs, num_classes, trust_pickle) -> str:
    parts = [f"--model {model}"] if model else []
    parts += [f"--weights {weights}"] if weights else []
    parts += [f"--model-arg {k}={v}" for k, v in kwargs.items()]
    parts += [f"--num-classes {num_classes}"] if num_classes else []
    parts += ["--trust-pickle"] if trust_pickle else []
    return " ".join(parts)


def resolve(
    model: str | None = None,
    weights: str | None = None,
    *,
    model_kwargs: dict | list | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    data: str | None = None,
    data_root: str | None = None,
    image_size: int | None = None,
    mean: list[float] | str | None = None,
    std: list[float] | str | None = None,
    input_shape: str | None = None,
    load_data: bool = True,
    log=None,
) -> Resolved:
    """The model (with its weights), its data set and its example input's shape.

    Data: `data`, else the checkpoint's. An ImageFolder's size and normalisation: given, else the
    torchvision weights', else the checkpoint's, else 224 and ImageNet's. Shape: `input_shape`,
    else the data's, else the checkpoint's, else Fashion-MNIST's for built-ins and 224 for others.
    `load_data=False` reads only the shape where it can (profile and predict need no images)."""
    from edgeprune.models.weights import load_model

    if not model and not weights:
        raise EdgepruneError("name a model (--model NAME or file.py:factory) or a checkpoint (--weights)")
    check_values({"num_classes": num_classes, "image_size": image_size}, SHAPE_RULES, where="model")
    parse_floats(mean, "mean"), parse_floats(std, "std", positive=True)  # before the model is built
    kwargs = parse_model_args(model_kwargs)
    loaded = load_model(
        model, weights, model_kwargs=kwargs, num_classes=num_classes, trust_pickle=trust_pickle, log=log
    )
    ckpt = loaded.checkpoint
    data_name = data or (ckpt.dataset if ckpt is not None else None)
    options = _image_options(data_name, image_size, mean, std, loaded, ckpt)
    dataset = None
    folder_size_unknown = bool(data_name) and data_name.startswith("imagefolder:") and not options.get("size")
    if data_name and (load_data or folder_size_unknown and not input_shape):
        from edgeprune.data import load_dataset

        dataset = load_dataset(data_name, root=data_root, options=options)
    if input_shape:
        shape = parse_shape(input_shape)
    elif dataset is not None:
        shape = (1, *dataset.input_shape)
    elif data_name and data_name.partition(":")[0] in DATA_SHAPES:
        kind, _, arg = data_name.partition(":")
        shape = (1, *DATA_SHAPES[kind]) if not (kind == "digits" and arg.isdigit()) else (1, 1, int(arg), int(arg))
    elif data_name and options.get("size"):
        shape = (1, 3, options["size"], options["size"])
    elif ckpt is not None:
        shape = ckpt.example_shape
    else:
        shape = (1, *DATA_SHAPES["fashion-mnist"]) if loaded.ref.name in BUILTINS else (1, 3, 224, 224)
    if loaded.source == "random" and loaded.ref.kind in ("builtin", "torchvision") and shape[1] != 3:
        loaded = load_model(model, None, model_kwargs=kwargs, num_classes=num_classes, in_channels=shape[1])
    args = _cli_args(model, weights, kwargs, num_classes, trust_pickle)
    return Resolved(loaded.model, loaded.ref, tuple(shape), loaded.source, dataset, data_name, options, ckpt, args)


def _image_options(data_name, image_size, mean, std, loaded, ckpt) -> dict:
    if not data_name or not data_name.startswith("imagefolder:"):
        if image_size or mean or std:
            raise EdgepruneError("--image-size, --mean and --std apply to --data imagefolder:PATH only")
        return {}
    base = dict((ckpt.meta.get("data_options") or {}) if ckpt is not None and data_name == ckpt.dataset else {})
    if loaded.transforms:
        base = {k: loaded.transforms[k] for k in ("size", "mean", "std")}
    given = {"size": image_size, "mean": parse_floats(mean, "mean"), "std": parse_floats(std, "std")}
    return {**base, **{k: v for k, v in given.items() if v is not None}}


def check_classes(resolved: Resolved) -> None:
    """A classifier pruned on a data set must answer that data set's classes."""
    data = resolved.data
    if data is None:
        return
    with torch.no_grad():
        out = resolved.model.eval()(torch.zeros(*resolved.shape))
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != data.num_classes:
        raise EdgepruneError(
            f"the model answers {out.shape[1]} classes, {data.name} has {data.num_classes}: train it on this data "
            f"first (edgeprune train {resolved.args} --data {resolved.data_name} --out dense.pt: its head is "
            f"replaced), then prune dense.pt"
        )
