"""Turn CLI-style model arguments (name, checkpoint, data set, input shape) into a model."""

from __future__ import annotations

from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.models import BUILTINS, build_model

DATA_SHAPES = {"fashion-mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32)}


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise EdgepruneError(f"input shape {text!r} is not a list of integers like 1,3,224,224") from None
    if len(shape) != 4 or min(shape) < 1:
        raise EdgepruneError(f"input shape {text!r} must be N,C,H,W with positive sizes, e.g. 1,3,224,224")
    return shape


def resolve_model(
    model: str | None = None,
    *,
    weights: str | None = None,
    data: str | None = None,
    input_shape: str | None = None,
    num_classes: int = 10,
) -> tuple[nn.Module, str, tuple[int, ...]]:
    """(model, model id, input shape) from a checkpoint, or a name plus a data set or explicit shape.

    Latency does not depend on the weights, so profiling needs only the architecture and shape.
    Default shape: Fashion-MNIST's for built-ins, 1x3x224x224 for torchvision models.
    """
    if weights:
        from edgeprune.checkpoint import load_checkpoint
        from edgeprune.zoo import resolve_weights

        ckpt = load_checkpoint(resolve_weights(weights))
        if model and model != ckpt.model:
            raise EdgepruneError(f"checkpoint holds {ckpt.model!r}, not {model!r}")
        return ckpt.build(), ckpt.model, (1, *ckpt.input_shape)
    if not model:
        raise EdgepruneError("name a model (--model) or a checkpoint (--weights)")
    if input_shape:
        shape = parse_shape(input_shape)
    elif data:
        kind, _, arg = data.partition(":")
        if kind not in DATA_SHAPES:
            raise EdgepruneError(f"give --input-shape for data set {data!r} (known shapes: {', '.join(DATA_SHAPES)})")
        shape = (1, *DATA_SHAPES[kind])
        if kind == "digits" and arg.isdigit():  # digits:SIZE is upsampled
            shape = (1, 1, int(arg), int(arg))
    else:
        shape = (1, *DATA_SHAPES["fashion-mnist"]) if model in BUILTINS else (1, 3, 224, 224)
    return build_model(model, num_classes=num_classes, in_channels=shape[1]).eval(), model, shape
