"""Shipped base checkpoints: each loads and reproduces its recorded test accuracy."""

import pytest

from edgeprune.checkpoint import load_checkpoint
from edgeprune.data import load_dataset
from edgeprune.training import accuracy
from edgeprune.zoo import ZOO_DIR, resolve_weights, shipped

TARGETS = {"resnet20-fashion-mnist": 0.920, "resnet56-fashion-mnist": 0.925, "mobilenet_v2_cifar-fashion-mnist": 0.910}


def test_quickstart_checkpoint_is_shipped():
    assert "resnet20-fashion-mnist" in shipped()


@pytest.mark.parametrize("name", shipped())
def test_shipped_checkpoint_accuracy(name):
    ckpt = load_checkpoint(ZOO_DIR / f"{name}.pt")
    data = load_dataset(ckpt.dataset)
    recorded = ckpt.meta["test_accuracy"]
    assert abs(accuracy(ckpt.build(), data, "test") - recorded) <= 0.002  # BLAS order may flip a few images
    assert "recipe" in ckpt.meta and "versions" in ckpt.meta
    if not ckpt.meta.get("partial"):
        assert recorded >= TARGETS[name], f"{name}: {recorded:.2%} below the {TARGETS[name]:.1%} target"


def test_resolve_zoo_names():
    assert resolve_weights("zoo:resnet20-fashion-mnist").is_file()
    with pytest.raises(Exception, match="no shipped checkpoint"):
        resolve_weights("zoo:vgg-imagenet")
