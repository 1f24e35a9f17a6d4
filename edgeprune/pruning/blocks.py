"""Residual blocks a plan may remove whole (depth pruning).

A block with an identity shortcut computes act(branch(x) + x). Without its branch it computes
act(x), which is x where the activation is a ReLU after a ReLU (ResNet) or absent (MobileNetV2):
the block becomes an identity. Width pruning cannot remove per-operator costs (a call, a
residual add), and small networks on CPUs are dominated by them: resnet20 at 28x28 with every
group at one 8-channel step still costs 41 % of dense on ONNX Runtime. Removing blocks is what
reaches below that.

A block is removable when its branch has one inner channel group (every layer of the group lies
inside the block): keeping zero channels of that group is the plan's way of saying "remove the
block". Recognised: edgeprune's CIFAR ResNet blocks, torchvision's ResNet BasicBlock, and
MobileNetV2 inverted residuals with an expansion layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgeprune.errors import EdgepruneError


@dataclass(frozen=True)
class ResidualBlock:
    name: str  # the block's module path
    inner: str  # the layer whose output channels are the branch's inner group


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """The blocks of `model` that become an identity when their branch is removed."""
    # imported here: edgeprune.models and torchvision cost ~1 s, which `import edgeprune.pruning` need not pay
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

    from edgeprune.models.cifar_resnet import BasicBlock as CifarBasicBlock

    blocks = []
    for name, m in model.named_modules():
        inner = None
        if isinstance(m, CifarBasicBlock) and isinstance(m.shortcut, nn.Identity):
            inner = "conv1"
        elif isinstance(m, TorchvisionBasicBlock) and m.downsample is None:
            inner = "conv1"
        elif isinstance(m, InvertedResidual) and m.use_res_connect and len(m.conv) == 4:
            inner = "conv.0.0"  # the expansion conv; the depthwise conv shares its channels
        if inner is not None:
            blocks.append(ResidualBlock(name, f"{name}.{inner}"))
    return blocks


def remove_blocks(model: nn.Module, names: list[str]) -> None:
    """Replace each named block of `model` by an identity, in place."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not name:
            raise EdgepruneError(f"plan removes block {name!r}, which this model does not have: wrong base model?")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, nn.Identity())


def even_removal_order(names: list[str], model: nn.Module) -> list[str]:
    """`names` (removable blocks) in the order a uniform depth reduction removes them: the last
    block of each stage (blocks sharing a parent module), stage by stage, then the next-to-last..."""
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    stages: dict[str, list[str]] = {}
    for name in sorted(names, key=position.__getitem__):
        stages.setdefault(name.rpartition(".")[0], []).append(name)
    order, rank = [], 1
    while len(order) < len(names):
        order += [blocks[-rank] for blocks in stages.values() if len(blocks) >= rank]
        rank += 1
    return order
