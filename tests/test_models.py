import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.models import BUILTINS, build_model, list_models


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_builtins_forward(name, shape):
    model = build_model(name, num_classes=7, in_channels=shape[0]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"]
)
def test_torchvision_follow_dataset(name):
    model = build_model(name, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_list_models_has_both_sources():
    names = list_models()
    assert names[: len(BUILTINS)] == list(BUILTINS)
    assert "resnet18" in names and "convnext_tiny" in names


def test_unknown_model_names_choices():
    with pytest.raises(EdgepruneError, match="unknown model 'resnet21'.*resnet20.*resnet56"):
        build_model("resnet21")


def test_resnet_depths():
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())  # noqa: E731
    assert convs(build_model("resnet20")) == 19 and convs(build_model("resnet56")) == 55
