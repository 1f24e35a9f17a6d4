"""The structured pruning engine on real architectures: plans, apply, ONNX parity, cost counts."""

import json

import numpy as np
import pytest
import torch

from edgeprune.backends import OnnxRuntimeBackend
from edgeprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgeprune.errors import EdgepruneError
from edgeprune.formats import export_onnx
from edgeprune.models import BUILTINS, build_model
from edgeprune.pruning import Plan, allowed_counts, count_macs, random_counts, space

STEP = 8
TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
    "mnasnet1_0",
    "convnext_tiny",
]
CASES = [(n, (1, 1, 28, 28)) for n in BUILTINS] + [(n, (1, 3, 64, 64)) for n in TORCHVISION]


@pytest.mark.parametrize("name,shape", CASES, ids=[c[0] for c in CASES])
def test_random_plan_prunes_exports_and_matches(name, shape, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    s = space(model, x, step=STEP)
    counts = random_counts(s, np.random.default_rng(1))
    assert any(k < g.width for k, g in zip(counts, s.groups)), "the random plan prunes something"
    plan = s.plan(counts)
    pruned = plan.apply(model)
    # kept counts: as planned, and multiples of the step wherever the group is wider than the step
    for g, k in zip(s.groups, counts):
        assert k in g.allowed and len(plan.keep.get(g.root, range(g.width))) == k
        if k < g.width:
            assert k % STEP == 0, (g.root, g.width, k)
    # the cost model counts the pruned network exactly without building it
    assert s.macs(counts) == count_macs(pruned, x)
    params = sum(p.numel() for p in pruned.parameters())
    if name == "convnext_tiny":  # layer-scale parameters are counted as unpruned
        assert abs(s.params(counts) - params) <= 0.001 * params
    else:
        assert s.params(counts) == params
    # exports to ONNX and agrees with PyTorch in ONNX Runtime
    onnx_path = export_onnx(pruned, shape, tmp_path / "p.onnx")
    run = OnnxRuntimeBackend(threads=1).session(onnx_path, shape)
    with torch.no_grad():
        ref = pruned(x).numpy()
    got = run(x.numpy())
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # the base model is untouched
    assert sum(p.numel() for p in model.parameters()) > params


def test_se_squeeze_convs_follow_the_step():
    model = build_model("mobilenet_v3_large", num_classes=10)
    s = space(model, torch.randn(1, 3, 64, 64), step=16)
    squeeze = [g for g in s.groups if g.root.endswith("fc1")]
    assert squeeze, "mobilenet_v3 has SE squeeze convs"
    for g in squeeze:
        if g.width >= 16:
            assert all(k % 16 == 0 or k == g.width for k in g.allowed), g


def test_shufflenet_rejected_with_layer_and_pattern():
    model = build_model("shufflenet_v2_x0_5", num_classes=10)
    with pytest.raises(EdgepruneError) as e:
        space(model, torch.randn(1, 3, 64, 64))
    msg = str(e.value)
    assert "channel shuffle" in msg and "stage" in msg and "\n" not in msg


def test_classifier_and_excluded_layers_stay():
    model = build_model("resnet20", num_classes=10, in_channels=1)
    s = space(model, torch.randn(1, 1, 28, 28), exclude=["layer1.*"])
    roots = {g.root for g in s.groups}
    assert "fc" not in roots and not any(r.startswith("layer1.") for r in roots)
    touched = {d.layer for g in s.groups for d in g.layers if d.dim == "out"}
    assert "fc" not in touched and "layer1.0.conv1" not in touched
    pruned = s.uniform(0.5).apply(model)
    assert pruned.fc.out_features == 10 and pruned.conv1.in_channels == 1
    assert pruned.layer1[0].conv1.out_channels == 16


def test_unknown_exclude_and_criterion():
    model = build_model("resnet20", in_channels=1)
    with pytest.raises(EdgepruneError, match="matches no layer"):
        space(model, torch.randn(1, 1, 28, 28), exclude=["nope.*"])
    s = space(model, torch.randn(1, 1, 28, 28))
    with pytest.raises(EdgepruneError, match="unknown criterion 'taylor'.*reprune"):
        s.uniform(0.5, criterion="taylor")
    with pytest.raises(EdgepruneError, match="cannot keep 5"):
        s.plan([5] * len(s.groups))


def test_allowed_counts():
    assert allowed_counts(64, step=16, min_keep_ratio=0.1) == [16, 32, 48, 64]
    assert allowed_counts(24, step=16, min_keep_ratio=0.1) == [16, 24]
    assert allowed_counts(8, step=16, min_keep_ratio=0.1) == [8]  # narrower than one step: not pruned
    assert allowed_counts(48, step=8, min_keep_ratio=0.1, channel_groups=3) == [24, 48]
    assert allowed_counts(10, step=1, min_keep_ratio=0.5) == [5, 6, 7, 8, 9, 10]


def test_plan_json_and_pruned_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobilenet_v2_cifar", num_classes=10, in_channels=1).eval()
    s = space(model, torch.randn(1, 1, 28, 28), step=8)
    plan = s.plan(random_counts(s, np.random.default_rng(0), mode="near-uniform"), criterion="l2")
    plan.save(tmp_path / "plan.json")
    assert len((tmp_path / "plan.json").read_bytes()) < 50_000
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.keep == plan.keep and loaded.hash() == plan.hash()
    pruned = loaded.apply(model)
    ckpt = Checkpoint("mobilenet_v2_cifar", 10, (1, 28, 28), "fashion-mnist", pruned.state_dict(), plan=plan.to_dict())
    save_checkpoint(ckpt, tmp_path / "pruned.pt")
    rebuilt = load_checkpoint(tmp_path / "pruned.pt").build()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(pruned(x), rebuilt(x))


def test_plan_on_wrong_model_and_bad_json(tmp_path):
    s = space(build_model("resnet20", in_channels=1), torch.randn(1, 1, 28, 28))
    plan = s.uniform(0.5)
    with pytest.raises(EdgepruneError, match="wrong base model"):
        plan.apply(build_model("mobilenet_v1", in_channels=1))
    (tmp_path / "p.json").write_text(json.dumps({"keep": 3}))
    with pytest.raises(EdgepruneError, match="not a valid edgeprune plan"):
        Plan.load(tmp_path / "p.json")


def test_random_sampler_modes():
    s = space(build_model("resnet56", in_channels=1), torch.randn(1, 1, 28, 28))
    rng = np.random.default_rng(0)
    for mode in ("uniform", "near-uniform"):
        for _ in range(20):
            counts = random_counts(s, rng, mode=mode)
            assert all(k in g.allowed for k, g in zip(counts, s.groups))
    ratios = [np.array(random_counts(s, rng, mode="near-uniform")) / s.widths for _ in range(20)]
    assert np.mean([r.std() for r in ratios]) < 0.25  # groups stay near one ratio
    with pytest.raises(EdgepruneError):
        random_counts(s, rng, mode="gaussian")
