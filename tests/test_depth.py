"""Depth pruning: residual blocks removed whole, counted, predicted, searched and shipped."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from edgeprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgeprune.errors import EdgepruneError
from edgeprune.formats import export_onnx
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.predictor import Predictor
from edgeprune.latency.table import LatencyTable
from edgeprune.models import build_model
from edgeprune.pruning import Plan, count_macs, space
from edgeprune.pruning.blocks import even_removal_order, residual_blocks
from edgeprune.search import BudgetProblem, FlopsCost, Uniform
from tests.test_search import prune_args

CASES = [
    ("resnet20", lambda: build_model("resnet20", in_channels=1), (1, 1, 28, 28), 7),
    ("mobilenet_v2_cifar", lambda: build_model("mobilenet_v2_cifar", in_channels=1), (1, 1, 28, 28), 10),
    ("torchvision-resnet18", lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64), 5),
]


@pytest.mark.parametrize("name,make,shape,n_blocks", CASES, ids=[c[0] for c in CASES])
def test_removed_blocks_are_counted_predicted_and_exported_exactly(name, make, shape, n_blocks, tmp_path):
    """For plans that remove blocks: MACs, params and the runtime's units computed from the
    keep-counts equal those of the pruned model itself, which exports and matches ONNX Runtime."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    s = space(model, x, step=8, depth=True)
    assert len(s.gates) == n_blocks and all(s.groups[g].allowed[0] == 0 for g in s.gates)
    layers = ModelLayers.from_model(s)
    rng = np.random.default_rng(1)
    for _ in range(2):
        counts = [int(rng.choice(g.allowed)) for g in s.groups]
        for g in list(s.gates)[:2]:
            counts[g] = 0  # at least two blocks removed
        plan = s.plan(counts, criterion="l2")
        assert sorted(plan.drop) == sorted(s.gates[g] for g in s.gates if counts[g] == 0)
        pruned = plan.apply(model)
        assert all(isinstance(dict(pruned.named_modules())[b], nn.Identity) for b in plan.drop)
        assert s.params(counts) == sum(p.numel() for p in pruned.parameters())
        assert s.macs(counts) == count_macs(pruned, x)
        units = [c.key for c in ModelLayers.from_model(space(pruned, x, step=8)).configs()]
        assert [c.key for c in layers.configs(counts)] == units
        assert {c.key for c in layers.configs(counts)} <= {c.key for c in layers.reachable()}
    path = export_onnx(pruned, shape, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = pruned(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_a_block_without_its_branch_is_an_identity():
    """Removing a block changes nothing when its branch already adds zero: the relu after the add
    is idempotent on the block's (already activated) input."""
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1).eval()
    block = model.layer2[1]
    nn.init.zeros_(block.bn2.weight)
    nn.init.zeros_(block.bn2.bias)  # the branch now outputs exactly 0
    s = space(model, torch.randn(1, 1, 28, 28), step=8, depth=True)
    gate = next(g for g, b in s.gates.items() if b == "layer2.1")
    counts = s.full_counts()
    counts[gate] = 0
    pruned = s.plan(counts).apply(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-6)
    assert isinstance(pruned.layer2[1], nn.Identity)
    assert not [n for n, _ in pruned.named_modules() if n.startswith("layer2.1.")]


def test_only_identity_shortcut_blocks_are_removable():
    r20 = build_model("resnet20", in_channels=1)
    names = [b.name for b in residual_blocks(r20)]
    assert names == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    # the first block of stages 2 and 3 changes shape (a conv shortcut): never removable
    assert "layer2.0" not in names and "layer3.0" not in names
    with pytest.raises(EdgepruneError, match="no removable residual block.*prune without --depth"):
        space(build_model("mobilenet_v1", in_channels=1), torch.randn(1, 1, 28, 28), depth=True)
    # an excluded inner layer keeps its block
    s = space(r20, torch.randn(1, 1, 28, 28), step=8, depth=True, exclude=["layer1.1.conv1"])
    assert "layer1.1" not in s.gates.values() and len(s.gates) == 6


def test_plan_with_removed_blocks_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1).eval()
    s = space(model, torch.randn(1, 1, 28, 28), step=8, depth=True)
    counts = s.counts_from_ratios(0.5)
    for g in list(s.gates)[::2]:
        counts[g] = 0
    plan = s.plan(counts)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.drop == plan.drop and loaded.hash() == plan.hash() and s.counts_of(loaded) == counts
    pruned = loaded.apply(model)
    ckpt = Checkpoint("resnet20", 10, (1, 28, 28), "fashion-mnist", pruned.state_dict(), plan=plan.to_dict())
    save_checkpoint(ckpt, tmp_path / "pruned.pt")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "pruned.pt").build()(x), pruned(x))
    # a plan written before depth pruning (no "drop") still loads
    old = json.loads((tmp_path / "plan.json").read_text())
    old.pop("drop")
    old["keep"] = {k: v for k, v in old["keep"].items() if v}
    assert Plan.from_dict(old).drop == []
    bad = {**json.loads((tmp_path / "plan.json").read_text()), "drop": []}
    with pytest.raises(EdgepruneError, match="keeps no channel of .* but removes no block"):
        Plan.from_dict(bad).apply(model)


def test_depth_reaches_below_the_width_only_minimum():
    """A budget under every width-only plan: refused with a hint to --depth; with depth it is
    feasible, and every repaired candidate fits and removes at least one block."""
    x = torch.randn(1, 1, 28, 28)
    width = space(build_model("resnet20", in_channels=1).eval(), x, step=8)
    deep = space(build_model("resnet20", in_channels=1).eval(), x, step=8, depth=True)
    width_min = width.macs(width.min_counts()) / width.macs()
    assert deep.macs(deep.min_counts()) < width.macs(width.min_counts())
    budget = 0.8 * width_min
    with pytest.raises(EdgepruneError, match=r"remove whole residual blocks \(--depth\)$"):
        BudgetProblem.create(width, FlopsCost(width.cost, width.macs()), budget)
    problem = BudgetProblem.create(deep, FlopsCost(deep.cost, deep.macs()), budget)
    repaired = problem.repair(np.random.default_rng(0).random((32, problem.dim)))
    assert (repaired.cost <= budget + 1e-12).all()
    assert all(any(c[g] == 0 for g in deep.gates) for c in repaired.counts)
    assert repaired.cost.max() > 0.9 * budget  # the fill spends what is left


def test_compiled_predictor_skips_removed_blocks():
    s = space(build_model("resnet20", in_channels=1).eval(), torch.randn(1, 1, 28, 28), step=8, depth=True)
    layers = ModelLayers.from_model(s)
    entries = {c.key: {"median_ms": 0.01 * (i + 1)} for i, c in enumerate(layers.reachable())}
    table = LatencyTable("t", {}, {}, 8, entries=entries, calibration={"a": 1.5, "b": 0.1, "n": 3})
    p = Predictor(layers, table)
    rng = np.random.default_rng(2)
    plans = [[int(rng.choice(g.allowed)) for g in s.groups] for _ in range(20)]
    assert p.compiled().predict(np.array(plans)) == pytest.approx([p.predict(c) for c in plans])
    # removing one block takes exactly its three units (conv1, conv2, the add) out of the sum
    full = s.full_counts()
    gate = next(iter(s.gates))
    without = list(full)
    without[gate] = 0
    block = [c for c, u in zip(layers.configs(full), layers.units) if u.gate == gate]
    assert len(block) == 3 and len(layers.configs(without)) == len(layers.configs(full)) - 3
    assert p.unit_sum(full) - p.unit_sum(without) == pytest.approx(sum(entries[c.key]["median_ms"] for c in block))


def test_prune_with_depth_meets_a_budget_width_pruning_cannot(tiny_run, tmp_path, cli):
    """A share-of-dense budget under the smallest width-only plan (as the table predicts it, and
    as the device measures it): refused with the --depth hint; met on the device with --depth, by a
    plan that removes blocks."""
    table = LatencyTable.load(tiny_run["table"])
    model = build_model("resnet20", in_channels=1).eval()
    x = torch.randn(1, 1, 16, 16)
    width = Predictor(ModelLayers.from_model(s := space(model, x, step=8)), table)
    deep = Predictor(ModelLayers.from_model(d := space(model, x, step=8, depth=True)), table)
    width_min, deep_min = (p.predict(sp.min_counts()) / p.predict() for p, sp in ((width, s), (deep, d)))
    assert deep_min < 0.8 * width_min, (deep_min, width_min)
    # 8 points under it: a budget the table rates out of reach is held against the device (the
    # smallest plan is measured), and this one must be out of reach there too (it measures ~56 %)
    budget = f"{100 * (width_min - 0.08):.1f}%"
    r = cli(*prune_args(tiny_run, tmp_path / "w", budget_ms=budget, search="random", evals=6))
    assert r.returncode == 2 and "--depth" in r.stderr.splitlines()[-1], r.stderr
    assert "the smallest plan this search space reaches measures" in " ".join(r.stderr.split())
    r = cli(
        *prune_args(tiny_run, tmp_path / "d", budget_ms=budget, search="bocr", evals=8, measure_top=3),
        "--depth",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["met_budget"] and res["chosen"]["measured_ms"] <= res["budget_ms"], (
        f"{r.stderr}\nchosen: {res['chosen']}"
    )
    assert res["chosen"]["removed_blocks"], res["chosen"]
    pruned = load_checkpoint(tmp_path / "d" / "pruned.pt").build()
    assert sum(p.numel() for p in pruned.parameters()) == res["chosen"]["params"]
    modules = dict(pruned.named_modules())
    assert all(isinstance(modules[b], nn.Identity) for b in res["chosen"]["removed_blocks"])


def test_uniform_with_depth_removes_the_fewest_blocks_evenly():
    x = torch.randn(1, 1, 28, 28)
    model = build_model("resnet20", in_channels=1).eval()
    width, deep = space(model, x, step=8), space(model, x, step=8, depth=True)
    order = even_removal_order([b.name for b in residual_blocks(model)], model)
    assert order == ["layer1.2", "layer2.2", "layer3.2", "layer1.1", "layer2.1", "layer3.1", "layer1.0"]

    def uniform_counts(s, budget):
        problem = BudgetProblem.create(s, FlopsCost(s.cost, s.macs()), budget)
        return problem, list(problem.counts(Uniform(problem, evals=1).ask())[0])

    # where width alone fits, depth changes nothing
    assert uniform_counts(deep, 0.3)[1] == uniform_counts(width, 0.3)[1]
    # below it: the first k blocks of the even order go, and k - 1 would not fit at any ratio
    problem, counts = uniform_counts(deep, 0.08)
    removed = [deep.gates[g] for g in deep.gates if counts[g] == 0]
    k = len(removed)
    assert k >= 1 and sorted(removed) == sorted(order[:k])
    assert problem.cost(np.array([counts]))[0] <= 0.08
    fewer = [g.allowed[1] if g.block else g.allowed[0] for g in deep.groups]
    for b in order[: k - 1]:
        fewer[next(g for g, name in deep.gates.items() if name == b)] = 0
    assert problem.cost(np.array([fewer]))[0] > 0.08
