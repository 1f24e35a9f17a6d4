"""BOCR's layer clustering: groups whose channel importances are distributed alike share one ratio.

Each group's per-channel importance (group L1 norm) is divided by its median and centred
(scale-free, like BOCR's median shift), smoothed by a Gaussian kernel density estimate on a
common grid, and the density curves are clustered with Ward's method (Euclidean distance).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def importance_density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    from scipy.stats import gaussian_kde

    v = np.asarray(values, float)
    v = v / (np.median(np.abs(v)) + 1e-12) - 1.0
    try:
        return gaussian_kde(v)(grid) if len(v) > 1 and np.ptp(v) > 1e-9 else _narrow(v, grid)
    except np.linalg.LinAlgError:
        return _narrow(v, grid)


def _narrow(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    d = np.exp(-0.5 * ((grid[:, None] - v[None, :]) / 0.05) ** 2).sum(1)
    return d / (d.sum() * (grid[1] - grid[0]) + 1e-12)


def cluster_groups(importances: Sequence[np.ndarray], k: int) -> np.ndarray:
    """A cluster label in 0..k-1 for each group (at most k clusters, fewer when groups are fewer)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(importances)
    if n <= k:
        return np.arange(n)
    grid = np.linspace(-1.5, 3.0, 400)
    curves = np.stack([importance_density(v, grid) for v in importances])
    labels = fcluster(linkage(curves, method="ward"), t=k, criterion="maxclust") - 1
    _, labels = np.unique(labels, return_inverse=True)  # 0..k'-1 without gaps
    return labels
