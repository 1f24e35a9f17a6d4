"""What a search constrains: latency predicted by a device's table, or MACs (the FLOPs baseline).

Both take many plans at once (N x G keep-counts) and answer one number per plan, so the repair
step can bisect and fill hundreds of candidates in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprune.latency.predictor import CompiledPredictor
from edgeprune.pruning.cost import CostModel

COSTS = ("latency", "flops")


@dataclass
class LatencyCost:
    """Predicted milliseconds on the device (latency table + calibration), times `scale`: the
    ratio of the dense model's measured to predicted latency when anchored at the run's start."""

    predictor: CompiledPredictor
    scale: float = 1.0
    name: str = "latency"
    unit: str = "ms"

    def __call__(self, counts) -> np.ndarray:
        return self.predictor.predict(counts) * self.scale


@dataclass
class FlopsCost:
    """MACs as a share of the dense model's: what a FLOPs-targeted pruner constrains."""

    model: CostModel
    dense_macs: float
    name: str = "flops"
    unit: str = "of dense MACs"

    def __call__(self, counts) -> np.ndarray:
        return self.model.macs_many(counts) / self.dense_macs
