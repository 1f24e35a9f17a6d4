"""Models by name: edgeprune's built-ins for small inputs and torchvision's classifiers.

Input channels and class count follow the data set; torchvision models get their stem conv
replaced when the data set is not RGB. Weights are never downloaded: models start random and
are trained (``edgeprune train``) or loaded from an edgeprune checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgeprune.errors import EdgepruneError, choices_error
from edgeprune.models.cifar_resnet import resnet20, resnet56
from edgeprune.models.mobilenet import mobilenet_v1, mobilenet_v2_cifar

BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
}


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every model name `build_model` accepts: built-ins first, then torchvision classifiers."""
    return list(BUILTINS) + torchvision_models()


def replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv that reads the RGB input for one that reads `in_channels`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            stem = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups if module.groups == 1 else in_channels,
                module.bias is not None,
            )
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], stem)
            return
    raise EdgepruneError(f"cannot adapt the model to {in_channels} input channels: no RGB stem conv found")


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model `name` for `in_channels` inputs and `num_classes` outputs."""
    if name in BUILTINS:
        return BUILTINS[name](num_classes=num_classes, in_channels=in_channels)
    names = torchvision_models()
    if name not in names:
        raise choices_error("model", name, list(BUILTINS) + ["any torchvision classifier, e.g. resnet18"])
    import torchvision

    kwargs = {"weights": None, "num_classes": num_classes}
    if name.startswith("inception") or name.startswith("googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    model = torchvision.models.get_model(name, **kwargs)
    if in_channels != 3:
        replace_stem(model, in_channels)
    return model
