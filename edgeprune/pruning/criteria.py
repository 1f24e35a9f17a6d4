"""Which channels to keep inside a group, by name: l1, l2, bn, reprune, acp.

Every criterion answers `select(group, k) -> kept indices` on the base model. Norm criteria
rank channels once; REPrune and ACP select sets (coverage, clusters), so their choice depends on k.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from edgeprune.errors import choices_error
from edgeprune.pruning.space import ChannelGroup, PrunableSpace

NAMES = ("l1", "l2", "bn", "reprune", "acp")


def _expand(local: Iterable[int], group: ChannelGroup) -> list[int]:
    """Local indices (within one conv group) repeated in every conv group."""
    size = group.width // group.channel_groups
    return sorted(int(i) + g * size for g in range(group.channel_groups) for i in local)


class Criterion:
    name = ""

    def __init__(self, space: PrunableSpace) -> None:
        self.space = space
        self.modules = dict(space.base.named_modules())

    def tp_group(self, group: ChannelGroup):
        module = self.modules[group.root]
        pruner = self.space.graph.get_pruner_of_module(module)
        return self.space.graph.get_pruning_group(module, pruner.prune_out_channels, list(range(group.width)))

    def select(self, group: ChannelGroup, k: int) -> list[int]:
        raise NotImplementedError


class RankingCriterion(Criterion):
    """Keep the k channels with the highest score (averaged over conv groups)."""

    importance: tp.importance.Importance

    def __init__(self, space: PrunableSpace) -> None:
        super().__init__(space)
        self._scores: dict[int, torch.Tensor] = {}

    def scores(self, group: ChannelGroup) -> torch.Tensor:
        if group.index not in self._scores:
            with torch.no_grad():
                imp = self.importance(self.tp_group(group))
            if imp is None:  # e.g. BN scale on a group without BN
                imp = tp.importance.GroupMagnitudeImportance(p=1)(self.tp_group(group))
            self._scores[group.index] = imp.detach().float().cpu()
        return self._scores[group.index]

    def select(self, group: ChannelGroup, k: int) -> list[int]:
        imp = self.scores(group)
        if group.parts:  # a concatenated group: the same share of every part, each its best
            kept, offset = [], 0
            for width, keep in zip(group.parts, group.part_counts(k)):
                kept += [offset + int(i) for i in torch.argsort(imp[offset : offset + width], descending=True)[:keep]]
                offset += width
            return sorted(kept)
        per = k // group.channel_groups
        local = imp.view(group.channel_groups, -1).mean(0)
        return _expand(torch.argsort(local, descending=True)[:per].tolist(), group)


class L1(RankingCriterion):
    """Group L1 norm of each channel's weights across every coupled layer (DepGraph's magnitude)."""

    name = "l1"
    importance = tp.importance.GroupMagnitudeImportance(p=1)


class L2(RankingCriterion):
    name = "l2"
    importance = tp.importance.GroupMagnitudeImportance(p=2)


class BNScale(RankingCriterion):
    """|gamma| of the BatchNorm layers in the group (network slimming)."""

    name = "bn"
    importance = tp.importance.BNScaleImportance()


def greedy_max_coverage(labels: np.ndarray, k: int, tie_break: np.ndarray | None = None) -> list[int]:
    """Choose k rows of `labels` (filters x input channels, a cluster id per entry) that together
    cover the most distinct (input channel, cluster) pairs; greedy, ties to the larger `tie_break`."""
    n, m = labels.shape
    n_clusters = int(labels.max()) + 1
    covered = np.zeros((m, n_clusters), dtype=bool)
    chosen: list[int] = []
    available = np.ones(n, dtype=bool)
    tie = np.zeros(n) if tie_break is None else tie_break / (np.abs(tie_break).max() + 1e-12) * 0.5
    cols = np.arange(m)[None, :]
    for _ in range(min(k, n)):
        gain = (~covered[cols, labels]).sum(1).astype(float) + tie
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        covered[np.arange(m), labels[best]] = True
    return chosen


def coverage(labels: np.ndarray, rows: Iterable[int]) -> int:
    """Distinct (input channel, cluster) pairs covered by `rows`."""
    rows = list(rows)
    return len({(j, int(labels[i, j])) for i in rows for j in range(labels.shape[1])})


class REPrune(Criterion):
    """REPrune (Park et al. 2024): per input channel, cluster the filters' kernels (Ward); keep
    the filters that cover the most cluster representatives (greedy maximum coverage)."""

    name = "reprune"

    def __init__(self, space: PrunableSpace) -> None:
        super().__init__(space)
        self._linkages: dict[int, list[np.ndarray]] = {}
        self._fallback = L1(space)

    def kernels(self, group: ChannelGroup) -> np.ndarray:
        w = self.modules[group.root].weight.detach().float().cpu().numpy()
        return w.reshape(w.shape[0], w.shape[1], -1)  # filters x input channels x kernel positions

    def linkages(self, group: ChannelGroup) -> list[np.ndarray]:
        from scipy.cluster.hierarchy import ward

        if group.index not in self._linkages:
            w = self.kernels(group)
            self._linkages[group.index] = [ward(w[:, j, :]) for j in range(w.shape[1])]
        return self._linkages[group.index]

    def labels(self, group: ChannelGroup, k: int) -> np.ndarray:
        from scipy.cluster.hierarchy import fcluster

        cols = [fcluster(z, t=k, criterion="maxclust") - 1 for z in self.linkages(group)]
        return np.stack(cols, axis=1)

    def select(self, group: ChannelGroup, k: int) -> list[int]:
        module = self.modules[group.root]
        if group.channel_groups > 1 or group.parts or not isinstance(module, (nn.Conv2d, nn.Linear)) or group.width < 2:
            return self._fallback.select(group, k)
        norms = np.abs(self.kernels(group)).sum((1, 2))
        return sorted(greedy_max_coverage(self.labels(group, k), k, tie_break=norms))


class ACP(Criterion):
    """ACP (Chang et al. 2022): cluster a group's channels by the similarity of their feature
    maps on training data (agglomerative, cosine distance). The number of clusters is a data-driven
    width for the group; one representative per cluster is kept first, largest clusters first."""

    name = "acp"

    def __init__(self, space: PrunableSpace, *, data: list[torch.Tensor] | None = None, eps: float = 0.05) -> None:
        super().__init__(space)
        if not data:
            from edgeprune.errors import EdgepruneError

            raise EdgepruneError("the acp criterion needs a few batches of training data (data=[tensor, ...])")
        self.eps = eps
        self._fallback = L1(space)
        self._features = self._collect(data)
        self._clusters: dict[int, tuple[list[list[int]], list[int]]] = {}

    @torch.no_grad()
    def _collect(self, data: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """Each root layer's output channels as vectors: for a conv, its feature map averaged over
        the images (ACP's representation); for a linear layer, its activations over the images."""
        outputs: dict[str, list[torch.Tensor]] = {g.root: [] for g in self.space.groups}
        hooks = []
        for g in self.space.groups:

            def hook(mod, inp, out, name=g.root):
                out = out.float()
                outputs[name].append(out.mean(0).flatten(1) * len(out) if out.dim() > 2 else out.T)

            hooks.append(self.modules[g.root].register_forward_hook(hook))
        try:
            self.space.base.eval()
            for x in data:
                self.space.base(x)
        finally:
            for h in hooks:
                h.remove()
        features = {}
        for name, parts in outputs.items():
            conv = isinstance(self.modules[name], nn.Conv2d)
            features[name] = (torch.stack(parts).sum(0) if conv else torch.cat(parts, 1)).numpy()
        return features

    def clusters(self, group: ChannelGroup) -> tuple[list[list[int]], list[int]]:
        """(clusters as member lists, largest first; the representative of each)."""
        if group.index not in self._clusters:
            from sklearn.cluster import AgglomerativeClustering

            f = self._features[group.root]
            f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
            if len(f) < 2:
                labels = np.zeros(len(f), dtype=int)
            else:
                labels = AgglomerativeClustering(
                    n_clusters=None, metric="cosine", linkage="average", distance_threshold=self.eps
                ).fit_predict(f)
            members = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
            members.sort(key=lambda m: (-len(m), m[0]))
            reps = []
            for m in members:
                centre = f[m].mean(0)
                reps.append(m[int(np.argmax(f[m] @ centre))])
            self._clusters[group.index] = (members, reps)
        return self._clusters[group.index]

    def width(self, group: ChannelGroup) -> int:
        """The data-driven preliminary width: the number of clusters, snapped to an allowed count."""
        return group.snap(len(self.clusters(group)[0]))

    def select(self, group: ChannelGroup, k: int) -> list[int]:
        if group.channel_groups > 1 or group.parts:
            return self._fallback.select(group, k)
        _, reps = self.clusters(group)
        kept = reps[:k]
        if len(kept) < k:
            ranked = [i for i in torch.argsort(self._fallback.scores(group), descending=True).tolist() if i not in kept]
            kept += ranked[: k - len(kept)]
        return sorted(kept)


CRITERIA = {c.name: c for c in (L1, L2, BNScale, REPrune, ACP)}


def make_criterion(name: str, space: PrunableSpace, **kwargs) -> Criterion:
    if name not in CRITERIA:
        raise choices_error("criterion", name, NAMES)
    return CRITERIA[name](space, **kwargs)


def acp_widths(space: PrunableSpace, data: list[torch.Tensor], *, eps: float = 0.05) -> list[int]:
    """ACP's data-driven keep-count per group (for the swarm's initial population)."""
    crit = space.criterion("acp", data=data, eps=eps)
    return [crit.width(g) for g in space.groups]
