"""Channel criteria: each checked for its defining property."""

import itertools

import numpy as np
import torch
from torch import nn

from edgeprune.pruning import acp_widths, space
from edgeprune.pruning.criteria import REPrune, coverage, greedy_max_coverage


class Tiny(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_greedy_coverage_beats_every_random_subset():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(16, 12))
    chosen = greedy_max_coverage(labels, 4)
    best_random = max(coverage(labels, rng.choice(16, 4, replace=False)) for _ in range(500))
    assert coverage(labels, chosen) >= best_random


def test_greedy_coverage_near_optimal_on_small_instances():
    rng = np.random.default_rng(1)
    for _ in range(10):
        labels = rng.integers(0, 3, size=(8, 5))
        optimum = max(coverage(labels, c) for c in itertools.combinations(range(8), 3))
        assert coverage(labels, greedy_max_coverage(labels, 3)) >= (1 - 1 / np.e) * optimum


def test_reprune_keeps_one_of_each_duplicated_filter():
    torch.manual_seed(0)
    model = Tiny(16).eval()
    with torch.no_grad():  # 4 distinct filters, each repeated 4 times (slightly perturbed)
        base = torch.randn(4, 1, 3, 3) * 3
        model.conv1.weight.copy_(base.repeat_interleave(4, 0) + 0.01 * torch.randn(16, 1, 3, 3))
    s = space(model, torch.randn(1, 1, 8, 8), step=1, min_keep_ratio=0.1)
    g = next(g for g in s.groups if g.root == "conv1")
    kept = s.criterion("reprune").select(g, 4)
    assert sorted(i // 4 for i in kept) == [0, 1, 2, 3]  # one filter from each cluster: full coverage
    labels = REPrune(s).labels(g, 4)
    assert coverage(labels, kept) == max(coverage(labels, c) for c in itertools.combinations(range(16), 4))


def test_acp_clusters_give_width_and_representatives():
    torch.manual_seed(0)
    model = Tiny(16).eval()
    with torch.no_grad():  # channels in 4 groups whose feature maps are scaled copies (cosine distance ~0)
        base = torch.randn(4, 1, 3, 3)
        scale = torch.tensor([1.0, 1.5, 2.0, 2.5]).repeat(4)[:, None, None, None]
        model.conv1.weight.copy_(base.repeat_interleave(4, 0) * scale)
    data = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    s = space(model, torch.randn(1, 1, 8, 8), step=1, min_keep_ratio=0.1)
    g = next(g for g in s.groups if g.root == "conv1")
    crit = s.criterion("acp", data=data, eps=0.01)
    members, reps = crit.clusters(g)
    assert sorted(sorted(m) for m in members) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert acp_widths(s, data, eps=0.01)[g.index] == 4
    kept = crit.select(g, 4)
    assert sorted(i // 4 for i in kept) == [0, 1, 2, 3] and set(kept) == set(reps)
    kept6 = crit.select(g, 6)
    assert set(reps) <= set(kept6) and len(kept6) == 6


def test_norm_criteria_keep_the_largest():
    torch.manual_seed(0)
    model = Tiny(16).eval()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.ones(16, 1, 3, 3) * torch.linspace(0.1, 2, 16)[:, None, None, None])
        model.conv2.weight.copy_(torch.ones(8, 16, 3, 3) * torch.linspace(0.1, 2, 16)[None, :, None, None])
        model.bn1.weight.copy_(torch.linspace(2, 0.1, 16))  # BN scales rank the other way round
        model.bn1.bias.zero_()
    s = space(model, torch.randn(1, 1, 8, 8), step=1)
    g = next(g for g in s.groups if g.root == "conv1")
    assert s.criterion("l1").select(g, 4) == [12, 13, 14, 15]
    assert s.criterion("l2").select(g, 4) == [12, 13, 14, 15]
    assert s.criterion("bn").select(g, 4) == [0, 1, 2, 3]
