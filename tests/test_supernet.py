"""The supernet proxy (SP): slicing equals pruning, training helps, persistence, determinism."""

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.models import build_model
from edgeprune.pruning import random_counts, space
from edgeprune.search.proxy import ProxyEvaluator
from edgeprune.search.supernet import Supernet, SupernetEvaluator, SupernetSettings, network_order, split_stages
from edgeprune.task import Task

X16 = (1, 1, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread here: the tests train, and two threads on a shared 2-core host contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(digits16):
    return Task.classification_on(digits16, heldout_images=200, batch_size=64)


@pytest.fixture(scope="module")
def r20(digits16):
    """resnet20 trained briefly on digits at 16x16: a dense model whose smallest plan the BN proxy
    scores far under dense."""
    from edgeprune.training import Recipe, fit

    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1)
    fit(model, digits16, Recipe(epochs=6, lr=0.1, batch_size=64), progress=False)
    return space(model.eval(), torch.randn(*X16), step=8)


def weights_differ(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2_cifar"])
def test_supernet_slice_equals_pruning_its_weights(name, task):
    torch.manual_seed(0)
    s = space(build_model(name, in_channels=1).eval(), torch.randn(*X16), step=8)
    net = Supernet(s, task, SupernetSettings(steps=1, widths_per_step=1, stages=2))
    net.train()
    assert weights_differ(net.model, s.base)  # trained: the check is on weights the base does not have
    rng = np.random.default_rng(0)
    x = torch.randn(4, 1, 16, 16)
    for counts in [s.min_counts(), random_counts(s, rng)]:
        with torch.no_grad(), net.masks.applied(net.model.eval(), net.masks.hard(counts)) as m:
            masked = m(x)
        pruned = s.plan(counts, criterion="l2").apply(net.model)(x)
        torch.testing.assert_close(masked, pruned.detach(), atol=1e-5, rtol=1e-4)


def test_stages_follow_the_network(r20):
    stages = split_stages(network_order(r20, [g.index for g in r20.groups]), 3)
    roots = [[r20.groups[g].root for g in chunk] for chunk in stages]
    assert roots[0][0] == "conv1"
    assert all(r.startswith(("conv1", "layer1")) for r in roots[0])
    assert all(r.startswith("layer2") for r in roots[1]) and all(r.startswith("layer3") for r in roots[2])


def test_supernet_training_lifts_the_smallest_plan(r20, task):
    smallest = r20.min_counts()
    plain = ProxyEvaluator(r20, task, criterion="l2")(smallest)
    ev = SupernetEvaluator(r20, task, supernet_steps=20, supernet_lr=0.05, widths_per_step=1, stages=1)
    assert ev.supernet_seconds > 0
    lifted = ev(smallest)
    assert lifted > plain + 0.2, (plain, lifted)  # measured: 0.135 -> 0.6 (dense 0.985)
    assert ev(r20.full_counts()) > 0.9  # the full width still works


def test_saved_supernet_is_loaded_not_retrained(r20, task, tmp_path, monkeypatch):
    path = tmp_path / "supernet.pt"
    first = SupernetEvaluator(r20, task, supernet_steps=2, state_path=path)
    assert path.is_file() and first.supernet_seconds > 0
    trained = {k: v.clone() for k, v in first.supernet.model.state_dict().items()}

    def refuse(self, **kw):
        raise AssertionError("trained again")

    with monkeypatch.context() as mp:
        mp.setattr(Supernet, "train", refuse)
        again = SupernetEvaluator(r20, task, supernet_steps=2, state_path=path, calibration_batches=3)  # not in the key
        assert again.supernet_seconds == 0
        for k, v in again.supernet.model.state_dict().items():
            assert torch.equal(v, trained[k])
        with pytest.raises(AssertionError, match="trained again"):
            SupernetEvaluator(r20, task, supernet_steps=2, supernet_lr=0.01, state_path=path)
    changed = SupernetEvaluator(r20, task, supernet_steps=2, supernet_lr=0.01, state_path=path)
    assert changed.supernet_seconds > 0
    assert torch.load(path, weights_only=True)["key"] == changed.supernet.key() != first.supernet.key()
    path.write_bytes(b"not a checkpoint")  # damaged (a kill mid-write cannot do it: the write is atomic)
    assert SupernetEvaluator(r20, task, supernet_steps=2, state_path=path).supernet_seconds > 0


def test_supernet_is_deterministic_for_a_seed(r20, task):
    def trained(seed: int) -> torch.nn.Module:
        net = Supernet(r20, task, SupernetSettings(steps=3, widths_per_step=1, seed=seed))
        net.train()
        return net.model

    a, b, c = trained(0), trained(0), trained(1)
    assert not weights_differ(a, b)
    assert weights_differ(a, c)


def test_supernet_refuses_depth_and_workers(r20, task, digits16):
    deep = space(r20.base, torch.randn(*X16), step=8, depth=True)
    with pytest.raises(EdgepruneError, match="remove residual blocks"):
        SupernetEvaluator(deep, task, supernet_steps=1)
    ev = SupernetEvaluator(r20, task, supernet_steps=1, widths_per_step=0)

    class Pool:
        closed = False

        def close(self):
            self.closed = True

    pool = Pool()
    with pytest.raises(EdgepruneError, match="without a cluster"):
        ev.pool = pool
    assert pool.closed and ev.pool is None
    with pytest.raises(EdgepruneError, match="supernet_steps must be"):
        SupernetSettings(steps=0)
    assert SupernetSettings(steps=2.0, lr=1).steps == 2


def test_prune_with_the_supernet_proxy_trains_it_once(tiny_run, tmp_path, cli):
    """`prune --proxy supernet` trains the supernet into the run folder; a resumed run loads it;
    with Ray workers it is refused before any work."""
    from .test_search import prune_args

    out = tmp_path / "run"
    args = prune_args(tiny_run, out, budget_ms="80%", search="random", evals=3, measure_top=1, proxy="supernet")
    r = cli(*args, "--supernet-steps", "6", "--json")
    assert r.returncode == 0, r.stderr
    assert "supernet: 6 steps" in r.stderr and (out / "supernet.pt").is_file()
    r = cli(*prune_args(tiny_run, out, evals=4), "--resume", "--json")
    assert r.returncode == 0, r.stderr
    assert "supernet: loaded from" in r.stderr and "steps in" not in r.stderr
    r = cli(*prune_args(tiny_run, tmp_path / "ray", budget_ms="80%", proxy="supernet", workers=2))
    assert r.returncode != 0 and "scores in this process only" in r.stderr and "Traceback" not in r.stderr
