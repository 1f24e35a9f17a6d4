"""Coverage: architectures users write and torchvision's classifiers, through pruning and the
latency side. For random plans of each: the MACs counted from keep-counts equal a hook count on
the pruned model, the units the table is keyed by equal those of the pruned model's own export,
every plan's units are among the configurations the profiler measures (each kind of which it can
build and run), and the pruned model exports and matches ONNX Runtime on every output. Or a
one-line refusal naming why."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.units import unit_model
from edgeprune.models import build_model
from edgeprune.models.onnx import export_onnx, flatten_outputs
from edgeprune.models.reference import ModelRef
from edgeprune.pruning import count_macs, random_counts, space

from .conftest import EXAMPLES


def user(name: str, **kwargs):
    return lambda: ModelRef.parse(f"{EXAMPLES / (name + '.py')}:{name}", kwargs=kwargs).build()


def tv(name: str):
    return lambda: build_model(name, num_classes=10)


# (name, builder, input shape): the user-written patterns, then the torchvision models a latency
# table used to fail on (concatenations, DenseNet's growing concat, channels-last ConvNeXt)
CASES = [
    ("tinynet", user("tinynet", width=16), (1, 1, 28, 28)),  # concat + SE, grouped conv, hard-swish, residual add
    ("twohead", user("twohead", width=16), (1, 1, 24, 24)),  # dict outputs, FPN-style fused scales, resize
    ("googlenet", tv("googlenet"), (1, 3, 64, 64)),
    pytest.param("inception_v3", tv("inception_v3"), (1, 3, 96, 96), marks=pytest.mark.slow, id="inception_v3"),
    ("densenet121", tv("densenet121"), (1, 3, 64, 64)),
    ("convnext_tiny", tv("convnext_tiny"), (1, 3, 64, 64)),
    ("efficientnet_b0", tv("efficientnet_b0"), (1, 3, 64, 64)),
    ("mobilenet_v3_small", tv("mobilenet_v3_small"), (1, 3, 64, 64)),
    pytest.param("vgg11_bn", tv("vgg11_bn"), (1, 3, 224, 224), marks=pytest.mark.slow, id="vgg11_bn"),  # 130 M weights
]


def check_architecture(make, shape, *, plans: int = 2, tmp_path=None) -> ModelLayers:
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    s = space(model, x, step=8)
    layers = ModelLayers.from_model(s)
    configs = layers.reachable()
    reachable = {c.key for c in configs}
    for cfg in {c.op + c.detail: c for c in configs}.values():  # the profiler can build and run each kind of unit
        unit, unit_shape = unit_model(cfg, copies=2)
        sess = ort.InferenceSession(unit.SerializeToString(), providers=["CPUExecutionProvider"])
        sess.run(None, {"x": np.zeros(unit_shape, np.float32)})
    rng = np.random.default_rng(1)
    for i in range(plans):
        counts = random_counts(s, rng)
        pruned = s.plan(counts, criterion="l2").apply(model)
        assert s.macs(counts) == count_macs(pruned, x)
        assert s.params(counts) == sum(p.numel() for p in pruned.parameters())
        units = [c.key for c in layers.configs(counts)]
        assert units == [c.key for c in ModelLayers.from_model(space(pruned, x, step=8)).configs()]
        assert set(units) <= reachable
        if tmp_path is not None:
            path = export_onnx(pruned, x, tmp_path / f"p{i}.onnx")
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            with torch.no_grad():
                want = [t.numpy() for t in flatten_outputs(pruned(x))]
            got = sess.run(None, {"input": x.numpy()})
            for g, w in zip(got, want):
                assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())
    return layers


@pytest.mark.parametrize("name,make,shape", CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_units_macs_and_exports_follow_any_plan(name, make, shape, tmp_path):
    check_architecture(make, shape, tmp_path=tmp_path)


def test_a_concatenated_group_keeps_the_same_share_of_every_part():
    """An SE block after an Inception-style concat couples the four branches into one group: each
    branch keeps the same share of its channels (so each layer's width follows the group's count,
    as the latency table needs), at least one channel step each."""
    model = user("tinynet", width=16)()
    s = space(model, torch.randn(1, 1, 28, 28), step=8)
    [g] = [g for g in s.groups if g.parts]
    assert g.parts == [16, 16, 16, 16] and g.allowed == [32, 64]
    plan = s.plan([32 if h is g else h.width for h in s.groups])
    kept = plan.keep[g.root]
    assert [sum(1 for i in kept if lo <= i < lo + 16) for lo in (0, 16, 32, 48)] == [8, 8, 8, 8]


def test_a_channel_shuffle_is_refused_in_one_line_that_says_what_helps():
    with pytest.raises(EdgepruneError) as e:
        space(build_model("shufflenet_v2_x0_5"), torch.randn(1, 3, 64, 64))
    msg = str(e.value)
    assert "channel shuffle" in msg and "holding layers at full width does not help" in msg and "\n" not in msg


def test_too_many_configurations_name_the_layer_and_the_remedy():
    model = user("tinynet", width=16)()
    layers = ModelLayers.from_model(space(model, torch.randn(1, 1, 28, 28), step=8))
    with pytest.raises(EdgepruneError, match=r"layer res\.body\.0\.0 reaches \d+ configurations or more .*\(--step 16"):
        for u in range(len(layers.units)):
            layers.unit_grid(u, limit=20)


@pytest.mark.slow
def test_every_torchvision_classifier_prunes_and_counts_exactly():
    """Every torchvision classifier but the refused (channel shuffle) and the ones no edge device
    holds (over 2 GiB of weights, or transformers): MACs and units for one random plan each."""
    from edgeprune.models.registry import torchvision_models

    skipped = ("vit", "swin", "maxvit", "raft", "quantized", "regnet_y_128gf", "shufflenet")
    for name in torchvision_models():
        if any(s in name for s in skipped):
            continue
        size = 224 if name.startswith(("vgg", "alexnet")) else 96
        check_architecture(tv(name), (1, 3, size, size), plans=1)
